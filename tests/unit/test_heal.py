"""Layer-reduced, healed copies of a causal LM (cotune.demo.heal): exact layer copies, healing, and the build cache."""

from __future__ import annotations

import json
import os

import pytest
import torch

from cotune.algorithms.fedbiot.plan import emulator_layer_indices, uniform_layer_indices
from cotune.data import load_task
from cotune.demo import heal as heal_mod
from cotune.demo.heal import MARKER_FILE, layer_reduced_copy, reduce_layers
from cotune.demo.tiny import make_tiny_model
from cotune.lm.layers import decoder_layers_prefix
from tests.unit.lm_fixtures import SHARED, one_thread  # noqa: F401 (fixture)

TOKENIZER = SHARED / "tokenizers" / "mistral-7b-hf" / "tokenizer.json"
ARC = SHARED / "datasets" / "arc_easy"
pytestmark = [pytest.mark.skipif(
    not (TOKENIZER.exists() and ARC.exists()), reason=f"shared tokenizer/ARC data not found under {SHARED}"
), pytest.mark.usefixtures("one_thread")]
LAYERS = 6
SETTINGS = {"batch_size": 4, "max_length": 64, "lr": 1e-2, "holdout": 4}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("heal-src")
    return {a: make_tiny_model(tok, root / a, arch=a, hidden=32, heads=2, layers=LAYERS, seed=5)
            for a in ("llama", "gemma3", "gpt2")}


@pytest.fixture(scope="module")
def arc():
    return load_task("arc_easy", "train", limit=24)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _layer_params(model, j):
    prefix = f"{decoder_layers_prefix(model)}.{j}."
    return {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


def _non_layer_params(model):
    prefix = f"{decoder_layers_prefix(model)}."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def test_uniform_indices_keep_first_and_last_like_the_emulator():
    assert uniform_layer_indices(18, 6) == [0, 3, 6, 10, 13, 17]
    assert uniform_layer_indices(6, 2) == [0, 5]
    assert uniform_layer_indices(6, 6) == list(range(6))
    for n, drop in ((30, 0.2), (30, 0.5), (7, 0.5)):
        assert uniform_layer_indices(n, round(n * (1 - drop))) == emulator_layer_indices(n, drop)
    with pytest.raises(ValueError, match="cannot keep"):
        uniform_layer_indices(6, 7)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_reduce_layers_holds_exact_copies_of_the_kept_layers(tiny_dirs, arch):
    src = _load(tiny_dirs[arch])
    before = {k: v.clone() for k, v in src.state_dict().items()}
    keep = [0, 2, 5]
    small = reduce_layers(src, keep)
    assert type(small) is type(src)
    cfg = small.config
    assert getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)) == len(keep)
    assert len(small.get_submodule(decoder_layers_prefix(small))) == len(keep)
    for j, i in enumerate(keep):
        got, want = _layer_params(small, j), _layer_params(src, i)
        assert got.keys() == want.keys() and got
        assert all(torch.equal(got[k], want[k]) for k in got)
    got, want = _non_layer_params(small), _non_layer_params(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    if arch == "gemma3":  # the sliding/full attention (and RoPE) pattern follows the kept layers
        assert src.config.layer_types[5] == "full_attention"
        assert cfg.layer_types == [src.config.layer_types[i] for i in keep]
    assert all(torch.equal(v, before[k]) for k, v in src.state_dict().items())  # source untouched
    for bad in ([], [0, LAYERS], [1, 1]):
        with pytest.raises(ValueError, match="layer"):
            reduce_layers(src, bad)


def test_layer_reduced_copy_heals_saves_and_is_cached(tiny_dirs, tok, arc, tmp_path, monkeypatch):
    from cotune.lm.evaluate import evaluate_loss
    from cotune.lm.model import load_causal_lm

    src_dir = tiny_dirs["gemma3"]
    out = tmp_path / "reduced"
    seen = []
    path = layer_reduced_copy(src_dir, out, keep_layers=3, examples=arc, steps=12, seed=1,
                              progress=lambda done, total: seen.append((done, total)), **SETTINGS)
    assert path == out and seen[-1] == (12, 12)
    meta = json.loads((out / MARKER_FILE).read_text())
    assert meta["kept_layers"] == [0, 2, 5] and meta["key"]["steps"] == 12 and meta["source_num_layers"] == LAYERS
    assert meta["params"] < meta["source_params"]
    assert not list(tmp_path.glob(".reduced.tmp-*"))

    # the tokenizer is the source's, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (src_dir / name).read_bytes()
    healed, healed_tok = load_causal_lm(out, device="cpu", dtype="fp32")
    text = "Question: Which gas do plants take in?\nAnswer: carbon dioxide"
    assert healed_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert len(healed.get_submodule(decoder_layers_prefix(healed))) == 3
    assert healed.config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]

    # healing lowers the training CE; the (tied) embeddings are frozen, the layers moved
    unhealed = reduce_layers(_load(src_dir), [0, 2, 5])
    kw = {"batch_size": 8, "max_length": 64}
    ce_before = evaluate_loss(unhealed, tok, arc, **kw)["loss"]
    ce_after = evaluate_loss(healed, tok, arc, **kw)["loss"]
    assert ce_after < ce_before - 0.05, (ce_before, ce_after)
    assert meta["metrics"]["loss_last"] < meta["metrics"]["loss_first"]
    assert torch.equal(healed.get_input_embeddings().weight, unhealed.get_input_embeddings().weight)
    assert not torch.equal(_layer_params(healed, 1)["mlp.up_proj.weight"], _layer_params(unhealed, 1)["mlp.up_proj.weight"])

    # same inputs: the cache is returned without loading or training anything
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def boom(*a, **k):
        raise AssertionError("cache hit must not load or train")

    with monkeypatch.context() as m:
        m.setattr(heal_mod, "heal", boom)
        m.setattr("cotune.lm.model.load_causal_lm", boom)
        assert layer_reduced_copy(src_dir, out, keep_layers=3, examples=arc, steps=12, seed=1, **SETTINGS) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp

    # a changed input rebuilds: other steps, other examples
    layer_reduced_copy(src_dir, out, keep_layers=3, examples=arc, steps=4, seed=1, **SETTINGS)
    assert json.loads((out / MARKER_FILE).read_text())["key"]["steps"] == 4
    layer_reduced_copy(src_dir, out, keep_layers=3, examples=arc[:20], steps=4, seed=1, **SETTINGS)
    meta = json.loads((out / MARKER_FILE).read_text())
    assert meta["examples"] == 20 and meta["metrics"]["steps"] == 4
    assert not list(tmp_path.glob(".reduced.tmp-*"))


def test_half_written_builds_are_never_the_cache(tiny_dirs, arc, tmp_path):
    src_dir = tiny_dirs["llama"]
    out = tmp_path / "reduced"
    args = dict(keep_layers=2, examples=arc, steps=3, seed=0, **SETTINGS)
    # a crashed build's temp dir and a directory without the marker (complete-looking files) are ignored
    stale = tmp_path / ".reduced.tmp-999-deadbeef"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    out.mkdir()
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((src_dir / name).read_bytes())
    layer_reduced_copy(src_dir, out, **args)
    assert json.loads((out / MARKER_FILE).read_text())["kept_layers"] == [0, LAYERS - 1]
    assert not stale.exists()
    good = (out / MARKER_FILE).read_bytes()

    # a build that fails half-way (here: interrupted during healing) leaves the previous cache as it was
    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        layer_reduced_copy(src_dir, out, **{**args, "steps": 5}, progress=interrupt)
    assert (out / MARKER_FILE).read_bytes() == good
    assert not list(tmp_path.glob(".reduced.tmp-*"))
    with pytest.raises(KeyboardInterrupt):
        layer_reduced_copy(src_dir, tmp_path / "fresh", **args, progress=interrupt)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"keep_layers": 1}, "keep_layers must be an integer >= 2"),
        ({"keep_layers": 0}, "keep_layers must be an integer >= 2"),
        ({"keep_layers": LAYERS + 1}, f"exceeds the {LAYERS} decoder layers"),
        ({"steps": 0}, "steps must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"examples": []}, "at least one example"),
    ],
)
def test_bad_arguments_are_rejected_before_any_work(tiny_dirs, arc, tmp_path, change, match):
    args = dict(keep_layers=2, examples=arc, steps=3, **SETTINGS)
    with pytest.raises(ValueError, match=match):
        layer_reduced_copy(tiny_dirs["llama"], tmp_path / "out", **{**args, **change})
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == []
