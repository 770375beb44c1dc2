"""FedBiOT on the two roles (no gRPC): the LLM server compresses and aligns, an SLM client installs the shipped model
and TrainAdapter trains only the adapter of a compressed model."""

from __future__ import annotations

import math

import pytest
import torch

from cotune.algorithms.fedbiot.compress import compress, save_compressed
from cotune.demo.tiny import make_tiny_model
from tests.unit.lm_fixtures import TOKENIZER, needs_tokenizer, toy_examples

pytestmark = needs_tokenizer


_examples = toy_examples


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from cotune.align.tokenizers import load_tokenizer
    from cotune.data.tasks import write_jsonl

    root = tmp_path_factory.mktemp("fedbiot-party")
    tok = load_tokenizer(TOKENIZER)
    full_dir = make_tiny_model(tok, root / "full", arch="llama", hidden=32, heads=2, layers=8)
    small, layer_map = compress(AutoModelForCausalLM.from_pretrained(str(full_dir)), adapter_layers=2, drop=0.5)
    comp_dir = save_compressed(small, layer_map, root / "compressed", tokenizer=tok, adapter_layers=2, drop=0.5,
                               original_num_layers=8)
    write_jsonl(root / "public.jsonl", _examples(4))
    write_jsonl(root / "private.jsonl", _examples(8))
    return root, full_dir, comp_dir, layer_map


def _party(root, model_dir, name, role="slm"):
    from cotune.config import (
        DataConfig,
        LoraConfig,
        ModelConfig,
        PartyConfig,
        TrainingConfig,
    )
    from llm_server.server import LLMServer
    from slm_client.client import SLMClient

    cfg = PartyConfig(
        party_id=name,
        workdir=str(root / name),
        model=ModelConfig(path=str(model_dir), device="cpu", dtype="fp32"),
        lora=LoraConfig(r=4, dropout=0.0),
        training=TrainingConfig(lr=5e-3, batch_size=4, max_length=32),
        data=DataConfig(public=str(root / "public.jsonl"), private=str(root / "private.jsonl")),
    )
    party = LLMServer(cfg) if role == "llm" else SLMClient(cfg)
    party.load()
    return party


def _request(**train):
    from cotune.v1 import party_pb2

    return party_pb2.TaskRequest(ctx=party_pb2.RunContext(run_id="run", round=1),
                                 train_adapter=party_pb2.TrainAdapterTask(**train))


def _result(op, kind):
    from cotune.tasks import RESULT_TYPES

    result = RESULT_TYPES[kind]()
    assert op.result.Unpack(result), f"operation result is {op.result.type_url}, not {kind}'s"
    return result


def test_train_adapter_trains_only_the_adapter(setup):
    from cotune.algorithms.fedbiot.client import layers_of
    from cotune.algorithms.fedbiot.losses import lora_part_state
    from cotune.v1 import operations_pb2

    root, _full, comp_dir, layer_map = setup
    party = _party(root, comp_dir, "client-a")
    try:
        assert layers_of(party).layer_map == layer_map and layers_of(party).adapter_layers == 2
        adapter0 = lora_part_state(party.model, layer_map, "adapter", adapter_layers=2)
        emulator0 = lora_part_state(party.model, layer_map, "emulator", adapter_layers=2)
        op = party.start_task(_request(epochs=3, prox_eps=0.1))
        done = party.ops.wait(op.id, 120)
        assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
        assert done.metrics["train_steps"] == 6 and done.metrics["train_prox_last"] > 0
        assert done.metrics["train_loss_last"] < done.metrics["train_loss_first"]
        result = _result(done, "train_adapter")
        assert result.samples == done.metrics["train_samples"] == 8
        assert (result.loss_first, result.loss_last) == (done.metrics["train_loss_first"], done.metrics["train_loss_last"])
        adapter1 = lora_part_state(party.model, layer_map, "adapter", adapter_layers=2)
        assert any(not torch.equal(adapter1[k], adapter0[k]) for k in adapter0)
        for k, v in lora_part_state(party.model, layer_map, "emulator", adapter_layers=2).items():
            torch.testing.assert_close(v, emulator0[k])

        from cotune.errors import InvalidInput

        with pytest.raises(InvalidInput, match="prox_eps"):
            party.start_task(_request(epochs=1, prox_eps=-1.0))
        with pytest.raises(InvalidInput, match="prox_eps"):
            party.start_task(_request(epochs=1, prox_eps=math.nan))
    finally:
        party.ops.shutdown()


def test_train_adapter_needs_a_compressed_model(setup):
    from cotune.algorithms.fedbiot.client import layers_of
    from cotune.errors import Precondition

    root, full_dir, _comp, _map = setup
    party = _party(root, full_dir, "client-full")
    try:
        assert layers_of(party) is None
        with pytest.raises(Precondition, match="compressed model"):
            party.start_task(_request(epochs=1, prox_eps=0.1))
    finally:
        party.ops.shutdown()


def _wait(party, op):
    from cotune.v1 import operations_pb2

    done = party.ops.wait(op.id, 120)
    assert done.state == operations_pb2.OPERATION_SUCCEEDED, done.error_message
    return done


def test_server_compresses_clients_train_server_aligns(setup, tmp_path):
    from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE, LAYER_MAP_FILE, unpack_dir
    from cotune.algorithms.fedbiot.losses import lora_part_state
    from cotune.algorithms.fedbiot.server import compressed_of
    from cotune.errors import InvalidInput, Precondition
    from cotune.lm.layers import decoder_layers_prefix
    from cotune.lm.lora import lora_from_bytes, lora_state_dict
    from cotune.v1 import party_pb2

    root, full_dir, _comp, _map = setup
    ctx = party_pb2.RunContext(run_id="run", round=0)
    server = _party(root, full_dir, "server", role="llm")
    client = None
    try:
        with pytest.raises(Precondition, match="CompressTask"):
            server.start_task(party_pb2.TaskRequest(ctx=ctx, align_emulator=party_pb2.AlignEmulatorTask(steps=1)))
        with pytest.raises(InvalidInput, match="smaller than"):
            server.start_task(party_pb2.TaskRequest(ctx=ctx, compress=party_pb2.CompressTask(adapter_layers=8, drop=0.5)))
        done = _wait(server, server.start_task(
            party_pb2.TaskRequest(ctx=ctx, compress=party_pb2.CompressTask(adapter_layers=2, drop=0.5))))
        compressed = _result(done, "compress")
        assert list(compressed.layer_map) == [0, 2, 5, 6, 7] and compressed.model == done.blobs["model"]
        layer_map = dict(enumerate(compressed.layer_map))
        assert (compressed.original_layers, compressed.adapter_layers) == (8, 2)
        model_dir = unpack_dir(server.store.read_bytes(done.blobs["model"].sha256), tmp_path / "downloaded")
        assert (model_dir / LAYER_MAP_FILE).exists() and (model_dir / "config.json").exists()
        initial = lora_from_bytes((model_dir / INITIAL_LORA_FILE).read_bytes())
        server_lora = lora_state_dict(compressed_of(server).model)
        assert initial.keys() == server_lora.keys()

        # a client runs on the downloaded directory, starts from the server's LoRA and trains its adapter
        client = _party(root, model_dir, "client-b")
        blob = client.store.put_bytes((model_dir / INITIAL_LORA_FILE).read_bytes(), "application/safetensors+lora")
        _wait(client, client.start_task(
            party_pb2.TaskRequest(ctx=ctx, set_lora=party_pb2.SetLoraTask(adapter=blob.ref()))))
        _wait(client, client.start_task(_request(epochs=2, prox_eps=0.1)))
        up = _wait(client, client.start_task(party_pb2.TaskRequest(ctx=ctx, get_lora=party_pb2.GetLoraTask())))
        uploaded = client.store.read_bytes(up.blobs["adapter"].sha256)
        ref = server.store.put_bytes(uploaded, "application/safetensors+lora").ref()
        client_adapter = lora_part_state(client.model, layer_map, "adapter", adapter_layers=2)

        emulator0 = lora_part_state(compressed_of(server).model, layer_map, "emulator", adapter_layers=2)
        req = party_pb2.TaskRequest(ctx=ctx, align_emulator=party_pb2.AlignEmulatorTask(
            adapter=ref, steps=4, kl_weight=0.5, lr=1e-2, max_length=32))
        aligned = _wait(server, server.start_task(req))
        m = aligned.metrics
        assert m["align_steps"] == 4
        # the server's compressed adapter is the client's; the emulator moved; the full model holds the adapter
        for k, v in lora_part_state(compressed_of(server).model, layer_map, "adapter", adapter_layers=2).items():
            torch.testing.assert_close(v, client_adapter[k])
        emulator1 = lora_part_state(compressed_of(server).model, layer_map, "emulator", adapter_layers=2)
        assert any(not torch.equal(emulator1[k], emulator0[k]) for k in emulator0)
        prefix = decoder_layers_prefix(server.model)
        full_lora = lora_state_dict(server.model)
        for k, v in client_adapter.items():
            j = 3 if f"{prefix}.3." in k else 4
            torch.testing.assert_close(full_lora[k.replace(f"{prefix}.{j}.", f"{prefix}.{layer_map[j]}.")], v)
        assert _result(aligned, "align_emulator").lora_hash == server.lora_hash(compressed_of(server).model)
        assert _result(aligned, "align_emulator").full_lora_hash == server.describe().lora_hash
        got = _wait(server, server.start_task(
            party_pb2.TaskRequest(ctx=ctx, get_lora=party_pb2.GetLoraTask(target="compressed"))))
        assert lora_from_bytes(server.store.read_bytes(got.blobs["adapter"].sha256)).keys() == initial.keys()

        bad = server.store.put_bytes(server.lora_bytes(), "application/safetensors+lora").ref()  # full-model LoRA
        with pytest.raises(InvalidInput, match="compressed model"):
            server.start_task(party_pb2.TaskRequest(ctx=ctx, align_emulator=party_pb2.AlignEmulatorTask(
                adapter=bad, steps=1, max_length=32)))
    finally:
        server.ops.shutdown()
        if client is not None:
            client.ops.shutdown()


def test_client_installs_the_shipped_model_and_can_go_back(setup):
    from cotune.algorithms.fedbiot.client import layers_of
    from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE
    from cotune.algorithms.fedbiot.server import compressed_of
    from cotune.errors import InvalidInput, Precondition
    from cotune.lm.lora import lora_from_bytes, lora_state_dict, lora_to_bytes
    from cotune.v1 import party_pb2

    root, full_dir, _comp, _map = setup
    ctx = party_pb2.RunContext(run_id="run", round=0)
    server = _party(root, full_dir, "server-ship", role="llm")
    client = _party(root, full_dir, "client-ship")  # configured with some other model
    try:
        done = _wait(server, server.start_task(
            party_pb2.TaskRequest(ctx=ctx, compress=party_pb2.CompressTask(adapter_layers=2, drop=0.5))))
        sha = done.blobs["model"].sha256
        archive = server.store.read_bytes(sha)
        ref = client.store.put_bytes(archive, "application/x-tar").ref()
        configured = client.describe()
        assert layers_of(client) is None and not configured.loaded_model

        with pytest.raises(Precondition, match="LLM server"):
            server.start_task(party_pb2.TaskRequest(ctx=ctx, load_model=party_pb2.LoadModelTask(model=ref)))
        junk = client.store.put_bytes(b"not a tar at all" * 100, "application/x-tar").ref()
        with pytest.raises(InvalidInput, match="not a readable tar"):
            client.start_task(party_pb2.TaskRequest(ctx=ctx, load_model=party_pb2.LoadModelTask(model=junk)))
        missing = party_pb2.LoadModelTask(model=party_pb2.TaskRequest().load_model.model.__class__(sha256="0" * 64, size=1))
        with pytest.raises(Precondition, match="PutBlob"):
            client.start_task(party_pb2.TaskRequest(ctx=ctx, load_model=missing))
        assert client.describe().lora_hash == configured.lora_hash  # refused requests changed nothing

        loaded = _wait(client, client.start_task(party_pb2.TaskRequest(ctx=ctx, load_model=party_pb2.LoadModelTask(model=ref))))
        info = client.describe()
        assert info.loaded_model == sha
        assert _result(loaded, "load_model").model == sha
        assert _result(loaded, "load_model").lora_layout_hash == info.lora_layout_hash
        assert layers_of(client).layer_map == compressed_of(server).layer_map and layers_of(client).adapter_layers == 2
        # the client starts from the server's initial LoRA, byte for byte, with the server's LoRA layout
        initial = (root / "client-ship" / "models" / sha / INITIAL_LORA_FILE).read_bytes()
        assert lora_to_bytes(lora_state_dict(client.model)) == lora_to_bytes(lora_from_bytes(initial))
        assert info.lora_layout_hash == server.lora_layout_hash(compressed_of(server).model)
        # the same archive again: nothing to do
        _wait(client, client.start_task(party_pb2.TaskRequest(
            ctx=party_pb2.RunContext(run_id="run", round=1), load_model=party_pb2.LoadModelTask(model=ref))))
        assert client.describe().loaded_model == sha

        # evaluation of the server's emulator + adapter and of the client's shipped model give the same numbers
        server_eval = _wait(server, server.start_task(party_pb2.TaskRequest(
            ctx=ctx, evaluate=party_pb2.EvaluateTask(target="compressed")))).metrics
        client_eval = _wait(client, client.start_task(party_pb2.TaskRequest(ctx=ctx, evaluate=party_pb2.EvaluateTask()))).metrics
        assert server_eval["public_loss"] == pytest.approx(client_eval["public_loss"], rel=1e-5)
        with pytest.raises(Precondition, match="CompressTask"):
            client.start_task(party_pb2.TaskRequest(ctx=ctx, evaluate=party_pb2.EvaluateTask(target="compressed")))

        _wait(client, client.start_task(party_pb2.TaskRequest(ctx=ctx, load_model=party_pb2.LoadModelTask())))
        back = client.describe()
        assert not back.loaded_model and layers_of(client) is None
        assert back.lora_layout_hash == configured.lora_layout_hash
    finally:
        server.ops.shutdown()
        client.ops.shutdown()
