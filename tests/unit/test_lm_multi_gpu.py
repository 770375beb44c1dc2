"""A model spread across GPUs (`model.device: auto-multi` / `cuda:0,1`), checked without a GPU: which GPUs a device
value names (with a fake GPU count), the balanced device map accelerate plans for a model over fake GPU budgets, and
the loading and training path of a model that runs under accelerate's dispatch hooks (all parts on the CPU), which
must give the very numbers the plain model gives.

Not covered here (no GPU on the test machines): weights really on two GPUs and tensors crossing between them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from cotune.data.example import Example
from cotune.lm.batching import collate, cuda_indices, head_logits, hidden_states, to_device
from cotune.lm.device import MULTI_GPU, gpu_budgets, pick_device, spread_gpus
from cotune.lm.evaluate import choice_loglikelihoods, evaluate_loss
from cotune.lm.model import _outputs_to_input_device, keep_outputs_on_input_device, load_causal_lm, plan_device_map
from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer

EXAMPLES = [
    Example("Q: What color is the sky?\nA:", " blue", choices=(" blue", " green", " red"), label=0),
    Example("Q: What do cows drink?\nA:", " water", choices=(" water", " milk"), label=0),
    Example("Q: Capital of France?\nA:", " Paris", choices=(" Paris", " Rome", " Oslo"), label=0),
]


# -- which GPUs ---------------------------------------------------------------------------------------------------
def test_auto_multi_spreads_over_every_gpu_only_when_there_are_two_or_more():
    assert spread_gpus(MULTI_GPU, count=0) == []
    assert spread_gpus(MULTI_GPU, count=1) == []  # one GPU: the model goes there, as with auto
    assert spread_gpus(MULTI_GPU, count=2) == [0, 1]
    assert spread_gpus(" Auto-Multi ", count=4) == [0, 1, 2, 3]
    for single in ("auto", "cpu", "cuda", "cuda:1", "", None, torch.device("cpu")):
        assert spread_gpus(single, count=4) == []


def test_a_list_of_gpus_names_those_gpus():
    assert spread_gpus("cuda:1,2", count=4) == [1, 2]
    assert spread_gpus("cuda:3,0,3", count=4) == [3, 0]  # in the order given, once each
    assert spread_gpus("cuda:2,2", count=4) == []  # one GPU: no spreading
    with pytest.raises(ValueError, match=r"GPU\(s\) 5 but this machine has 2"):
        spread_gpus("cuda:0,5", count=2)
    with pytest.raises(ValueError, match="GPU indices"):
        spread_gpus("cuda:0,x", count=2)


def test_pick_device_is_where_a_spread_models_inputs_go():
    if torch.cuda.is_available():
        assert pick_device(MULTI_GPU).type == "cuda"
    else:  # no GPU: auto-multi is auto, a GPU list is a clear error
        assert pick_device(MULTI_GPU) == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda:0,1")


def test_gpu_budgets_take_a_share_of_the_free_memory():
    assert gpu_budgets([0, 2], free_bytes={0: 1000, 1: 5, 2: 2000}, fraction=0.5) == {0: 500, 2: 1000}


# -- the device map -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def config_dir(tmp_path_factory):
    """An HF directory with only config.json: planning reads no weights."""
    d = tmp_path_factory.mktemp("plan")
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(d)
    return d


def _weights_bytes(config_dir, dtype=torch.float32) -> int:
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=dtype)
    return compute_module_sizes(empty, dtype=dtype)[""]


@pytest.mark.parametrize("gpus", [2, 3])
def test_the_map_spreads_whole_layers_in_order_over_every_gpu(config_dir, gpus):
    need = _weights_bytes(config_dir)
    budgets = {i: need for i in range(gpus)}  # each GPU could hold it all: balancing still spreads it
    dm = plan_device_map(config_dir, torch.float32, budgets)
    assert set(dm.values()) == set(range(gpus)), dm
    layers = [dm[f"model.layers.{i}"] for i in range(6)]  # each decoder layer whole (no "model.layers.0.mlp" keys)
    assert layers == sorted(layers), dm  # in layer order: activations cross each GPU boundary once
    assert dm["model.embed_tokens"] == 0 and dm["lm_head"] == gpus - 1
    assert not any(k.startswith("model.layers.") and k.count(".") > 2 for k in dm), dm


def test_the_map_takes_the_models_dtype_and_budgets_of_other_gpus(config_dir):
    need16 = _weights_bytes(config_dir, torch.bfloat16)
    dm = plan_device_map(config_dir, torch.bfloat16, {2: need16 // 2 + need16 // 4, 5: need16 // 2 + need16 // 4})
    assert set(dm.values()) == {2, 5}
    with pytest.raises(ValueError, match="more than the GPUs can take"):  # fits in bf16, not in fp32
        plan_device_map(config_dir, torch.float32, {2: need16 // 2 + need16 // 4, 5: need16 // 2 + need16 // 4})


def test_a_model_that_does_not_fit_is_refused_not_offloaded(config_dir):
    need = _weights_bytes(config_dir)
    with pytest.raises(ValueError, match=r"need .* GiB in torch.float32, more than the GPUs can take \(GPU 0: "):
        plan_device_map(config_dir, torch.float32, {0: need // 3, 1: need // 3})
    # enough in total, but no GPU can hold the embedding matrix (a third of the weights) whole
    with pytest.raises(ValueError, match="do\\(es\\) not fit on the GPUs"):
        plan_device_map(config_dir, torch.float32, {i: need // 8 for i in range(12)})


# -- the hooks ------------------------------------------------------------------------------------------------------
def test_the_decoder_hands_its_hidden_states_back_on_the_inputs_device():
    """The hook's rule, with the meta device standing in for "another GPU": outputs move to the inputs' device."""
    ids = torch.zeros((2, 3), dtype=torch.long, device="meta")
    out = _outputs_to_input_device(None, (), {"input_ids": ids}, BaseModelOutputWithPast(last_hidden_state=torch.ones(2, 3, 4)))
    assert out.last_hidden_state.device.type == "meta" and out["last_hidden_state"].device.type == "meta"
    (moved, rest) = _outputs_to_input_device(None, (ids,), {}, (torch.ones(2, 3, 4), "cache"))
    assert moved.device.type == "meta" and rest == "cache"
    same = BaseModelOutputWithPast(last_hidden_state=torch.ones(1, 1, 2))
    assert _outputs_to_input_device(None, (), {"input_ids": torch.zeros((1, 1), dtype=torch.long)}, same) is same


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from cotune.align.tokenizers import load_tokenizer
    from cotune.demo.tiny import make_tiny_model

    if not TOKENIZER.exists():
        pytest.skip(f"shared tokenizer data not found at {TOKENIZER}")
    tok = load_tokenizer(TOKENIZER)
    return make_tiny_model(tok, tmp_path_factory.mktemp("tiny") / "llama", arch="llama", hidden=32, heads=2, layers=3)


def _dispatched(model):
    """`model` under accelerate's dispatch hooks for a per-layer device map, as a spread model runs (here every part
    on the CPU: main_device cpu, so nothing is offloaded), with cotune's decoder hook."""
    from accelerate import dispatch_model

    names = ["model.embed_tokens", *(f"model.layers.{i}" for i in range(model.config.num_hidden_layers)),
             "model.norm", "model.rotary_emb", "lm_head"]
    dispatch_model(model, device_map={n: "cpu" for n in names}, main_device="cpu", force_hooks=True)
    keep_outputs_on_input_device(model)
    keep_outputs_on_input_device(model)  # idempotent
    return model


@needs_tokenizer
def test_an_explicit_device_map_loads_the_model_there(tiny_dir):
    plain, tok = load_causal_lm(tiny_dir, device="cpu", dtype="fp32")
    mapped, _ = load_causal_lm(tiny_dir, device="cpu", dtype="fp32", device_map={"": "cpu"})
    assert not mapped.training and {p.device.type for p in mapped.parameters()} == {"cpu"}
    assert cuda_indices(mapped) == []
    batch = to_device(_batch(tok), torch.device("cpu"))
    with torch.no_grad():
        a = head_logits(plain, hidden_states(plain, batch["input_ids"], batch["attention_mask"]))
        b = head_logits(mapped, hidden_states(mapped, batch["input_ids"], batch["attention_mask"]))
    assert torch.equal(a, b)


def _batch(tok):
    from cotune.align.tokenizers import encode_pair

    return collate([encode_pair(tok, ex.prompt, ex.response, 64) for ex in EXAMPLES], tok.pad_token_id)


@needs_tokenizer
def test_a_dispatched_model_trains_and_scores_exactly_as_the_plain_one(tiny_dir):
    """LoRA attached under the dispatch hooks, a few training steps, loss and multiple-choice scoring (whose KV cache
    is re-indexed per batch): the same numbers as the same model without hooks."""
    from cotune.lm.lora import attach_lora, lora_state_dict
    from cotune.lm.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    runs = {}
    for name in ("plain", "dispatched"):
        model, tok = load_causal_lm(tiny_dir, device="cpu", dtype="fp32")
        if name == "dispatched":
            model = _dispatched(model)
            assert hasattr(model.model.layers[0], "_hf_hook")  # accelerate's per-layer hooks are in place
        model = attach_lora(model, dropout=0.0, seed=0)
        trainer = Trainer(model, tok, TrainConfig(lr=2e-2, batch_size=2, epochs=1))
        out = trainer.train_ce(EXAMPLES, epochs=2)
        runs[name] = (out, lora_state_dict(model), evaluate_loss(model, tok, EXAMPLES)["loss"],
                      choice_loglikelihoods(model, tok, EXAMPLES, batch_size=2),
                      choice_loglikelihoods(model, tok, EXAMPLES, batch_size=2, mc_scoring="per_choice"))
    (o1, sd1, l1, mc1, pc1), (o2, sd2, l2, mc2, pc2) = runs["plain"], runs["dispatched"]
    assert o1["steps"] == o2["steps"] > 0 and o1["loss_last"] == pytest.approx(o2["loss_last"], abs=1e-6)
    assert sd1.keys() == sd2.keys() and all(torch.allclose(sd1[k], sd2[k], atol=1e-6) for k in sd1)
    assert l1 == pytest.approx(l2, abs=1e-6)
    for a, b, c in zip(mc1, mc2, pc2):
        assert a == pytest.approx(b, abs=1e-5) and b == pytest.approx(c, abs=1e-4)
