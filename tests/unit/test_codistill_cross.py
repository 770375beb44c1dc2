"""FedCoLLM across tokenizers (cotune/algorithms/fedcollm/losses_cross.py): tiny random-init models with two real tokenizers (GPT-2
for the LLM f, Mistral for the SLM copy g), MinED maps built once per module, real ARC-Easy samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cotune.algorithms.fedcollm.losses_cross import co_distill_cross, project_topk_torch, projected_kl, sparse_kl
from cotune.align.projection import project_topk
from cotune.lm.losses import kl_full
from tests.unit.alignment_fixtures import tokenizer

# --------------------------------------------------------------------------------------------- projection, KL


def _dense(ids: np.ndarray, probs: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros((ids.shape[0], n), np.float64)
    for r in range(ids.shape[0]):
        for i, p in zip(ids[r], probs[r]):
            if i >= 0 and p > 0:
                out[r, i] += p
    return out


def test_projection_merges_duplicates_and_drops_out_of_range_ids():
    table = torch.tensor([3, 1, 3, 0, 2])
    ids = torch.tensor([[0, 2, 1, 7, -1], [4, 4, 9, 3, 1]])
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.2, 0.1], [0.25, 0.25, 0.3, 0.1, 0.1]])
    out_ids, out_p = project_topk_torch(ids, probs, table)
    # row 0: src 0 and 2 both land on 3 (0.6), src 1 on 1 (0.1); 7 and -1 are dropped; renormalized over 0.7
    assert out_ids[0].tolist() == [1, 3, -1, -1, -1]
    torch.testing.assert_close(out_p[0], torch.tensor([0.1 / 0.7, 0.6 / 0.7, 0, 0, 0]))
    # row 1: the duplicate src id 4 merges with itself, 9 is dropped, 3 -> 0, 1 -> 1
    assert out_ids[1].tolist() == [0, 1, 2, -1, -1]
    torch.testing.assert_close(out_p[1], torch.tensor([0.1 / 0.7, 0.1 / 0.7, 0.5 / 0.7, 0, 0]))
    dropped_ids, dropped_p = project_topk_torch(torch.tensor([[7, -3]]), torch.tensor([[0.5, 0.5]]), table)
    assert dropped_ids.tolist() == [[-1, -1]] and dropped_p.sum() == 0


def test_projection_agrees_with_the_numpy_projection():
    rng = np.random.default_rng(0)
    table = rng.integers(0, 40, 200).astype(np.int32)  # many-to-one: lots of merges
    ids = rng.integers(-5, 210, (64, 16))
    probs = rng.dirichlet(np.ones(16), 64).astype(np.float32) * 0.9
    ref_ids, ref_p, _ = project_topk(ids, probs, table)
    out_ids, out_p = project_topk_torch(torch.from_numpy(ids), torch.from_numpy(probs), torch.from_numpy(table).long())
    np.testing.assert_allclose(_dense(out_ids.numpy(), out_p.numpy(), 40), _dense(ref_ids, ref_p, 40), atol=1e-6)
    # each row: distinct ids ascending, then padding
    for row in out_ids.tolist():
        real = [i for i in row if i >= 0]
        assert real == sorted(set(real)) and row[: len(real)] == real


def test_sparse_kl_is_a_true_kl_with_gradient_to_the_student_only():
    torch.manual_seed(0)
    student = torch.randn(5, 30, requires_grad=True)
    teacher = torch.randn(5, 30)
    # full support: the ordinary KL(teacher ‖ student)
    full = torch.arange(30).expand(5, 30)
    kl = sparse_kl(student, full, teacher.softmax(-1))
    torch.testing.assert_close(kl.mean(), kl_full(teacher, student))
    # sparse support with padding: Σ t (log t − log q) over the support, >= 0, 0 when the student equals t
    ids = torch.tensor([[3, 7, -1]] * 5)
    t = torch.tensor([[0.75, 0.25, 0.0]] * 5)
    kl = sparse_kl(student, ids, t)
    logq = student.log_softmax(-1)
    torch.testing.assert_close(kl, (t[:, :2] * (t[:, :2].log() - logq[:, [3, 7]])).sum(-1))
    assert (kl > 0).all()
    exact = torch.full((5, 30), -1e4)
    exact[:, 3], exact[:, 7] = np.log(0.75), np.log(0.25)
    assert sparse_kl(exact, ids, t).abs().max() < 1e-5
    kl.sum().backward()
    assert student.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from cotune.align.mined import build_vocab_map
    from cotune.data import load_task
    from cotune.demo.tiny import make_tiny_model

    f_tok, g_tok = tokenizer("gpt2"), tokenizer("mistral-hf")
    root = tmp_path_factory.mktemp("cross")
    make_tiny_model(f_tok, root / "f", hidden=64, layers=2, seed=1)
    make_tiny_model(g_tok, root / "g", hidden=32, layers=1, seed=2)
    make_tiny_model(f_tok, root / "g_same_tok", hidden=32, layers=1, seed=2)
    return {"f_tok": f_tok, "g_tok": g_tok, "root": root,
            "f2g": build_vocab_map(f_tok, g_tok), "g2f": build_vocab_map(g_tok, f_tok),
            "examples": load_task("arc_easy", "train", limit=8)}


def _trainer(world, name: str, tok, lr: float = 1e-2):
    from transformers import AutoModelForCausalLM

    from cotune.lm.lora import attach_lora
    from cotune.lm.train import TrainConfig, Trainer

    model = attach_lora(AutoModelForCausalLM.from_pretrained(str(world["root"] / name)), r=4, alpha=8, dropout=0.0)
    return Trainer(model, tok, TrainConfig(lr=lr, batch_size=4, max_length=128))


def _pair(world):
    f = _trainer(world, "f", world["f_tok"])
    g = _trainer(world, "g", world["g_tok"])
    return f, g, f.encode(world["examples"]), g.encode(world["examples"])


def _peak(*pairs):
    """Sharpen tiny random models' next-token distributions (scale the final norm): a flat model's top-k is noise no
    student can follow, so a KL towards it does not move."""
    for trainer, scale in pairs:
        final_norm = next(p for n, p in trainer.model.named_parameters() if n.endswith("model.norm.weight"))
        final_norm.data.mul_(scale)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_co_distill_cross_lowers_both_kls(world, direction):
    f, g, fp, gp = _pair(world)
    _peak((f, 6.0), (g, 3.0))
    m = co_distill_cross(f, g, fp, gp, f2g=world["f2g"], g2f=world["g2f"], lam=20.0, epochs=4, batch_size=4,
                         direction=direction)
    assert m["steps"] == 8 and m["samples"] == 8 and m["stopped"] == 0.0
    assert m["positions"] > 0 and 0 < m["aligned_fraction"] <= 1
    assert m["llm_kl_after"] < m["llm_kl_before"], m  # the LLM's KD term: KL(g̃ ‖ f) forward
    assert m["slm_kl_after"] < m["slm_kl_before"], m  # the SLM's KD term: KL(f̃ ‖ g) forward
    assert m["slm_loss_last"] < m["slm_loss_first"] and m["llm_loss_last"] < m["llm_loss_first"], m
    # co_distill's keys, so the caller can swap one for the other
    for side in ("llm", "slm"):
        for k in ("ce_before", "ce_after", "kl_before", "kl_after", "loss_first", "loss_last"):
            assert np.isfinite(m[f"{side}_{k}"]), (side, k)


def test_each_half_step_moves_only_its_own_model(world):
    f, g, fp, gp = _pair(world)
    models = {"f": f.model, "g": g.model}

    def params(model):
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    def grads(model):
        return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    state = {"grads_after": {"f": grads(f.model), "g": grads(g.model)}}
    order = []

    def hooks(me: str, other: str):
        def pre(*_):
            order.append(me)
            state["pre"] = {k: params(m) for k, m in models.items()}
            # my backward reached my LoRA ...
            assert any(gr is not None and gr.abs().sum() > 0 for gr in grads(models[me]).values()), me
            # ... and left the other model's gradients as its own last step left them
            for n, gr in grads(models[other]).items():
                last = state["grads_after"][other][n]
                assert (gr is None and last is None) or torch.equal(gr, last), (me, other, n)

        def post(*_):
            after = {k: params(m) for k, m in models.items()}
            assert all(torch.equal(v, state["pre"][other][n]) for n, v in after[other].items()), f"{me} moved {other}"
            trainable = {n for n, p in models[me].named_parameters() if p.requires_grad}
            assert any(not torch.equal(after[me][n], state["pre"][me][n]) for n in trainable), f"{me} did not move"
            assert all(torch.equal(v, state["pre"][me][n]) for n, v in after[me].items() if n not in trainable)
            state["grads_after"][me] = grads(models[me])
        return pre, post

    for trainer, me, other in ((f, "f", "g"), (g, "g", "f")):
        pre, post = hooks(me, other)
        trainer.optimizer.register_step_pre_hook(pre)
        trainer.optimizer.register_step_post_hook(post)
    m = co_distill_cross(f, g, fp, gp, f2g=world["f2g"], g2f=world["g2f"], lam=5.0, epochs=1, batch_size=4)
    assert order == ["g", "f"] * m["steps"] and m["steps"] == 2  # g first, then f against the updated g


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_projected_kl_directions_with_full_support(direction):
    """Full support (identity map, every id): forward = KL(teacher ‖ student), reverse = KL(student ‖ teacher), as
    co_distill's full-vocabulary terms; on a sparse support the reverse KL is the student's distribution restricted
    to the support (renormalized) against the target."""
    torch.manual_seed(0)
    student = torch.randn(5, 30, requires_grad=True)
    teacher = torch.randn(5, 30)
    full = torch.arange(30).expand(5, 30)
    kl = projected_kl(student, full, teacher.softmax(-1), direction)
    want = kl_full(teacher, student) if direction == "forward" else kl_full(student, teacher)
    torch.testing.assert_close(kl.mean(), want)
    kl.sum().backward()
    assert student.grad.abs().sum() > 0
    ids, t = torch.tensor([[3, 7, -1]] * 5), torch.tensor([[0.75, 0.25, 0.0]] * 5)
    sparse = projected_kl(student.detach(), ids, t, direction)
    if direction == "reverse":
        q = student.detach().softmax(-1)[:, [3, 7]]
        q = q / q.sum(-1, keepdim=True)
        torch.testing.assert_close(sparse, (q * (q.log() - t[:, :2].log())).sum(-1))
    else:
        torch.testing.assert_close(sparse, sparse_kl(student.detach(), ids, t))
    with pytest.raises(ValueError, match="forward, reverse"):
        projected_kl(student, ids, t, "sideways")


@pytest.mark.parametrize("direction, lam", [("forward", 0.0), ("forward", 1.0), ("reverse", 1.0)])
def test_identity_maps_reproduce_co_distill(world, direction, lam):
    """One tokenizer, identity maps, top_k = vocabulary: the projected top-k KLs are co_distill's full KLs, in the
    direction asked for, on both paths. With lam = 0 both train CE only, so the whole run (batches, RNG, steps)
    must agree exactly; with lam > 0 the KD terms train too, so the losses agree iff both paths distil in the same
    direction. Tolerance: CE and training losses rel 1e-6 at lam = 0 (1e-4 with KD: float32 renormalization of the
    top-k and another summation order feed back through training), KLs rel 1e-5 (1e-4); the two KL directions
    differ here by about 3%."""
    from cotune.algorithms.fedcollm.losses import co_distill

    tok = world["f_tok"]
    runs = []
    rel = 1e-6 if lam == 0 else 1e-4
    for cross in (False, True):
        f = _trainer(world, "f", tok)
        g = _trainer(world, "g_same_tok", tok)
        _peak((f, 6.0), (g, 3.0))  # peaked, unlike distributions: KL(f‖g) != KL(g‖f)
        pairs = f.encode(world["examples"])
        if cross:
            ident = np.arange(len(tok), dtype=np.int32)
            runs.append(co_distill_cross(f, g, pairs, g.encode(world["examples"]), f2g=ident, g2f=ident, lam=lam,
                                         epochs=2, batch_size=4, top_k=len(tok), direction=direction))
        else:
            runs.append(co_distill(f, g, pairs, lam=lam, epochs=2, batch_size=4, direction=direction))
    ref, got = runs
    assert got["positions"] == ref["positions"] == got["llm_positions"] == got["slm_positions"]
    assert got["aligned_fraction"] == 1.0
    for k in ("llm_ce", "slm_ce", "llm_kl", "slm_kl"):
        for when in ("before", "after"):
            key = f"{k}_{when}"
            assert got[key] == pytest.approx(ref[key], rel=max(rel, 1e-5), abs=1e-7), (key, got[key], ref[key])
    for k in ("slm_loss_first", "slm_loss_last", "llm_loss_first", "llm_loss_last", "steps"):
        assert got[k] == pytest.approx(ref[k], rel=rel), k
    assert abs(ref["llm_kl_before"] / ref["slm_kl_before"] - 1) > 0.01, ref  # the two directions are told apart


def test_mismatched_inputs_are_refused(world):
    f, g, fp, gp = _pair(world)
    kw = {"f2g": world["f2g"], "g2f": world["g2f"], "lam": 1.0, "epochs": 1, "batch_size": 4}
    with pytest.raises(ValueError, match="f_pairs has 8 samples but g_pairs 7"):
        co_distill_cross(f, g, fp, gp[:7], **kw)
    with pytest.raises(ValueError, match="f2g maps 32000 source ids.*other direction"):
        co_distill_cross(f, g, fp, gp, **(kw | {"f2g": world["g2f"], "g2f": world["f2g"]}))
    with pytest.raises(ValueError, match="g2f maps 50257 source ids"):
        co_distill_cross(f, g, fp, gp, **(kw | {"g2f": world["f2g"]}))
    with pytest.raises(ValueError, match="swapped"):
        co_distill_cross(f, g, gp, fp, **kw)
    bad = np.asarray(world["f2g"].ids).copy()
    bad[5] = 40_000
    with pytest.raises(ValueError, match="outside the other model's vocabulary"):
        co_distill_cross(f, g, fp, gp, **(kw | {"f2g": bad}))
    with pytest.raises(ValueError, match="top_k"):
        co_distill_cross(f, g, fp, gp, **kw, top_k=0)
