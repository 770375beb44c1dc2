"""A hostile SLM client, for tests/integration/test_poisoning.py: a real service process that serves every task as an
honest SLM client does, except two, where it tries to poison the run:

- public_logits: a well-formed shard of the right public set, tokenizer and vocabulary whose top-1 at every position
  is a wrong token (the gold token's neighbour id, probability 0.999), with a forged loss: -1e300 in odd rounds (no
  loss is negative: the coordinator drops it), 0.0 in even ones (plausible: only recomputing it exposes it);
- get_lora with tag (an upload for FedAvg): an adapter with the right keys, shapes and tags whose every value is 1e30.

    python -m tests.integration.hostile_client --config CLIENT.yaml --port-file PORT_FILE

(the same arguments `cotune serve slm` takes, so it can replace a cluster's client with the client's own config).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys

import numpy as np

from cotune.party import tasks as generic
from cotune.rpc.operations import OpResult
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_ADAPTER, MEDIA_SHARD
from slm_client.client import SLMClient

FORGED_VALUE = 1e30


def forged_loss(round_: int) -> float:
    return -1e300 if round_ % 2 else 0.0


def forged_logits(party, task: party_pb2.PublicLogitsTask, ctx: party_pb2.RunContext):
    examples = party.samples(party.public, task.max_samples)
    max_length = party.max_length(task)

    def work(op):
        from cotune.lm.logits import public_topk_and_gold
        from cotune.wire.logits_shard import encode_shard
        from cotune.wire.topk_types import SampleLogits

        _, gold = public_topk_and_gold(party.model, party.tokenizer, examples, k=1, max_length=max_length,
                                       batch_size=party.trainer.config.batch_size)
        loss = forged_loss(ctx.round)
        samples = [SampleLogits(positions=g.positions, ids=((g.ids + 1) % party.vocab_size).astype(np.int32)[:, None],
                                logprobs=np.full((len(g.positions), 1), np.log(0.999), np.float32), loss_bpb=loss)
                   for g in gold]
        meta = {"party_id": party.cfg.party_id, "tokenizer_hash": party.tokenizer_hash,
                "public_set_hash": party.public_hash}
        blob = party.store.put_bytes(encode_shard(samples, vocab_size=party.vocab_size, metadata=meta, lossless=True),
                                     MEDIA_SHARD)
        return OpResult(metrics={"public_loss_bpb": loss},
                        result=party_pb2.PublicLogitsResult(shard=blob.ref(), public_loss_bpb=loss))
    return work


def huge_lora(party, task: party_pb2.GetLoraTask, ctx: party_pb2.RunContext):
    if not task.tag:
        return generic.get_lora(party, task, ctx)

    def work(op):
        import torch

        from cotune.lm.lora import LORA_FORMAT, lora_state_dict
        from cotune.wire.safetensors_io import dumps

        sd = {k: torch.full_like(v, FORGED_VALUE) for k, v in lora_state_dict(party.model).items()}
        tags = {"cotune.run_id": ctx.run_id, "cotune.round": str(ctx.round), "cotune.task_key": ctx.task_key,
                "cotune.party_id": party.cfg.party_id, "cotune.target": task.target or "model"}
        data = dumps(sd, {"format": LORA_FORMAT, "keys": str(len(sd)), **tags})
        blob = party.store.put_bytes(data, MEDIA_ADAPTER)
        return OpResult(result=party_pb2.GetLoraResult(adapter=blob.ref(), lora_hash=hashlib.sha256(data).hexdigest()))
    return work


class HostileClient(SLMClient):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.tasks.update(public_logits=forged_logits, get_lora=huge_lora)


def main(argv=None) -> int:
    from cotune.config import PartyConfig, load_config
    from cotune.party.service import serve_parties
    from cotune.v1 import party_pb2_grpc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    client = HostileClient(load_config(PartyConfig, args.config))
    serve_parties([client], party_pb2_grpc.add_SLMClientServicer_to_server, "SLMClient", [args.port_file])
    return 0


if __name__ == "__main__":
    sys.exit(main())
