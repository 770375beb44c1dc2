"""Multiple-choice scoring: the shared-prompt path (common token prefix run once, choices continued from its KV
cache) gives the per-choice reference's scores, for every architecture the project runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotune.align.tokenizers import encode_pair
from cotune.data.example import Example
from cotune.demo.tiny import make_tiny_model
from cotune.lm.evaluate import choice_loglikelihoods, evaluate_mc
from tests.unit.alignment_fixtures import tokenizer, tokenizer_path
from tests.unit.lm_fixtures import load_cached, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# arch -> the real tokenizer its tiny model runs (alignment_fixtures names)
ARCH_TOKENIZERS = {"llama": "mistral-hf", "gpt2": "gpt2", "gpt_neox": "neox", "gemma3": "gemma3"}

_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def _long_prompt(n: int, k: int) -> str:
    return "Context: " + " ".join(_WORDS[(i * 7 + k) % len(_WORDS)] for i in range(n)) + "\nAnswer:"


CRAFTED = [
    # choices sharing tokens after the prompt; one choice a token prefix of another
    Example("Question: Where did the cat sit?\nAnswer:", " the cat sat",
            choices=[" the cat sat", " the cat sat on the mat", " the cat ran away", " the dog"], label=1),
    Example("Question: Which letter?\nAnswer:", " x", choices=[" x", " y", " the x"], label=0),
    # boundary merges: the prompt's last characters and the choice's first ones tokenize together differently
    Example("Pick one: ab", "c", choices=["c", "cd", "cde", "", "c d"], label=2),
    Example("Q: naïve café?\nA:", " Ünïcödé", choices=[" Ünïcödé", " Ünï", " naïve — text\nwith a newline"], label=0),
    # prompts longer than the tiny Gemma's sliding window (64), of different lengths in one batch
    Example(_long_prompt(70, 1), " a", choices=[" a fox", " a dog jumps over " + " ".join(_WORDS[:20]), " seven"], label=1),
    Example(_long_prompt(150, 2), " a", choices=[" seven wizards", " seventy", " a lazy dog"], label=2),
    Example(_long_prompt(10, 3), " a", choices=[" fox", " dog"], label=0),
    # a single choice (scored by the per-choice fallback)
    Example("Only one:", " yes", choices=[" yes"], label=0),
]


def _arc():
    from cotune.data import load_task

    try:
        return load_task("arc_easy", "validation", limit=12)
    except (FileNotFoundError, OSError) as e:  # shared data absent
        pytest.skip(f"ARC-Easy shared data not found: {e}")


def _gpt_neox_dir(tok, out_dir):
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tok.save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def arc_items():
    return _arc()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    return {}, tmp_path_factory.mktemp("mc-tiny")


def _model(tiny_dirs, arch):
    dirs, root = tiny_dirs
    if arch not in dirs:
        tok = tokenizer(ARCH_TOKENIZERS[arch])  # skips where the shared tokenizer is absent
        if arch == "gpt_neox":
            dirs[arch] = _gpt_neox_dir(tok, root / arch)
        else:  # gemma3: 6 layers = 5 sliding-window layers and a full-attention one
            layers = 6 if arch == "gemma3" else 2
            dirs[arch] = make_tiny_model(tok, root / arch, arch=arch, hidden=32, heads=2, layers=layers, seed=7)
    return load_cached(dirs[arch])


def _assert_same(a, b, tol=1e-4):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(x, y, rtol=0, atol=tol)


@pytest.mark.parametrize("arch", list(ARCH_TOKENIZERS))
@pytest.mark.parametrize("max_length", [512, 24])
def test_shared_prompt_matches_per_choice(tiny_dirs, arc_items, arch, max_length):
    model, tok = _model(tiny_dirs, arch)
    items = arc_items + CRAFTED
    results = {}
    for bs in (1, 3):
        for mode in ("per_choice", "shared_prompt"):
            results[mode, bs] = choice_loglikelihoods(model, tok, items, batch_size=bs, max_length=max_length,
                                                      mc_scoring=mode)
            assert all(np.all(np.isfinite(x)) for x in results[mode, bs])
    ref = results["per_choice", 1]
    for key, lls in results.items():
        _assert_same(lls, ref)
    for bs in (1, 3):
        pc = evaluate_mc(model, tok, items, batch_size=bs, max_length=max_length, mc_scoring="per_choice")
        sp = evaluate_mc(model, tok, items, batch_size=bs, max_length=max_length, mc_scoring="shared_prompt")
        assert pc == sp
        assert sp["n"] == len(items)


def test_crafted_items_share_tokens_past_the_prompt():
    """The crafted items exercise a common prefix that reaches into the choices (targets inside the prefix)."""
    tok = tokenizer("mistral-hf")
    pairs = [encode_pair(tok, CRAFTED[0].prompt, c, 512) for c in CRAFTED[0].choices]
    common = 0
    while all(len(p.ids) > common and p.ids[common] == pairs[0].ids[common] for p in pairs):
        common += 1
    assert common > min(p.response_start for p in pairs)


def test_shared_prompt_with_lora_and_training_mode_kept(tiny_dirs, arc_items):
    from cotune.lm.lora import attach_lora

    model, tok = _model(tiny_dirs, "llama")
    peft = attach_lora(model, dropout=0.0, seed=1)
    with torch.no_grad():  # a non-zero adapter, so the LoRA path matters
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft.train()
    a = choice_loglikelihoods(peft, tok, arc_items[:6] + CRAFTED, batch_size=4, mc_scoring="per_choice")
    b = choice_loglikelihoods(peft, tok, arc_items[:6] + CRAFTED, batch_size=4, mc_scoring="shared_prompt")
    _assert_same(a, b)
    assert peft.training


def test_unknown_mc_scoring_is_refused(tiny_dirs):
    model, tok = _model(tiny_dirs, "llama")
    with pytest.raises(ValueError, match="mc_scoring"):
        evaluate_mc(model, tok, CRAFTED, mc_scoring="tree")


def test_party_config_validates_mc_scoring(tmp_path):
    from cotune.config import ConfigError, PartyConfig

    cfg = PartyConfig(party_id="p", workdir=str(tmp_path))
    assert cfg.evaluation.mc_scoring == "shared_prompt"
    cfg.evaluation.mc_scoring = "tree"
    with pytest.raises(ConfigError, match="evaluation.mc_scoring"):
        cfg.validate("slm")


def test_tokenizer_paths_are_known():
    for name in ARCH_TOKENIZERS.values():
        tokenizer_path(name)  # skips (does not fail) where the shared data is absent


@pytest.mark.parametrize("mode", ["per_choice", "shared_prompt"])
def test_progress_counts_items_up_to_their_number(tiny_dirs, arc_items, mode):
    """Progress is reported in items (not in phases of the task): it never goes back and ends at the item count."""
    model, tok = _model(tiny_dirs, "llama")
    items = arc_items[:7] + CRAFTED
    seen = []
    choice_loglikelihoods(model, tok, items, batch_size=3, mc_scoring=mode,
                          progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 2 and all(total == len(items) for _, total in seen)
    done = [d for d, _ in seen]
    assert done == sorted(done) and done[-1] == len(items) and done[0] < len(items)
