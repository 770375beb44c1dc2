"""Greedy generation (cotune.lm.generate): the KV-cached, left-padded batched decoder gives exactly the tokens of a
step-by-step argmax loop over the full sequence; batching, stop sequences, end-of-sequence tokens, max_new_tokens and
prompt truncation behave as documented; PeftModels and bf16 models work."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from cotune.data import shared_data_dir
from tests.unit.lm_fixtures import one_thread  # noqa: F401  (the module's autouse fixture below)

SHARED = shared_data_dir() or Path("shared-data-not-found")
TOKENIZERS = {"gpt2": "gpt2/gpt2.vocab", "mistral": "mistral-7b-hf/tokenizer.json"}
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (SHARED / "tokenizers" / TOKENIZERS["mistral"]).exists(),
                       reason="shared tokenizer data not found"),
]

PROMPTS = [
    "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?\nAnswer:",
    "Hi",
    "Dialogue:\n#Person1#: Hello, how are you doing today?\n#Person2#: Fine, thanks.\nSummary:",
    "Question: 2+2?\nAnswer:",
    "A somewhat longer prompt that has a few more words in it than the others do.",
]


@functools.cache
def _tokenizer(name: str):
    from cotune.align.tokenizers import load_tokenizer

    return load_tokenizer(SHARED / "tokenizers" / TOKENIZERS[name])


@functools.cache
def _model_dir(name: str, arch: str) -> Path:
    import tempfile

    from cotune.demo.tiny import make_tiny_model

    out = Path(tempfile.mkdtemp(prefix=f"gen-{name}-{arch}-"))
    return make_tiny_model(_tokenizer(name), out, arch=arch, hidden=32, layers=2, heads=4, seed=3)


def _model(name: str, arch: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(_model_dir(name, arch))).eval()


def _reference(model, tok, prompt: str, max_new_tokens: int, max_length: int = 512) -> list[int]:
    """Greedy decoding without a cache: the full sequence through the model at every step, argmax of the last
    position's logits."""
    from cotune.align.tokenizers import encode_pair

    ids = list(encode_pair(tok, prompt, "", max_length).ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
            out.append(int(logits.argmax()))
    return out


CASES = [("gpt2", "gpt2"), ("mistral", "llama"), ("mistral", "gemma3")]


@pytest.mark.parametrize("name,arch", CASES)
def test_greedy_equals_a_step_by_step_argmax_loop(name, arch):
    from cotune.lm.generate import generate

    model, tok = _model(name, arch), _tokenizer(name)
    gens = generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=len(PROMPTS))
    for prompt, g in zip(PROMPTS, gens):
        ref = _reference(model, tok, prompt, 10)
        assert list(g.ids) == ref, (arch, prompt)
        assert g.finish == "length" and g.tokens == 10


@pytest.mark.parametrize("name,arch", CASES)
def test_batched_equals_unbatched_with_left_padding(name, arch):
    from cotune.lm.generate import generate

    model, tok = _model(name, arch), _tokenizer(name)
    one = [generate(model, tok, [p], max_new_tokens=12)[0] for p in PROMPTS]
    for bs in (2, len(PROMPTS)):
        assert generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=bs) == one, bs
    assert len({len(g.ids) for g in one}) == 1
    # the prompts really differ in length: the batch is left-padded
    from cotune.align.tokenizers import encode_pair

    assert len({len(encode_pair(tok, p, "").ids) for p in PROMPTS}) == len(PROMPTS)


def test_text_is_the_continuation_as_it_reads_after_the_prompt():
    from cotune.align.tokenizers import encode_pair
    from cotune.lm.generate import generate

    for name, arch in (("gpt2", "gpt2"), ("mistral", "llama")):
        model, tok = _model(name, arch), _tokenizer(name)
        for prompt, g in zip(PROMPTS, generate(model, tok, PROMPTS, max_new_tokens=8)):
            full = tok.decode(list(encode_pair(tok, prompt, "").ids) + list(g.ids), skip_special_tokens=True)
            assert full.endswith(g.text) and full[: len(full) - len(g.text)].rstrip() == prompt.rstrip(), (arch, prompt)


def test_stop_sequences_cut_the_text_and_end_the_row():
    from cotune.lm.generate import cut_at_stop, generate

    model, tok = _model("gpt2", "gpt2"), _tokenizer("gpt2")
    free = generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=3)
    # a stop sequence taken from the middle of one row's free text; the other rows are not affected unless they hold it
    row = next(i for i, g in enumerate(free) if len(g.text) > 12)
    stop = free[row].text[6:9]
    assert stop.strip()
    stopped = generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=3, stop=[stop, "never-seen-xyz"])
    for g, s in zip(free, stopped):
        want, hit = cut_at_stop(g.text, [stop])
        assert s.text == want and stop not in s.text
        if hit:
            assert s.finish == "stop" and s.ids == g.ids[: s.tokens] and s.tokens < 16
            assert stop in tok.decode(list(s.ids)) and stop not in tok.decode(list(s.ids[:-1]))  # ends as soon as seen
        else:
            assert s == g
    assert stopped[row].finish == "stop" and len(stopped[row].text) <= 6
    assert cut_at_stop("a\n\nb\nQuestion: c", ["\nQuestion:", "\n\n"]) == ("a", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)


def test_max_new_tokens_and_end_of_sequence():
    from cotune.lm.generate import generate

    model, tok = _model("mistral", "llama"), _tokenizer("mistral")
    for n in (1, 3, 7):
        gens = generate(model, tok, PROMPTS, max_new_tokens=n, batch_size=2)
        assert all(g.tokens == n and g.finish == "length" for g in gens)
    free = generate(model, tok, PROMPTS[:1], max_new_tokens=6)[0]
    # make the model's third token its end-of-sequence token: the row ends there, without it
    model.config.eos_token_id = [tok.eos_token_id, free.ids[2]]
    first = free.ids.index(free.ids[2])
    g = generate(model, tok, PROMPTS[:1], max_new_tokens=6)[0]
    assert g.finish == "eos" and g.ids == free.ids[:first]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tok, PROMPTS, max_new_tokens=0)


def test_long_prompt_is_cut_like_encode_pair_keeping_the_summary_line():
    from cotune.align.tokenizers import encode_pair
    from cotune.lm.generate import generate, prompt_budget

    model, tok = _model("gpt2", "gpt2"), _tokenizer("gpt2")
    prompt = "Dialogue:\n" + "#Person1#: we talk and talk.\n" * 60 + "#Person2#: the end.\nSummary:"
    g = generate(model, tok, [prompt], max_new_tokens=5, max_length=48)[0]
    cut = encode_pair(tok, prompt, "", 48)
    assert cut.truncated > 0 and len(cut.ids) == 48
    kept = tok.decode(list(cut.ids))  # the dialogue's end went; its start and the summary line stay
    assert kept.startswith("Dialogue:\n#Person1#: we talk") and kept.endswith("talk\nSummary:")
    assert "the end" not in kept
    ids = list(cut.ids)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    assert list(g.ids) == ids[48:]
    assert prompt_budget(model, 512, 256) == 512
    assert prompt_budget(model, 4096, 256) == 2048 - 256  # the tiny model has 2,048 positions
    with pytest.raises(ValueError, match="no room"):
        prompt_budget(model, 512, 2048)


def test_peft_and_bf16_models_and_progress():
    from cotune.lm.generate import generate
    from cotune.lm.lora import attach_lora

    tok = _tokenizer("mistral")
    peft = attach_lora(_model("mistral", "llama"), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # a non-zero adapter, so it changes what the model generates
        torch.manual_seed(0)
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.eval()
    calls = []
    gens = generate(peft, tok, PROMPTS, max_new_tokens=6, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    for prompt, g in zip(PROMPTS, gens):
        assert list(g.ids) == _reference(peft, tok, prompt, 6)
    base = generate(_model("mistral", "llama"), tok, PROMPTS, max_new_tokens=6, batch_size=2)
    assert [g.ids for g in gens] != [g.ids for g in base]
    assert peft.training is False
    peft.train()
    generate(peft, tok, PROMPTS[:1], max_new_tokens=2)
    assert peft.training is True  # the mode is restored

    bf16 = _model("mistral", "llama").to(torch.bfloat16)
    a = generate(bf16, tok, PROMPTS, max_new_tokens=6, batch_size=5)
    assert a == generate(bf16, tok, PROMPTS, max_new_tokens=6, batch_size=5)  # deterministic
    assert all(g.tokens == 6 for g in a)


def test_evaluate_generation_scores_what_it_generates():
    from cotune.data.example import Example
    from cotune.lm.generate import evaluate_generation, generate
    from cotune.lm.scoring import rouge_l

    model, tok = _model("gpt2", "gpt2"), _tokenizer("gpt2")
    free = generate(model, tok, PROMPTS[:3], max_new_tokens=8)
    # references: the model's own text for the first item (ROUGE-L 1), unrelated words for the others
    examples = [Example(PROMPTS[0], free[0].text), Example(PROMPTS[1], " zebra quantum"),
                Example(PROMPTS[2], " " + free[2].text.split()[0] + " else")]
    out = evaluate_generation(model, tok, examples, metric="rouge_l", max_new_tokens=8)
    want = [rouge_l(g.text, ex.response) for g, ex in zip(free, examples)]
    assert want[0] == 1.0 and out["score"] == pytest.approx(sum(want) / 3) and out["n"] == 3
    assert out["generated_tokens"] == 24 and out["stopped"] == 0
    assert evaluate_generation(model, tok, [], metric="rouge_l", max_new_tokens=8)["n"] == 0
    with pytest.raises(ValueError, match="metric"):
        evaluate_generation(model, tok, examples, metric="bleu", max_new_tokens=8)
