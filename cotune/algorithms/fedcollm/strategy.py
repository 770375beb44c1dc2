"""FedCoLLM (arXiv 2411.11707): co-tuning a server LLM and client SLMs through the SLM's LoRA.

Round 0: the initial SLM adapter θ⁰ is taken from the LLM server's copy of the SLM and set on every client, so
all start from one init; everyone is evaluated.
Round t: clients train θ_k for E epochs on private data (CE) → the coordinator pulls each θ_k (tagged with its
run/round/step) and FedAvgs them by sample count (A and B separately, or the exact product mean; see
cotune/algorithms/aggregate.py), rejecting bad uploads → the aggregate goes to the LLM server, which loads it into its
SLM copy g and co-distils with the LLM f on the public set (θ with CE_g + λ·KL(f‖g), ω with CE_f + λ·KL(g‖f),
alternating per batch; KL(teacher‖student) is the default `kl_direction`, "reverse" takes KL(student‖teacher) as the
paper writes it) → the distilled θᵗ is broadcast to every client → everyone is evaluated.

Every client and the LLM server's SLM copy share one tokenizer (adapters are averaged key by key). The LLM may use
another one when the run spec sets `align_tokenizers` (an extension: no published system does this): the coordinator
has the alignment service build MinED maps LLM → SLM and SLM → LLM once, delivers them to the LLM server with each
CoDistillTask, and the KL is taken at aligned positions against the other model's top-k projected through the map
(cotune/algorithms/fedcollm/losses_cross.py).
"""

from __future__ import annotations

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, Strategy
from cotune.algorithms.fedcollm.config import FedCoLLMConfig
from cotune.v1 import party_pb2


class FedCoLLM(Strategy):
    name = "fedcollm"
    config_class = FedCoLLMConfig
    summary = "FedAvg of client SLM LoRA, then server-side co-distillation of the LLM and the SLM"

    def check(self, config: FedCoLLMConfig, run, llm, clients) -> list[str]:
        comp = llm.companion if llm.HasField("companion") else None
        if comp is None or not comp.tokenizer_hash:
            return ["fedcollm needs the LLM server to hold a copy of the SLM for co-distillation: set "
                    "model.companion_slm_path in the LLM server's config (the clients' SLM model directory or GGUF)"]
        problems = []
        if comp.tokenizer_hash != llm.tokenizer_hash and not config.align_tokenizers:
            problems.append(f"the LLM ({llm.tokenizer_hash[:12]}…) and its SLM copy ({comp.tokenizer_hash[:12]}…) use "
                            "different tokenizers: fedcollm co-distils them over one vocabulary unless the run spec sets "
                            "fedcollm.align_tokenizers: true (MinED maps from the alignment service; an extension of "
                            "the paper)")
        problems += steps.homogeneity_problems(clients, what="fedcollm", reference=(
            "llm server's SLM copy", comp.tokenizer_hash, comp.lora_layout_hash))
        return problems

    def execute(self, d: Driver, config: FedCoLLMConfig) -> None:
        run = d.run
        maps = self._vocab_maps(d)
        theta = steps.get_adapter(d, d.llm, 0, target="companion", record="init")
        steps.broadcast(d, d.clients, 0, theta)
        d.set_step(0, "evaluate")
        steps.evaluate(d, [d.llm, *d.clients], 0)

        for rnd in range(1, run.rounds + 1):
            d.check_cancelled()
            active, samples = steps.train_local(d, d.clients, rnd)
            aggregate, _ = steps.collect_and_aggregate(d, active, rnd, theta, samples, config.aggregation)

            d.set_step(rnd, "co_distill")
            task = party_pb2.CoDistillTask(slm_adapter=d.ref(aggregate), kl_weight=config.kl_weight,
                                           epochs=config.distill_epochs, max_samples=run.max_public_samples,
                                           max_length=run.max_length, top_k=config.top_k,
                                           kl_direction=config.kl_direction)
            for field, sha in maps.items():
                getattr(task, field).CopyFrom(d.ref(sha))
            res = d.task(d.llm, rnd, "co_distill", co_distill=task)
            out = res.result
            if out.received_lora_hash != aggregate:  # legitimate when the server runs in bf16
                d.note(rnd, f"co_distill: the LLM server's SLM copy held {out.received_lora_hash[:12]}… after loading "
                            f"the aggregate {aggregate[:12]}… (dtype cast?)")
            # the LLM's own distillation term, in the columns every report shows
            d.record_metrics(rnd, d.llm.party_id, {**res.metrics, "distill_kd_before": out.llm_kl_before,
                                                   "distill_kd_after": out.llm_kl_after})
            steps.check_adapter(d, d.llm, rnd, "co_distill", out.slm_adapter.sha256, like=aggregate)
            theta = out.slm_adapter.sha256
            d.record_artifact(rnd, "distilled", theta)

            steps.broadcast(d, d.clients, rnd, theta)
            d.set_step(rnd, "evaluate")
            steps.evaluate(d, [d.llm, *d.clients], rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    @staticmethod
    def _vocab_maps(d: Driver) -> dict[str, str]:
        """{} with one tokenizer; else the CoDistillTask fields' MinED maps (LLM ↔ SLM), built once per run. Every
        client runs the SLM, so the first client holds the SLM's tokenizer bundle."""
        if d.llm.info.tokenizer_hash == d.llm.info.companion.tokenizer_hash:
            return {}
        d.set_step(0, "vocab_maps")
        slm = d.clients[0]
        return {"llm_to_slm_map": d.vocab_map(d.llm, slm), "slm_to_llm_map": d.vocab_map(slm, d.llm)}
