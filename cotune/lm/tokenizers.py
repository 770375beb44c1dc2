"""Tokenizer loading, the canonical tokenizer bundle, and the one text encoding every party uses.

Every party and the alignment service must tokenize a public sample identically, so `encode_pair` is the
single place that turns (prompt, response) into token ids with character end offsets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


class TokenizerLoadError(ValueError):
    """A tokenizer file could not be read; the message names the file and what was expected."""


def _from_tokenizer_json_text(text: str, config: dict | None = None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise TokenizerLoadError(f"not a valid tokenizer.json: {exc}") from exc
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    _assign_special_roles(tok, config or {})
    return tok


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _assign_special_roles(tok: PreTrainedTokenizerFast, config: dict) -> None:
    """Set bos/eos/pad/unk from a tokenizer_config.json when given, else from well-known spellings."""
    vocab = tok.get_vocab()
    guesses = {
        "bos": ["<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>"],
        "eos": ["</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"],
        "pad": ["<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>"],
        "unk": ["<unk>", "[UNK]", "<|unk|>"],
    }
    for role in SPECIAL_ROLES:
        content = _token_content(config.get(f"{role}_token"))
        if content is None or content not in vocab:
            content = next((g for g in guesses[role] if g in vocab), None)
        if content is not None:
            setattr(tok, f"{role}_token", content)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from an HF directory, a tokenizer.json(.gz), a SentencePiece/tiktoken .model,
    a GPT-2 style vocab+merges pair (pass the vocab file), or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer path does not exist: {path}")
    try:
        if path.is_dir():
            return _load_dir(path)
        name = path.name
        if name.endswith(".json") or name.endswith(".json.gz"):
            cfg_path = path.parent / "tokenizer_config.json"
            config = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
            return _from_tokenizer_json_text(_read_text(path), config)
        if name.endswith(".gguf"):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=name)
        if ".model" in name:
            return _load_sentencepiece(path)
        if name.endswith(".vocab") or name == "vocab.json":
            return _load_vocab_merges(path)
    except TokenizerLoadError:
        raise
    except Exception as exc:
        raise TokenizerLoadError(f"could not load tokenizer from {path}: {exc}") from exc
    raise TokenizerLoadError(
        f"unrecognised tokenizer file {path}: expected an HF directory, tokenizer.json(.gz), "
        "tokenizer.model, a GPT-2 vocab file, or a .gguf file"
    )


def _load_dir(path: Path) -> PreTrainedTokenizerFast:
    for candidate in ("tokenizer.json", "tokenizer.json.gz"):
        if (path / candidate).exists():
            return load_tokenizer(path / candidate)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_sentencepiece(path: Path) -> PreTrainedTokenizerFast:
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast(vocab_file=str(path), legacy=False, add_prefix_space=None)
    _assign_special_roles(tok, {})
    return tok


def _load_vocab_merges(path: Path) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    merges = next((p for p in (path.with_suffix(".merges.txt"), path.parent / "merges.txt") if p.exists()), None)
    if merges is None:
        raise TokenizerLoadError(f"no merges file found beside {path}")
    backend = Tokenizer(models.BPE.from_file(str(path), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    _assign_special_roles(tok, {})
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Bundle: the canonical, hashable description of a tokenizer that travels to the alignment service.


def special_token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    out = {}
    for role in SPECIAL_ROLES:
        value = getattr(tok, f"{role}_token_id", None)
        if value is not None:
            out[role] = int(value)
    return out


def tokenizer_bundle_bytes(tok: PreTrainedTokenizerFast) -> bytes:
    """Canonical bytes: the backend tokenizer.json plus the special-token roles. Its sha256 is the tokenizer's id."""
    backend = json.loads(tok.backend_tokenizer.to_str())
    bundle = {"format": "cotune.tokenizer/1", "tokenizer": backend, "special": special_token_ids(tok)}
    return json.dumps(bundle, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def tokenizer_from_bundle(data: bytes) -> PreTrainedTokenizerFast:
    try:
        bundle = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"tokenizer bundle is not valid JSON: {exc}") from exc
    if not isinstance(bundle, dict) or bundle.get("format") != "cotune.tokenizer/1":
        raise TokenizerLoadError("tokenizer bundle has no 'format: cotune.tokenizer/1' header")
    tok = _from_tokenizer_json_text(json.dumps(bundle["tokenizer"]))
    id_to_token = {i: t for t, i in tok.get_vocab().items()}
    for role, token_id in bundle.get("special", {}).items():
        if role in SPECIAL_ROLES and token_id in id_to_token:
            setattr(tok, f"{role}_token", id_to_token[token_id])
    return tok


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    return hashlib.sha256(tokenizer_bundle_bytes(tok)).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class EncodedPair:
    """One (prompt, response) sample as a party's model sees it.

    ids: token ids (bos included when the tokenizer adds one).
    ends: for each token, the character offset in prompt+response where it ends (0 for bos).
    response_start: index of the first token that ends inside the response; tokens from here on are targets.
    response_bytes: UTF-8 byte length of the response (the denominator of bits-per-byte).
    """

    ids: tuple[int, ...]
    ends: tuple[int, ...]
    response_start: int
    response_bytes: int

    @property
    def target_positions(self) -> range:
        """Positions t whose next-token prediction is a response token (t + 1 is a response token)."""
        return range(max(self.response_start - 1, 0), len(self.ids) - 1)


def encode_pair(tok: PreTrainedTokenizerFast, prompt: str, response: str, max_length: int = 512) -> EncodedPair:
    text = prompt + response
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    ends = [int(end) for _, end in enc["offset_mapping"]]
    bos = tok.bos_token_id
    if bos is not None and getattr(tok, "add_bos_token", True) and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        ends.insert(0, 0)
    prompt_len = len(prompt)
    response_start = next((i for i, e in enumerate(ends) if e > prompt_len), len(ids))
    if len(ids) > max_length:
        # Drop prompt tokens after the first (bos) so the response survives; responses are short.
        cut = len(ids) - max_length
        keep_head = 1 if ids and ids[0] == bos else 0
        if response_start - keep_head < cut:
            cut = max(response_start - keep_head - 1, 0)
        ids = ids[:keep_head] + ids[keep_head + cut :]
        ends = ends[:keep_head] + ends[keep_head + cut :]
        response_start -= cut
        ids, ends = ids[:max_length], ends[:max_length]
    return EncodedPair(tuple(ids), tuple(ends), response_start, len(response.encode("utf-8")))
