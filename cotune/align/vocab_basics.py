"""Two facts about a tokenizer's vocabulary that both tokenizer loading and byte normalization need: the GPT-2
byte-level alphabet and the ids of the special tokens by role. Kept apart so that neither module imports the other."""

from __future__ import annotations

SPECIAL_ROLES = ("bos", "eos", "pad", "unk")


def gpt2_byte_to_unicode() -> dict[int, str]:
    """The GPT-2 reversible byte -> printable unicode character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def special_token_ids(tok) -> dict[str, int]:
    """{role: id} of the bos/eos/pad/unk tokens this tokenizer defines."""
    out = {}
    for role in SPECIAL_ROLES:
        value = getattr(tok, f"{role}_token_id", None)
        if value is not None:
            out[role] = int(value)
    return out
