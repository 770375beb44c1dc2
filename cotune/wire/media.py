"""Media types of the blobs the services store and serve."""

MEDIA_SHARD = "application/x-cotune-topk-shard"
MEDIA_ADAPTER = "application/safetensors+lora"
MEDIA_TOKENIZER = "application/x-cotune-tokenizer"
MEDIA_DATASET = "application/x-cotune-examples+jsonl"
MEDIA_MODEL_ARCHIVE = "application/x-tar"  # a model directory packed by FedBiOT's compression (pack_dir)
