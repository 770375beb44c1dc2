"""FedCoLLM (arXiv 2411.11707, DESIGN §4.3): co-tuning a server LLM and client SLMs through the SLM's LoRA.

Round 0: the initial SLM adapter θ⁰ is taken from the LLM server's copy of the SLM and set on every client, so
all start from one init; everyone is evaluated.
Round t: clients train θ_k for E epochs on private data (CE) → the coordinator pulls each θ_k (tagged with its
run/round/step) and FedAvgs them by sample count (A and B separately, or the exact product mean; see
coordinator/aggregate.py), rejecting bad uploads → the aggregate goes to the LLM server, which loads it into its
SLM copy g and co-distils with the LLM f on the public set (θ with CE_g + λ·KL(g‖f), ω with CE_f + λ·KL(f‖g),
alternating per batch) → the distilled θᵗ is broadcast to every client → everyone is evaluated.

One tokenizer for every SLM and the LLM (full-vocabulary KL on one host); across tokenizers is an extension
that is rejected for now.
"""

from __future__ import annotations

import math

from cotune.rpc.errors import InvalidInput, Precondition
from cotune.v1 import party_pb2
from coordinator.strategies import lora_fed
from coordinator.strategies.base import RunDriver, Strategy

DEFAULT_KD_WEIGHT = 1.0


class FedCoLLM(Strategy):
    name = "fedcollm"

    def validate(self, spec, llm_info, client_infos) -> None:
        comp = llm_info.companion if llm_info.HasField("companion") else None
        if comp is None or not comp.tokenizer_hash:
            raise Precondition("fedcollm needs the LLM server to hold a copy of the SLM for co-distillation: set "
                               "model.companion_slm_path in the LLM server's config (the clients' SLM model directory or GGUF)")
        if comp.tokenizer_hash != llm_info.tokenizer_hash:
            raise InvalidInput(f"fedcollm co-distils the LLM and its SLM copy over the full vocabulary, so they must share one "
                               f"tokenizer; the LLM uses {llm_info.tokenizer_hash[:12]}…, the SLM copy {comp.tokenizer_hash[:12]}…. "
                               "FedCoLLM across tokenizers is an extension that is not implemented yet")
        lora_fed.validate_homogeneous(spec, client_infos, what="fedcollm",
                                      reference=("llm server's SLM copy", comp.tokenizer_hash, comp.lora_layout_hash))
        if not (math.isfinite(spec.kd_weight) and spec.kd_weight >= 0):
            raise InvalidInput(f"kd_weight (λ) must be finite and >= 0 (0 = {DEFAULT_KD_WEIGHT}), got {spec.kd_weight}")
        if not 0 <= spec.max_length <= 32768:
            raise InvalidInput(f"max_length must be in 0..32768 (0 = the parties' default), got {spec.max_length}")

    def execute(self, d: RunDriver) -> None:
        spec = d.spec
        theta = lora_fed.initial_adapter(d, d.llm, target="companion")
        lora_fed.broadcast(d, d.clients, 0, theta)
        d.set_step(0, "evaluate")
        lora_fed.evaluate(d, [d.llm, *d.clients], 0)

        for rnd in range(1, spec.rounds + 1):
            d.check_cancelled()
            active, samples = lora_fed.train_local(d, d.clients, rnd)
            aggregate, _ = lora_fed.collect_and_aggregate(d, active, rnd, theta, samples)

            d.set_step(rnd, "co_distill")
            task = party_pb2.CoDistillTask(slm_adapter=d.ref(aggregate), lam=spec.kd_weight or DEFAULT_KD_WEIGHT,
                                           epochs=spec.distill_epochs or 1, max_samples=spec.max_public_samples,
                                           max_length=spec.max_length)
            res = d.task(d.llm, rnd, "co_distill", before=lambda: d.deliver(d.llm, aggregate, rnd, "adapter_aggregate"),
                         co_distill=task)
            if res["info"].get("received_lora_hash") != aggregate:  # legitimate when the server runs in bf16
                d.note(rnd, f"co_distill: the LLM server's SLM copy held {res['info'].get('received_lora_hash', '?')[:12]}… "
                            f"after loading the aggregate {aggregate[:12]}… (dtype cast?)")
            m = res["metrics"]
            metrics = dict(m)
            # the LLM's own KD term, in the columns every report shows
            metrics["distill_kd_before"] = m["codistill_llm_kl_before"]
            metrics["distill_kd_after"] = m["codistill_llm_kl_after"]
            d.record_metrics(rnd, d.llm.party_id, metrics)
            theta = res["blobs"]["slm_adapter"]
            d.fetch(d.llm, theta, rnd, "adapter_distilled")
            lora_fed.record_artifact(d, rnd, "distilled", theta)

            lora_fed.broadcast(d, d.clients, rnd, theta)
            d.set_step(rnd, "evaluate")
            lora_fed.evaluate(d, [d.llm, *d.clients], rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")
