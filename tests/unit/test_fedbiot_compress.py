"""FedBiOT compression: emulator layer indices, compressed HF model, adapter plugged back via the map."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from cotune.algorithms.fedbiot.compress import (
    LAYER_MAP_FILE,
    adapter_lora_state,
    compress,
    load_layer_map,
    plug_adapter_into_full,
    save_compressed,
)
from cotune.algorithms.fedbiot.plan import emulator_layer_indices, plan
from cotune.demo.tiny import make_tiny_model
from cotune.lm.layers import decoder_layers_prefix
from tests.unit.lm_fixtures import needs_tokenizer

ARCHS = ("llama", "gpt2", "gemma3")


def test_emulator_indices_for_30_layers_match_design():
    # k = round(30 * 0.8) = 24, stride = 29/23; index int(i * stride)
    assert emulator_layer_indices(30, 0.2) == [
        0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20, 21, 22, 23, 25, 26, 27, 29,
    ]
    # k = round(30 * 0.5) = 15, stride = 29/14
    assert emulator_layer_indices(30, 0.5) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29]


@pytest.mark.parametrize("n", [2, 3, 6, 7, 10, 30, 31])
@pytest.mark.parametrize("drop", [0.2, 0.5])
def test_emulator_indices_keep_first_and_last_sorted_unique(n, drop):
    idx = emulator_layer_indices(n, drop)
    assert len(idx) == max(min(n, 2), round(n * (1 - drop)))
    assert idx[0] == 0 and idx[-1] == n - 1
    assert idx == sorted(set(idx))


def test_plan_appends_the_adapter_and_rejects_impossible_sizes():
    lm = plan(32, adapter_layers=2, drop=0.5)
    assert [lm[j] for j in sorted(lm)] == emulator_layer_indices(30, 0.5) + [30, 31]
    with pytest.raises(ValueError, match="smaller than"):
        plan(4, adapter_layers=4, drop=0.2)
    with pytest.raises(ValueError, match="adapter_layers"):
        plan(4, adapter_layers=0, drop=0.2)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("tiny8")
    return {a: make_tiny_model(tok, root / a, arch=a, hidden=32, heads=2, layers=8) for a in ARCHS}


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _selected_original(model, layer_map):
    """The original model object running only the selected layers (in order): the independent reference."""
    ref = copy.deepcopy(model)
    prefix = decoder_layers_prefix(ref)
    owner_name, _, leaf = prefix.rpartition(".")
    owner = ref.get_submodule(owner_name) if owner_name else ref
    layers = getattr(owner, leaf)
    kept = [layer_map[j] for j in sorted(layer_map)]
    setattr(owner, leaf, torch.nn.ModuleList([layers[i] for i in kept]))
    cfg = ref.config
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, len(kept))
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    return ref


@needs_tokenizer
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("drop", [0.2, 0.5])
def test_compressed_model_loads_and_matches_selected_original_layers(tiny_dirs, tok, tmp_path, arch, drop):
    from transformers import AutoModelForCausalLM

    full = _load(tiny_dirs[arch])
    small, layer_map = compress(full, adapter_layers=2, drop=drop)
    expected_kept = emulator_layer_indices(6, drop) + [6, 7]
    assert [layer_map[j] for j in sorted(layer_map)] == expected_kept
    out = save_compressed(small, layer_map, tmp_path / "c", tokenizer=tok, adapter_layers=2, drop=drop,
                          original_num_layers=8)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    meta = json.loads((out / LAYER_MAP_FILE).read_text())
    assert meta["adapter"] == [len(expected_kept) - 2, len(expected_kept) - 1]
    assert load_layer_map(out) == (layer_map, 2)

    loaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    cfg = loaded.config
    assert getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)) == len(expected_kept)
    ids = torch.randint(0, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = loaded(ids, use_cache=False).logits
        want = _selected_original(full, layer_map)(ids, use_cache=False).logits
        orig = full(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, orig, atol=1e-4)  # layers really were dropped
    # the original model is untouched by compress
    torch.testing.assert_close(_load(tiny_dirs[arch])(ids, use_cache=False).logits, orig.detach())


def _randomize_lora(model, seed):
    from cotune.lm.lora import _lora_params

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(_lora_params(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@needs_tokenizer
@pytest.mark.parametrize("arch", ARCHS)
def test_plugged_adapter_lands_in_the_mapped_original_layers(tiny_dirs, arch):
    from cotune.lm.lora import attach_lora, lora_state_dict

    full_base = _load(tiny_dirs[arch])
    small, layer_map = compress(full_base, adapter_layers=2, drop=0.5)
    small = attach_lora(small, r=4, dropout=0.0)
    _randomize_lora(small, seed=3)
    prefix = decoder_layers_prefix(small)

    full = attach_lora(_load(tiny_dirs[arch]), r=4, dropout=0.0)
    before = lora_state_dict(full)
    written = plug_adapter_into_full(full, small, layer_map, adapter_layers=2)
    after = lora_state_dict(full)
    adapter = adapter_lora_state(small, layer_map, adapter_layers=2)
    k = len(layer_map)
    assert adapter and all(f"{prefix}.{k - 2}." in key or f"{prefix}.{k - 1}." in key for key in adapter)
    # every adapter tensor of compressed layer j is now in original layer layer_map[j]; nothing else moved
    for key, value in adapter.items():
        j = k - 2 if f"{prefix}.{k - 2}." in key else k - 1
        target = key.replace(f"{prefix}.{j}.", f"{prefix}.{layer_map[j]}.")
        assert target in written
        torch.testing.assert_close(after[target], value)
    for key in after:
        if key not in written:
            torch.testing.assert_close(after[key], before[key])
    assert len(written) == len(adapter)

    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        good = full(ids, use_cache=False).logits.clone()

    # A broken map (the two adapter entries swapped) puts each layer's LoRA in the wrong place: different output.
    swapped = dict(layer_map)
    swapped[k - 2], swapped[k - 1] = layer_map[k - 1], layer_map[k - 2]
    full_bad = attach_lora(_load(tiny_dirs[arch]), r=4, dropout=0.0)
    plug_adapter_into_full(full_bad, small, swapped, adapter_layers=2)
    with torch.no_grad():
        bad = full_bad(ids, use_cache=False).logits
    assert not torch.allclose(good, bad, atol=1e-4)

    # A map that points the adapter at emulator layers is rejected.
    wrong = dict(layer_map)
    wrong[k - 1] = 0
    with pytest.raises(ValueError, match="last 2"):
        plug_adapter_into_full(attach_lora(_load(tiny_dirs[arch]), r=4, dropout=0.0), small, wrong, adapter_layers=2)


@needs_tokenizer
def test_compressing_a_lora_wrapped_model_uses_its_base_weights(tiny_dirs):
    from cotune.lm.lora import attach_lora

    plain, map_a = compress(_load(tiny_dirs["gpt2"]), drop=0.5, adapter_layers=2)
    wrapped = attach_lora(_load(tiny_dirs["gpt2"]), r=4, dropout=0.0)
    _randomize_lora(wrapped, seed=1)
    small, map_b = compress(wrapped, drop=0.5, adapter_layers=2)
    assert map_a == map_b
    sd_a, sd_b = plain.state_dict(), small.state_dict()
    assert sd_a.keys() == sd_b.keys() and not any("lora" in k for k in sd_b)
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k])


def test_pack_dir_is_deterministic_and_round_trips(tmp_path):
    from cotune.algorithms.fedbiot.compress import pack_dir, unpack_dir

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01" * 100)
    data = pack_dir(src)
    os.utime(src / "a.json", (1, 1))
    assert pack_dir(src) == data
    out = unpack_dir(data, tmp_path / "out")
    assert (out / "a.json").read_text() == "{}" and (out / "sub" / "b.bin").read_bytes() == b"\x00\x01" * 100


def test_saving_a_lora_wrapped_compressed_model_is_refused(tiny_dirs, tok, tmp_path):
    """peft renames the wrapped weights: saved as they are, a client would load random attention weights."""
    from cotune.lm.lora import attach_lora

    small, layer_map = compress(_load(tiny_dirs[ARCHS[0]]), adapter_layers=2, drop=0.5)
    with pytest.raises(ValueError, match="without LoRA"):
        save_compressed(attach_lora(small, r=4, dropout=0.0), layer_map, tmp_path / "c", tokenizer=tok, adapter_layers=2)
    assert not (tmp_path / "c" / "model.safetensors").exists()
