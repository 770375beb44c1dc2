"""FedCoLLM (arXiv 2411.11707, DESIGN §4.3): co-tuning a server LLM and client SLMs through the SLM's LoRA.

Round 0: the initial SLM adapter θ⁰ is taken from the LLM server's copy of the SLM and set on every client, so
all start from one init; everyone is evaluated.
Round t: clients train θ_k for E epochs on private data (CE) → the coordinator pulls each θ_k (tagged with its
run/round/step) and FedAvgs them by sample count (A and B separately, or the exact product mean; see
coordinator/aggregate.py), rejecting bad uploads → the aggregate goes to the LLM server, which loads it into its
SLM copy g and co-distils with the LLM f on the public set (θ with CE_g + λ·KL(g‖f), ω with CE_f + λ·KL(f‖g),
alternating per batch) → the distilled θᵗ is broadcast to every client → everyone is evaluated.

Every client and the LLM server's SLM copy share one tokenizer (adapters are averaged key by key). The LLM may use
another one when the run spec sets `align_tokenizers` (an extension: no published system does this): the coordinator
has the alignment service build MinED maps LLM → SLM and SLM → LLM once, delivers them to the LLM server with each
CoDistillTask, and the KL is taken at aligned positions against the other model's top-k projected through the map
(cotune/algorithms/fedcollm/losses_cross.py).
"""

from __future__ import annotations

import math

from cotune.errors import InvalidInput, Precondition
from cotune.v1 import party_pb2
from cotune.algorithms import steps as lora_fed
from coordinator.driver import RunDriver, Strategy

DEFAULT_KD_WEIGHT = 1.0


class FedCoLLM(Strategy):
    name = "fedcollm"

    def validate(self, spec, llm_info, client_infos) -> None:
        comp = llm_info.companion if llm_info.HasField("companion") else None
        if comp is None or not comp.tokenizer_hash:
            raise Precondition("fedcollm needs the LLM server to hold a copy of the SLM for co-distillation: set "
                               "model.companion_slm_path in the LLM server's config (the clients' SLM model directory or GGUF)")
        if comp.tokenizer_hash != llm_info.tokenizer_hash and not spec.align_tokenizers:
            raise InvalidInput(f"the LLM ({llm_info.tokenizer_hash[:12]}…) and its SLM copy ({comp.tokenizer_hash[:12]}…) use "
                               "different tokenizers: fedcollm co-distils them over one vocabulary unless the run spec sets "
                               "align_tokenizers: true (MinED maps from the alignment service; an extension of the paper)")
        lora_fed.validate_homogeneous(spec, client_infos, what="fedcollm",
                                      reference=("llm server's SLM copy", comp.tokenizer_hash, comp.lora_layout_hash))
        if not (math.isfinite(spec.kd_weight) and spec.kd_weight >= 0):
            raise InvalidInput(f"kd_weight (λ) must be finite and >= 0 (0 = {DEFAULT_KD_WEIGHT}), got {spec.kd_weight}")
        if not 0 <= spec.max_length <= 32768:
            raise InvalidInput(f"max_length must be in 0..32768 (0 = the parties' default), got {spec.max_length}")

    def execute(self, d: RunDriver) -> None:
        spec = d.spec
        maps = self._vocab_maps(d)
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
                                           max_length=spec.max_length, top_k=spec.top_k)

            def deliver(aggregate=aggregate, rnd=rnd):
                d.deliver(d.llm, aggregate, rnd, "adapter_aggregate")
                for sha in maps.values():
                    d.deliver(d.llm, sha, rnd, "vocab_map")

            for field, sha in maps.items():
                getattr(task, field).CopyFrom(d.ref(sha))
            res = d.task(d.llm, rnd, "co_distill", before=deliver, co_distill=task)
            if res["info"].get("received_lora_hash") != aggregate:  # legitimate when the server runs in bf16
                d.note(rnd, f"co_distill: the LLM server's SLM copy held {res['info'].get('received_lora_hash', '?')[:12]}… "
                            f"after loading the aggregate {aggregate[:12]}… (dtype cast?)")
            m = res["metrics"]
            metrics = dict(m)
            # the LLM's own KD term, in the columns every report shows: KL(f‖g) with one tokenizer; across tokenizers
            # the forward KL(g̃‖f) (co_distill_cross names KLs by direction)
            own = "slm" if maps else "llm"
            metrics["distill_kd_before"] = m[f"codistill_{own}_kl_before"]
            metrics["distill_kd_after"] = m[f"codistill_{own}_kl_after"]
            d.record_metrics(rnd, d.llm.party_id, metrics)
            theta = res["blobs"]["slm_adapter"]
            d.fetch(d.llm, theta, rnd, "adapter_distilled")
            lora_fed.record_artifact(d, rnd, "distilled", theta)

            lora_fed.broadcast(d, d.clients, rnd, theta)
            d.set_step(rnd, "evaluate")
            lora_fed.evaluate(d, [d.llm, *d.clients], rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    @staticmethod
    def _vocab_maps(d: RunDriver) -> dict[str, str]:
        """{} with one tokenizer; else the CoDistillTask fields' MinED maps (LLM ↔ SLM), built once per run."""
        comp = d.llm.info.companion
        llm_tok, slm_tok = d.llm.info.tokenizer_hash, comp.tokenizer_hash
        if llm_tok == slm_tok:
            return {}
        if d.alignment is None:
            raise Precondition("fedcollm across tokenizers (align_tokenizers) needs the alignment service, but the "
                               "coordinator has none configured (coordinator config: alignment)")

        def build():
            # the SLM's tokenizer bundle is held by every client (they run the SLM); the LLM's by the LLM server
            d.register_tokenizers([(d.llm, d.llm.info.tokenizer_bundle.sha256),
                                   (d.clients[0], d.clients[0].info.tokenizer_bundle.sha256)])
            ops = {"llm_to_slm_map": d.alignment.build_vocab_map(llm_tok, slm_tok),
                   "slm_to_llm_map": d.alignment.build_vocab_map(slm_tok, llm_tok)}
            return {field: d.alignment_artifact(op, "vocab_map", d.llm.party_id) for field, op in ops.items()}

        d.set_step(0, "vocab_maps")
        return d.step("r0/vocab_maps", build)
