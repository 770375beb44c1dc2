"""Every token of a tokenizer as the raw bytes it stands for (see docs/alignment.md).

How a token string is read depends on the tokenizer's own pipeline, which we read from its backend config
(model type, pre-tokenizer, decoder, normalizer), never from the look of the strings alone:

* byte-level BPE (a `ByteLevel` pre-tokenizer or decoder: GPT-2, GPT-NeoX, Llama-3, Qwen, Phi-2, Falcon,
  RoBERTa, SmolLM2): each character of the token is one byte through the inverse GPT-2 byte-to-unicode table
  ('Ġ' -> 0x20, 'Ċ' -> 0x0A, 'ðŁĺ' + 'Ģ' -> the four bytes of an emoji).
* SentencePiece style (a `Metaspace` pre-tokenizer, a `Replace(' ' -> '▁')` normalizer or a `Replace('▁' -> ' ')`
  decoder: Llama-2, Mistral, Gemma, Phi-3, T5): the metaspace character becomes a space, and with byte fallback
  a `<0xNN>` piece becomes the single byte NN; everything else is its UTF-8.
* WordPiece: a continuation piece ('##ing') is its text without the prefix, a word-initial piece gets a
  leading space (it follows a space in running text).
* added tokens: their literal content as UTF-8 (the text that the tokenizer matches to them). Special
  (control) tokens keep their spelling as their form too, but they are flagged by `control_mask` and never
  compete with text tokens in the MinED search; bos/eos/pad/unk map by role (`special_roles`).
"""

from __future__ import annotations

import json
import re
import weakref

import numpy as np

from cotune.align.vocab_basics import gpt2_byte_to_unicode, special_token_ids

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _component(obj) -> dict | None:
    if obj is None:
        return None
    try:
        return json.loads(obj.__getstate__())
    except (AttributeError, TypeError, ValueError):  # pragma: no cover - very old tokenizers
        return None


def _walk(cfg) -> list[dict]:
    """Flatten a (possibly nested Sequence) component config into its parts."""
    if not cfg:
        return []
    out = [cfg]
    for key in ("pretokenizers", "decoders", "normalizers", "processors"):
        for sub in cfg.get(key) or []:
            out.extend(_walk(sub))
    return out


def _pattern_string(part: dict) -> str | None:
    pattern = part.get("pattern")
    if isinstance(pattern, dict):
        return pattern.get("String")
    return None


class _Pipeline:
    """What we need to know about a tokenizer's pipeline to read its tokens."""

    def __init__(self, tok):
        backend = tok.backend_tokenizer
        self.model_type = type(backend.model).__name__
        self.byte_fallback = bool(getattr(backend.model, "byte_fallback", False))
        self.wordpiece_prefix = None
        pre = _walk(_component(backend.pre_tokenizer))
        dec = _walk(_component(backend.decoder))
        norm = _walk(_component(backend.normalizer))
        self.byte_level = any(p.get("type") == "ByteLevel" for p in pre + dec)
        self.metaspace = None  # the character that stands for a space
        for p in pre + dec:
            if p.get("type") == "Metaspace":
                self.metaspace = p.get("replacement", "▁")
        for p in dec:
            if p.get("type") == "Replace" and p.get("content") == " " and _pattern_string(p):
                self.metaspace = _pattern_string(p)
        self.normalizer_replaces_space = None
        for p in norm:
            if p.get("type") == "Replace" and _pattern_string(p) == " " and p.get("content"):
                self.normalizer_replaces_space = p["content"]
                self.metaspace = self.metaspace or p["content"]
        if self.model_type == "WordPiece" or any(p.get("type") == "WordPiece" for p in dec):
            self.wordpiece_prefix = getattr(backend.model, "continuing_subword_prefix", None) or "##"
        self.normalizer_types = sorted({p.get("type") for p in norm if p.get("type") != "Sequence"})

    @property
    def family(self) -> str:
        kind = {"BPE": "bpe", "Unigram": "unigram", "WordPiece": "wordpiece", "WordLevel": "wordlevel"}.get(
            self.model_type, self.model_type.lower()
        )
        if self.byte_level:
            return f"byte-level-{kind}"
        if self.metaspace:
            return f"sentencepiece-{kind}" + ("+byte-fallback" if self.byte_fallback else "")
        return kind


def tokenizer_family(tok) -> str:
    """A short name for how this tokenizer spells its tokens: 'byte-level-bpe', 'sentencepiece-bpe+byte-fallback',
    'sentencepiece-unigram', 'wordpiece', ... (for docs and reports)."""
    return _Pipeline(tok).family


def space_marker(tok) -> str | None:
    """The character a SentencePiece-style tokenizer writes for a space ('▁'), None for the other families."""
    return _Pipeline(tok).metaspace


def special_roles(tok) -> dict[str, int]:
    """role ('bos', 'eos', 'pad', 'unk') -> token id, for the roles this tokenizer has."""
    return special_token_ids(tok)


def _vocab_size(backend) -> int:
    vocab = backend.get_vocab(with_added_tokens=True)
    return (max(vocab.values()) + 1) if vocab else 0


def normalized_forms(tok) -> list[bytes]:
    """The raw bytes of every token id 0..max_id (ids that hold no token get b'')."""
    backend = tok.backend_tokenizer
    pipe = _Pipeline(tok)
    vocab = backend.get_vocab(with_added_tokens=False)
    added = backend.get_added_tokens_decoder()
    n = _vocab_size(backend)
    forms = [b""] * n

    if pipe.byte_level:
        inverse = {c: b for b, c in gpt2_byte_to_unicode().items()}

        def read(token: str) -> bytes:
            try:
                return bytes(inverse[c] for c in token)
            except KeyError:  # not in the byte alphabet: a literal token
                return token.encode("utf-8")

    elif pipe.metaspace:
        space = pipe.metaspace
        fallback = pipe.byte_fallback

        def read(token: str) -> bytes:
            if fallback:
                m = _BYTE_PIECE.match(token)
                if m:
                    return bytes([int(m.group(1), 16)])
            return token.replace(space, " ").encode("utf-8")

    elif pipe.wordpiece_prefix:
        prefix = pipe.wordpiece_prefix

        def read(token: str) -> bytes:
            if token.startswith(prefix):
                return token[len(prefix) :].encode("utf-8")
            return (" " + token).encode("utf-8")

    else:

        def read(token: str) -> bytes:
            return token.encode("utf-8")

    for token, idx in vocab.items():
        forms[idx] = read(token)
    model = backend.model
    for idx, added_token in added.items():
        if not added_token.special and model.id_to_token(idx) is not None:
            continue  # also a model token: the model produces it inside text, read it as one
        content = added_token.content
        if added_token.normalized and pipe.normalizer_replaces_space:
            content = content.replace(pipe.normalizer_replaces_space, " ")
        forms[idx] = content.encode("utf-8")
    return forms


def byte_fallback_mask(tok) -> np.ndarray:
    """bool [n]: True for the `<0xNN>` byte-fallback pieces of a byte-fallback (SentencePiece style) model. Their
    form is one byte that a real piece often shares ('<0x2E>' and '.'); the model emits them only for text no
    piece covers, so a real piece is preferred as a MinED target (`cotune.align.mined.target_preference`)."""
    backend = tok.backend_tokenizer
    mask = np.zeros(_vocab_size(backend), dtype=bool)
    if not getattr(backend.model, "byte_fallback", False):
        return mask
    for token, idx in backend.get_vocab(with_added_tokens=False).items():
        if _BYTE_PIECE.match(token):
            mask[idx] = True
    return mask


def control_mask(tok) -> np.ndarray:
    """bool [n]: True for special (control) tokens and role tokens. They are mapped by role or spelling,
    never offered as MinED targets for text tokens."""
    backend = tok.backend_tokenizer
    mask = np.zeros(_vocab_size(backend), dtype=bool)
    for idx, added_token in backend.get_added_tokens_decoder().items():
        if added_token.special:
            mask[idx] = True
    for idx in special_token_ids(tok).values():
        if 0 <= idx < len(mask):
            mask[idx] = True
    return mask


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def normalized_forms_cached(tok) -> list[bytes]:
    """`normalized_forms`, memoized per tokenizer object (encode_pair calls this for every sample)."""
    try:
        forms = _CACHE.get(tok)
    except TypeError:  # not weak-referenceable
        return normalized_forms(tok)
    if forms is None:
        forms = normalized_forms(tok)
        _CACHE[tok] = forms
    return forms
