"""Tokenizer loading, the canonical tokenizer bundle, and the one text encoding every party uses.

Every party and the alignment service must tokenize a public sample identically, so `encode_pair` is the
single place that turns (prompt, response) into token ids with character end offsets.

`load_tokenizer` reads every format the project meets and always returns a `PreTrainedTokenizerFast` whose
backend is a plain `tokenizers.Tokenizer` (so `tokenizer_bundle_bytes` can describe it completely):

| input | how it is read |
|---|---|
| `tokenizer.json` / `tokenizer.json.gz` | `tokenizers.Tokenizer.from_str`; roles and `add_bos_token` from a sibling `tokenizer_config.json` |
| SentencePiece `tokenizer.model` (Llama-2, Mistral `tokenizer.model.v1`, ...) | parsed from the protobuf; BPE merges rebuilt from piece ranks; Metaspace pre-tokenizer, byte fallback |
| tiktoken `tokenizer.model` (Llama-3) | base64 ranks -> byte-level BPE (GPT-2 byte alphabet); Llama-3 split regex and its 256 special tokens |
| GPT-2 `*.vocab` / `vocab.json` + merges | byte-level BPE with `<|endoftext|>` as a special token |
| `.gguf` | the GGUF metadata (`tokenizer.ggml.*`) via transformers' GGUF tokenizer builder, roles and `add_bos_token` from the file |
| HF directory | the first of tokenizer.json(.gz), tokenizer.model, vocab.json+merges.txt, a single .gguf, else `AutoTokenizer` |
"""

from __future__ import annotations

import base64
import bisect
import gzip
import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from cotune.align.normalize import normalized_forms_cached, space_marker
from cotune.data.example import passage_end
from cotune.align.vocab_basics import SPECIAL_ROLES, gpt2_byte_to_unicode, special_token_ids


LLAMA3_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama-3 (meta-llama/llama-models, models/llama3/tokenizer.py): 128,000 ranks, then 256 special tokens.
_LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
_LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(_LLAMA3_SPECIALS))]

# Spellings tried (among *special* added tokens only) when no config names a role.
_ROLE_GUESSES = {
    "bos": ["<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"],
    "eos": ["</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"],
    "pad": ["<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>"],
    "unk": ["<unk>", "[UNK]", "<|unk|>"],
}


class TokenizerLoadError(ValueError):
    """A tokenizer file could not be read; the message names the file and what was expected."""


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer from an HF directory, a tokenizer.json(.gz), a SentencePiece/tiktoken .model,
    a GPT-2 style vocab+merges pair (pass the vocab file), or a GGUF file."""
    path = Path(path)
    if not path.exists():
        raise TokenizerLoadError(f"tokenizer path does not exist: {path}")
    try:
        if path.is_dir():
            return _load_dir(path)
        return _load_file(path)
    except TokenizerLoadError:
        raise
    except Exception as exc:
        raise TokenizerLoadError(f"could not load tokenizer from {path}: {type(exc).__name__}: {exc}") from exc


def _load_dir(path: Path) -> PreTrainedTokenizerFast:
    for candidate in ("tokenizer.json", "tokenizer.json.gz", "tokenizer.model", "vocab.json"):
        if (path / candidate).exists():
            return _load_file(path / candidate)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_file(ggufs[0])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise TokenizerLoadError(f"{path}: AutoTokenizer gave a slow tokenizer ({type(tok).__name__}); need a fast one")
    return tok


def _load_file(path: Path) -> PreTrainedTokenizerFast:
    raw = path.read_bytes()
    if not raw:
        raise TokenizerLoadError(f"{path}: file is empty")
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except Exception as exc:
            raise TokenizerLoadError(f"{path}: corrupt gzip data: {exc}") from exc
    if raw[:4] == b"GGUF":
        return _load_gguf(path)
    head = raw[:64].lstrip()
    if head[:1] == b"{":
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TokenizerLoadError(f"{path}: looks like JSON but does not parse: {exc}") from exc
        if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            return _from_tokenizer_json_text(raw.decode("utf-8"), _sibling_config(path), where=str(path))
        if isinstance(obj, dict) and obj and all(isinstance(v, int) for v in obj.values()):
            return _load_vocab_merges(path)
        raise TokenizerLoadError(
            f"{path}: JSON that is neither a tokenizer.json (no 'model' object) nor a GPT-2 vocab (token -> id)"
        )
    if _looks_like_tiktoken(raw):
        return _load_tiktoken(raw, where=str(path))
    if path.name.endswith(".model") or ".model." in path.name or path.suffix in (".spm", ".v1", ".v2", ".v3"):
        return _load_sentencepiece(raw, where=str(path))
    try:
        return _load_sentencepiece(raw, where=str(path))
    except TokenizerLoadError:
        pass
    raise TokenizerLoadError(
        f"unrecognised tokenizer file {path}: expected an HF directory, tokenizer.json(.gz), "
        "a SentencePiece or tiktoken tokenizer.model, a GPT-2 vocab file, or a .gguf file"
    )


def _sibling_config(path: Path) -> dict:
    cfg_path = path.parent / "tokenizer_config.json"
    if not cfg_path.exists():
        return {}
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerLoadError(f"{cfg_path}: not valid JSON: {exc}") from exc
    return cfg if isinstance(cfg, dict) else {}


def _wrap(backend, roles: dict[str, str | None], add_bos: bool | None) -> PreTrainedTokenizerFast:
    """Wrap a `tokenizers.Tokenizer` and set special roles (role -> token content; None = explicitly absent)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    vocab = tok.get_vocab()
    specials = {a.content for a in backend.get_added_tokens_decoder().values() if a.special}
    for role in SPECIAL_ROLES:
        if role in roles:
            content = roles[role]
            if content is None or content not in vocab:
                continue
        else:
            content = next((g for g in _ROLE_GUESSES[role] if g in specials), None)
            if content is None:
                continue
        setattr(tok, f"{role}_token", content)
    _set_add_bos(tok, add_bos)
    return tok


def _set_add_bos(tok: PreTrainedTokenizerFast, explicit: bool | None) -> None:
    """Make the backend's post-processor add bos iff this tokenizer's model expects it, so the decision
    travels inside the tokenizer JSON (and so inside the bundle and its hash)."""
    from tokenizers import processors

    bos, bos_id = tok.bos_token, tok.bos_token_id
    probe = _post_processor_adds_bos(tok)
    if explicit is None:
        want = probe or (bos_id is not None and bos_id != tok.eos_token_id)
    else:
        want = bool(explicit) and bos_id is not None
    if want == probe:
        return
    backend = tok.backend_tokenizer
    if want:
        template = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        old = backend.post_processor
        if old is not None and type(old).__name__ == "ByteLevel":
            backend.post_processor = processors.Sequence([old, template])
        else:
            backend.post_processor = template
    else:
        backend.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])


def _post_processor_adds_bos(tok: PreTrainedTokenizerFast) -> bool:
    bos_id = tok.bos_token_id
    if bos_id is None:
        return False
    ids = tok.backend_tokenizer.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _roles_from_config(config: dict) -> dict[str, str | None]:
    roles: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        key = f"{role}_token"
        if key in config:
            roles[role] = _token_content(config[key])
    return roles


def _from_tokenizer_json_text(text: str, config: dict | None = None, where: str = "tokenizer.json"):
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception subclass
        raise TokenizerLoadError(f"{where}: not a valid tokenizer.json: {exc}") from exc
    config = config or {}
    add_bos = config.get("add_bos_token")
    return _wrap(backend, _roles_from_config(config), add_bos if isinstance(add_bos, bool) else None)


# --- GPT-2 vocab + merges ---------------------------------------------------------------------------------------


def _load_vocab_merges(path: Path) -> PreTrainedTokenizerFast:
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    candidates = [path.with_suffix(".merges.txt"), path.parent / "merges.txt", path.with_name(path.stem + ".bpe")]
    merges = next((p for p in candidates if p.exists()), None)
    if merges is None:
        raise TokenizerLoadError(f"no merges file found beside {path} (looked for {[c.name for c in candidates]})")
    backend = Tokenizer(models.BPE.from_file(str(path), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    if backend.token_to_id("<|endoftext|>") is not None:
        backend.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    return _wrap(backend, {}, None)


# --- SentencePiece ----------------------------------------------------------------------------------------------


def _load_sentencepiece(raw: bytes, where: str) -> PreTrainedTokenizerFast:
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    m = pb.ModelProto()
    try:
        m.ParseFromString(raw)
    except Exception as exc:
        raise TokenizerLoadError(f"{where}: not a SentencePiece model (protobuf parse failed: {exc})") from exc
    if len(m.pieces) == 0:
        raise TokenizerLoadError(f"{where}: not a SentencePiece model (no pieces)")
    ts, ns = m.trainer_spec, m.normalizer_spec
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    # piece types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte
    if not 0 <= ts.unk_id < len(pieces):
        raise TokenizerLoadError(f"{where}: SentencePiece unk_id {ts.unk_id} out of range")
    unk_piece = pieces[ts.unk_id][0]
    if ts.model_type == 2:  # BPE
        vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
        skip = {piece for piece, _, kind in pieces if kind in (2, 3, 6)}
        merges = _merges_from_scored_vocab(vocab, {p: sc for p, sc, _ in pieces}, skip)
        model = models.BPE(
            vocab=vocab, merges=merges, unk_token=unk_piece, fuse_unk=True, byte_fallback=ts.byte_fallback
        )
    elif ts.model_type == 1:  # UNIGRAM
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    else:
        raise TokenizerLoadError(f"{where}: SentencePiece model_type {ts.model_type} (WORD/CHAR) is not supported")
    backend = Tokenizer(model)
    # The "legacy" Llama layout (Prepend + Replace normalizer, no pre-tokenizer) reproduces spm exactly; a
    # Metaspace pre-tokenizer skips the dummy prefix when the text starts with a space, which spm never does.
    norms = []
    if ns.precompiled_charsmap and ns.name not in ("identity", ""):
        norms.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        norms += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norms.append(normalizers.Prepend("▁"))
    norms.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(norms)
    dec = [decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        dec += [decoders.ByteFallback()]
    dec += [decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec += [decoders.Strip(content=" ", left=1, right=0)]
    backend.decoder = decoders.Sequence(dec)
    backend.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, _, kind in pieces if kind in (2, 3)]
    )
    user = [AddedToken(p, special=False, normalized=False) for p, _, kind in pieces if kind == 4]
    if user:
        backend.add_tokens(user)
    roles: dict[str, str | None] = {}
    for role, idx in (("bos", ts.bos_id), ("eos", ts.eos_id), ("pad", ts.pad_id), ("unk", ts.unk_id)):
        roles[role] = pieces[idx][0] if 0 <= idx < len(pieces) else None
    return _wrap(backend, roles, roles["bos"] is not None)


def _merges_from_scored_vocab(
    vocab: dict[str, int], scores: dict[str, float], skip: set[str]
) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces, the
    piece with the higher score merging first (as spm does), ties by longer parts, then by ids (the order
    transformers uses, so the result matches the published tokenizer.json files)."""
    merges = []
    for token, rank in vocab.items():
        if token in skip or len(token) < 2:
            continue
        local = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            lr, rr = vocab.get(left), vocab.get(right)
            if lr is not None and rr is not None and left not in skip and right not in skip:
                local.append((lr, rr, left, right))
        local.sort()
        merges.extend((-scores[token], -len(left), -len(right), rank, lr, rr, left, right) for lr, rr, left, right in local)
    merges.sort()
    return [(m[-2], m[-1]) for m in merges]


# --- tiktoken ---------------------------------------------------------------------------------------------------

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]+=*\s+\d+\s*$")


def _looks_like_tiktoken(raw: bytes) -> bool:
    lines = raw[:4096].splitlines()[:8]
    return bool(lines) and all(_TIKTOKEN_LINE.match(line) for line in lines if line.strip())


def _load_tiktoken(raw: bytes, where: str) -> PreTrainedTokenizerFast:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except Exception as exc:
            raise TokenizerLoadError(f"{where}: bad tiktoken line {lineno}: {exc}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerLoadError(f"{where}: tiktoken ranks are not a permutation of 0..{len(ranks) - 1}")
    table = gpt2_byte_to_unicode()
    spell = {b: "".join(table[x] for x in b) for b in ranks}
    vocab = {spell[b]: r for b, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) < 2:
            continue
        local = []
        for i in range(1, len(token)):
            lr, rr = ranks.get(token[:i]), ranks.get(token[i:])
            if lr is not None and rr is not None:
                local.append((rank, lr, rr, i))
        for _, _, _, i in sorted(local):
            merges.append((rank, spell[token[:i]], spell[token[i:]]))
    merges.sort(key=lambda m: m[0])
    model = models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], fuse_unk=False, ignore_merges=True)
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    roles: dict[str, str | None] = {}
    if len(ranks) == 128000:  # Llama-3: its special tokens follow the ranks
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _LLAMA3_SPECIALS])
        roles = {"bos": "<|begin_of_text|>", "eos": "<|end_of_text|>", "pad": "<|finetune_right_pad_id|>", "unk": None}
    return _wrap(backend, roles, True if roles else None)


# --- GGUF -------------------------------------------------------------------------------------------------------


def _load_gguf(path: Path) -> PreTrainedTokenizerFast:
    from tokenizers import pre_tokenizers

    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
            get_gguf_tokenizer,
        )
    except ImportError:  # older/newer transformers layout: slow but general path
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        architecture, tokenizer_dict, config = get_gguf_tokenizer(str(path))
    except Exception as exc:
        raise TokenizerLoadError(f"{path}: cannot read the GGUF tokenizer metadata: {exc}") from exc
    if "tokens" not in tokenizer_dict:
        raise TokenizerLoadError(f"{path}: GGUF file has no tokenizer.ggml.tokens (no embedded tokenizer)")
    backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    if tokenizer_dict.get("pre_tokenizer_type") == "smollm":
        # llama.cpp's "smollm" pre-tokenizer: single digits first, then the GPT-2 regex (as SmolLM2's tokenizer.json).
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    roles = {role: config.get(f"{role}_token") for role in SPECIAL_ROLES}
    add_bos = config.get("add_bos_token")
    return _wrap(backend, roles, add_bos if isinstance(add_bos, bool) else None)


# ---------------------------------------------------------------------------------------------------------------
# Bundle: the canonical, hashable description of a tokenizer that travels to the alignment service.


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
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_str(json.dumps(bundle["tokenizer"]))
    except Exception as exc:
        raise TokenizerLoadError(f"tokenizer bundle holds no valid tokenizer: {exc}") from exc
    special = bundle.get("special", {})
    if not isinstance(special, dict):
        raise TokenizerLoadError("tokenizer bundle 'special' must map role -> id")
    roles: dict[str, str | None] = {}
    for role in SPECIAL_ROLES:
        token_id = special.get(role)
        roles[role] = backend.id_to_token(token_id) if isinstance(token_id, int) else None
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    for role, content in roles.items():
        if content is not None:
            setattr(tok, f"{role}_token", content)
    return tok  # the post-processor inside the bundle already says whether bos is added


_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_hash(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the canonical bundle. Memoized per tokenizer object (serializing a 262k vocabulary takes
    seconds); the memo is dropped if the special roles or the vocabulary size change."""
    stamp = (tuple(sorted(special_token_ids(tok).items())), tok.backend_tokenizer.get_vocab_size(with_added_tokens=True),
             id(tok.backend_tokenizer))
    try:
        cached = _HASHES.get(tok)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == stamp:
        return cached[1]
    digest = hashlib.sha256(tokenizer_bundle_bytes(tok)).hexdigest()
    try:
        _HASHES[tok] = (stamp, digest)
    except TypeError:
        pass
    return digest


# ---------------------------------------------------------------------------------------------------------------
# Encoding


@dataclass(frozen=True)
class EncodedPair:
    """One (prompt, response) sample as a party's model sees it.

    ids: token ids (bos included when the tokenizer adds one).
    ends: for each token, the character offset in prompt+response where it ends (0 for bos). A token that ends
        inside a character (a byte-fallback or byte-level piece of a multi-byte character) gets the end of that
        character, so all pieces of one character share its end offset.
    response_start: index of the first token that ends inside the response; tokens from here on are targets.
    response_bytes: UTF-8 byte length of the response (the denominator of bits-per-byte).
    truncated: tokens dropped to fit max_length (0 = the whole sample); see `encode_pair`.
    """

    ids: tuple[int, ...]
    ends: tuple[int, ...]
    response_start: int
    response_bytes: int
    truncated: int = 0

    @property
    def target_positions(self) -> range:
        """Positions t whose next-token prediction is a response token (t + 1 is a response token)."""
        return range(max(self.response_start - 1, 0), len(self.ids) - 1)


class _EncodeInfo:
    """Per-tokenizer facts encode_pair needs on every call, computed once."""

    def __init__(self, tok: PreTrainedTokenizerFast):
        import numpy as np

        self.bos = tok.bos_token_id
        self.adds_bos = _post_processor_adds_bos(tok)
        self.forms = normalized_forms_cached(tok)
        self.form_len = np.fromiter((len(f) for f in self.forms), dtype=np.int64, count=len(self.forms))
        self.space = space_marker(tok)
        probe = tok.backend_tokenizer.encode("a", add_special_tokens=False).ids
        # SentencePiece's dummy prefix: 'a' is read as ' a' (Llama-2, Mistral, Phi-3; not Gemma)
        self.dummy_prefix = bool(self.space) and b"".join(self.forms[i] for i in probe if i < len(self.forms)) == b" a"


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode_info(tok: PreTrainedTokenizerFast) -> _EncodeInfo:
    info = _INFO.get(tok)
    if info is None or info.bos != tok.bos_token_id:
        info = _INFO[tok] = _EncodeInfo(tok)
    return info


def adds_bos(tok: PreTrainedTokenizerFast) -> bool:
    """Whether this tokenizer's model expects a bos token in front of every text."""
    return _encode_info(tok).adds_bos


def _char_ends(info: _EncodeInfo, text: str, enc) -> list[int]:
    """Character end offset of every token.

    Exact path: the tokens' bytes (their normalized forms) concatenate to the text's UTF-8 bytes (after a
    SentencePiece dummy-prefix space); then ends come from cumulative byte counts, a token ending inside a
    character getting that character's end. Otherwise (a normalizer changed the text): the tokenizer's offsets.
    """
    import numpy as np

    ids = enc.ids
    forms = info.forms
    if forms is None or not ids or max(ids) >= len(forms):
        return [int(end) for _, end in enc.offsets]
    data = text.encode("utf-8")
    joined = b"".join([forms[i] for i in ids])
    if joined == data:
        skip = 0
    elif joined[:1] == b" " and joined[1:] == data:
        skip = 1
    else:
        return [int(end) for _, end in enc.offsets]
    cum = np.cumsum(info.form_len[np.asarray(ids)]) - skip
    np.clip(cum, 0, len(data), out=cum)
    if len(data) == len(text):  # ASCII: bytes are characters
        return cum.tolist()
    raw = np.frombuffer(data, dtype=np.uint8)
    starts = np.zeros(len(data) + 1, dtype=np.int64)  # starts[b] = characters beginning before byte b
    np.cumsum((raw & 0xC0) != 0x80, out=starts[1:])
    return starts[cum].tolist()


def _finish(info: _EncodeInfo, prompt: str, response: str, enc, max_length: int) -> EncodedPair:
    ids = list(enc.ids)
    ends = _char_ends(info, prompt + response, enc)
    bos = info.bos
    if bos is not None and info.adds_bos and (not ids or ids[0] != bos):
        ids.insert(0, bos)
        ends.insert(0, 0)
    prompt_len = len(prompt)
    response_start = next((i for i, e in enumerate(ends) if e > prompt_len), len(ids))
    n = len(ids)
    if n > max_length:
        head = 1 if ids and ids[0] == bos else 0
        # 1. the passage's end: its tokens are those ending at or before the question line (a token reaching
        # into that line stays with it), the bos and the passage's start are kept
        passage_stop = max(bisect.bisect_right(ends, passage_end(prompt), lo=head, hi=response_start), head)
        cut = min(n - max_length, passage_stop - head)
        del ids[passage_stop - cut : passage_stop], ends[passage_stop - cut : passage_stop]
        response_start -= cut
        # 2. still too long (no passage, or a long question): the prompt's start after bos, then the response's end
        more = min(len(ids) - max_length, max(response_start - head - 1, 0))
        del ids[head : head + more], ends[head : head + more]
        response_start -= more
        ids, ends = ids[:max_length], ends[:max_length]
    return EncodedPair(tuple(ids), tuple(ends), response_start, len(response.encode("utf-8")), n - len(ids))


def truncated_samples(pairs: Sequence[EncodedPair]) -> int:
    """How many encoded samples lost tokens to max_length (the `truncated_samples` metric)."""
    return sum(1 for p in pairs if p.truncated)


def encode_fragments(tok: PreTrainedTokenizerFast, texts: Sequence[str]) -> list[list[int]]:
    """Each text's token ids as the tokenizer encodes it inside running text: no bos, and no SentencePiece
    dummy-prefix space (a text's own leading space is kept). Llama-2 gives ' lens' -> '▁l' 'ens' and
    '.' -> '.' (a plain encode would give '▁' '▁l' 'ens' and '▁.'). Used to ask a receiver which of its tokens it
    would itself produce for a piece of text (`cotune.align.mined`)."""
    info = _encode_info(tok)
    backend = tok.backend_tokenizer
    texts = list(texts)
    if not info.dummy_prefix:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    out = []
    for text in texts:
        s = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(s)] if backend.pre_tokenizer is not None else [s]
        if pieces and "".join(pieces).replace(info.space, " ") == " " + text:
            pieces[0] = pieces[0][1:]  # the dummy prefix; the model then sees the text as it appears mid-text
            out.append([t.id for p in pieces if p for t in backend.model.tokenize(p)])
        else:  # the normalizer rewrote more than the prefix: the plain encoding
            out.append(backend.encode(text, add_special_tokens=False).ids)
    return out


def encode_pair(tok: PreTrainedTokenizerFast, prompt: str, response: str, max_length: int = 512) -> EncodedPair:
    """(prompt, response) as token ids with character end offsets, at most `max_length` tokens.

    Too long: the passage is cut from its END (`cotune.data.example.passage_end`: the text before the prompt's
    last '\nQuestion: ' line), so the passage keeps its beginning and the question line, the 'Answer:' cue and
    the response survive whole. Only if that is not enough (no passage, or a question and response longer than
    the budget) do the prompt's first tokens after bos go, then the response's last ones. `truncated` counts the
    tokens dropped."""
    enc = tok.backend_tokenizer.encode(prompt + response, add_special_tokens=False)
    return _finish(_encode_info(tok), prompt, response, enc, max_length)


def encode_pairs(
    tok: PreTrainedTokenizerFast, samples: Sequence[tuple[str, str]], max_length: int = 512
) -> list[EncodedPair]:
    """`encode_pair` for many samples at once (the tokenizer's batch encoder); identical results."""
    info = _encode_info(tok)
    texts = [p + r for p, r in samples]
    encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [_finish(info, p, r, enc, max_length) for (p, r), enc in zip(samples, encs)]
