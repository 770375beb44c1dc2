"""Top-k extraction, bits-per-byte loss, collate, and multiple-choice / loss evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cotune.align.tokenizers import encode_pair
from cotune.data.example import Example
from cotune.demo.tiny import make_tiny_model
from cotune.lm.batching import collate
from cotune.lm.evaluate import evaluate_loss, evaluate_mc
from cotune.lm.logits import public_topk
from cotune.lm.lora import attach_lora
from cotune.lm.model import load_causal_lm
from cotune.lm.train import TrainConfig, Trainer
from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer

pytestmark = needs_tokenizer

EXAMPLES = [
    Example("Question: Which planet is known as the red planet?\nAnswer:", " Mars"),
    Example("Q: naïve café?\nA:", " Ünïcödé — text\nwith a newline"),
    Example("Short:", " x"),
    Example("A much longer prompt that goes on for a while so that padding matters in the batch.\nAnswer:", " yes"),
]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    d = make_tiny_model(tok, tmp_path_factory.mktemp("tiny") / "gpt2", arch="gpt2", hidden=32, heads=2, seed=5)
    model, tok = load_causal_lm(d, device="cpu", dtype="fp32")
    return attach_lora(model, dropout=0.0), tok


def _direct_logprobs(model, tok, ex):
    pair = encode_pair(tok, ex.prompt, ex.response, 512)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([pair.ids])).logits[0].float()
    return pair, torch.log_softmax(logits, -1)


def test_collate_right_pads_and_labels_only_response():
    from cotune.align.tokenizers import EncodedPair

    a = EncodedPair(ids=(1, 10, 11, 12), ends=(0, 2, 4, 6), response_start=2, response_bytes=4)
    b = EncodedPair(ids=(1, 20), ends=(0, 2), response_start=1, response_bytes=2)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12], [1, 20, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 11, 12], [-100, 20, -100, -100]]


def test_public_topk_positions_logprobs_and_bpb(lm):
    model, tok = lm
    k = 5
    out = public_topk(model, tok, EXAMPLES, k=k, batch_size=3)
    assert len(out) == len(EXAMPLES)
    for ex, sl in zip(EXAMPLES, out):
        pair, logp = _direct_logprobs(model, tok, ex)
        positions = list(pair.target_positions)
        assert sl.positions.tolist() == positions and sl.positions.dtype == np.int32
        assert sl.ids.shape == (len(positions), k) and sl.ids.dtype == np.int32
        vals, ids = torch.topk(logp[positions], k, dim=-1)
        np.testing.assert_allclose(sl.logprobs, vals.numpy(), rtol=1e-4, atol=1e-4)
        assert (sl.ids == ids.numpy()).mean() > 0.95  # ties in a random model may reorder
        # loss_bpb: sum of response-token CE in nats / ln 2 / response bytes
        nats = -sum(float(logp[t, pair.ids[t + 1]]) for t in positions)
        expected = nats / math.log(2) / len(ex.response.encode("utf-8"))
        assert sl.loss_bpb == pytest.approx(expected, rel=1e-4)
        assert np.all(sl.missing_mass >= 0)


def test_public_topk_is_independent_of_batching(lm):
    model, tok = lm
    one = public_topk(model, tok, EXAMPLES, k=3, batch_size=1)
    many = public_topk(model, tok, EXAMPLES, k=3, batch_size=4)
    for a, b in zip(one, many):
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-4, atol=1e-5)
        assert a.loss_bpb == pytest.approx(b.loss_bpb, rel=1e-4)


def test_evaluate_loss_matches_direct_computation(lm):
    model, tok = lm
    res = evaluate_loss(model, tok, EXAMPLES, batch_size=2)
    nats = tokens = nbytes = 0
    for ex in EXAMPLES:
        pair, logp = _direct_logprobs(model, tok, ex)
        nats -= sum(float(logp[t, pair.ids[t + 1]]) for t in pair.target_positions)
        tokens += len(pair.target_positions)
        nbytes += pair.response_bytes
    assert res["loss"] == pytest.approx(nats / tokens, rel=1e-4)
    assert res["perplexity"] == pytest.approx(math.exp(nats / tokens), rel=1e-3)
    assert res["bpb"] == pytest.approx(nats / math.log(2) / nbytes, rel=1e-4)


def test_evaluate_mc_picks_the_trained_choice(tmp_path):
    from cotune.align.tokenizers import load_tokenizer

    d = make_tiny_model(load_tokenizer(TOKENIZER), tmp_path / "llama", arch="llama", hidden=32, heads=2)
    model, tok = load_causal_lm(d, device="cpu", dtype="fp32")
    model = attach_lora(model, dropout=0.0)
    # Choices of equal byte length, so accuracy and accuracy_norm agree.
    mc = [
        Example("Q: What color is the sky?\nA:", " gray", (" blue", " gray"), 1),
        Example("Q: What do cows drink?\nA:", " milk", (" milk", " wine"), 0),
        Example("Q: Capital of France?\nA:", " Rome", (" Lyon", " Rome"), 1),
    ]
    Trainer(model, tok, TrainConfig(lr=2e-2, batch_size=3, epochs=25)).train_ce(mc)
    res = evaluate_mc(model, tok, mc + [Example("no choices", " x")], batch_size=2)
    assert res == {"accuracy": 1.0, "accuracy_norm": 1.0, "n": 3}
    flipped = [Example(e.prompt, e.response, e.choices, 1 - e.label) for e in mc]
    assert evaluate_mc(model, tok, flipped)["accuracy"] == 0.0
