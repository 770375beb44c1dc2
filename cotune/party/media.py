"""Media types of the blobs a party stores and serves."""

MEDIA_SHARD = "application/x-cotune-topk-shard"
MEDIA_ADAPTER = "application/safetensors+lora"
MEDIA_TOKENIZER = "application/x-cotune-tokenizer"
MEDIA_DATASET = "application/x-cotune-examples+jsonl"
MEDIA_MODEL_ARCHIVE = "application/x-tar"  # a model directory packed by cotune.algorithms.fedbiot.compress.pack_dir
