"""Context truncation (`encode_pair` at max_length): the passage is cut from its END, so the passage keeps its
beginning and the question line, the 'Answer:' cue and the response survive whole; truncations are counted
(`EncodedPair.truncated`, `truncated_samples`, the trainers' `truncated_samples` metric)."""

from __future__ import annotations

import functools

import pytest

from cotune.align.normalize import control_mask
from cotune.align.tokenizers import encode_pair, encode_pairs, truncated_samples
from cotune.data import load_task
from cotune.data.example import passage_end
from tests.unit.alignment_fixtures import forms, tokenizer


@functools.cache
def _control(name: str):
    return control_mask(tokenizer(name))


def _text(name: str, ids) -> bytes:
    """The bytes a token sequence spells, control tokens (bos) left out."""
    f, control = forms(name), _control(name)
    return b"".join(f[i] for i in ids if not control[i])


@pytest.mark.parametrize("task", ["boolq", "sciq"])
@pytest.mark.parametrize("name", ["gpt2", "llama2"])
def test_question_and_answer_survive_at_256_tokens(task, name):
    examples = load_task(task, "validation")
    pairs = encode_pairs(tokenizer(name), [(e.prompt, e.response) for e in examples], 256)
    cut = 0
    for e, p in zip(examples, pairs):
        assert len(p.ids) <= 256
        text = _text(name, p.ids)
        end = passage_end(e.prompt)
        # the question line, the cue and the answer, whole and in order, end every encoded item
        assert text.endswith((e.prompt[end:] + e.response).encode()), (task, name, e.prompt[end:])
        assert p.ids[p.response_start:] and text[-len(e.response.encode()):] == e.response.encode()
        if p.truncated:
            cut += 1
            assert end > 0  # only passages are cut here
            # ... from their end: the passage's first 100 characters are still the start of the text
            assert text.removeprefix(b" ").startswith(e.prompt[:100].encode()), (task, name)
            assert len(p.ids) == 256
    assert cut == truncated_samples(pairs) == sum(p.truncated > 0 for p in pairs)
    print(f"\n{task} validation, {name}, 256 tokens: {cut} of {len(examples)} items truncated "
          f"({cut / len(examples):.3f})")
    assert 0.03 < cut / len(examples) < 0.2


def test_passage_end_marks_the_passage_of_every_template():
    boolq, sciq, arc = (load_task(t, "validation", limit=20) for t in ("boolq", "sciq", "arc_easy"))
    for e in boolq + [x for x in sciq if not x.prompt.startswith("Question: ")]:
        end = passage_end(e.prompt)
        assert end > 0 and e.prompt[end:].startswith("\nQuestion: ") and e.prompt[end:].endswith("\nAnswer:")
        assert "\nQuestion: " not in e.prompt[end + 1:]
    assert all(passage_end(e.prompt) == 0 for e in arc)  # no passage: all question


def test_without_a_passage_the_prompt_start_goes_and_the_response_stays():
    tok = tokenizer("gpt2")
    enc = encode_pair(tok, "word " * 300, " the answer", max_length=64)
    assert len(enc.ids) == 64 and enc.truncated == len(encode_pair(tok, "word " * 300, " the answer", 10**6).ids) - 64
    text = _text("gpt2", enc.ids)
    assert text.endswith(b"word word  the answer") and text.startswith(b" word")  # the first 'word' went
    # a response longer than the budget keeps its start, and the prompt its last token (':', which predicts it)
    prompt = "Passage here.\nQuestion: q?\nAnswer:"
    enc = encode_pair(tok, prompt, " yes" * 100, max_length=16)
    assert len(enc.ids) == 16 and enc.response_start == 1
    assert enc.truncated == len(encode_pair(tok, prompt, " yes" * 100, 10**6).ids) - 16
    assert _text("gpt2", enc.ids) == b":" + b" yes" * 15
    short = encode_pair(tok, prompt, " yes", max_length=64)
    assert short.truncated == 0


def test_passage_cut_is_a_head_and_a_tail_of_the_full_encoding():
    tok = tokenizer("llama2")
    prompt = "The first sentence stays. " + "filler words " * 80 + "\nQuestion: does it stay?\nAnswer:"
    full = encode_pair(tok, prompt, " yes", max_length=10**6)
    enc = encode_pair(tok, prompt, " yes", max_length=40)
    assert len(enc.ids) == 40 and enc.truncated == len(full.ids) - 40
    h = next(i for i in range(40) if enc.ids[i:] == full.ids[len(full.ids) - 40 + i:])  # kept: full[:h] + a tail
    assert enc.ids[:h] == full.ids[:h] and enc.ends == full.ends[:h] + full.ends[len(full.ids) - 40 + h:]
    assert h > 5  # bos and the passage's start
    first_tail = len(full.ids) - 40 + h
    assert full.ends[first_tail - 1] <= passage_end(prompt)  # the tail holds the whole question line
    assert enc.response_start == full.response_start - enc.truncated
    assert enc.target_positions == range(enc.response_start - 1, 39)


def test_trainer_reports_truncated_samples(tmp_path):
    from transformers import AutoModelForCausalLM

    from cotune.data.example import Example
    from cotune.demo.tiny import make_tiny_model
    from cotune.lm.lora import attach_lora
    from cotune.lm.train import TrainConfig, Trainer

    tok = tokenizer("gpt2")
    make_tiny_model(tok, tmp_path / "m", hidden=16, layers=1, seed=0)
    model = attach_lora(AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")), r=2, alpha=4, dropout=0.0)
    trainer = Trainer(model, tok, TrainConfig(lr=1e-3, batch_size=2, max_length=24))
    long = Example(prompt="A long passage. " * 20 + "\nQuestion: why?\nAnswer:", response=" because")
    short = Example(prompt="Question: why?\nAnswer:", response=" because")
    m = trainer.train_ce([long, short, long], epochs=1)
    assert m["truncated_samples"] == 2
