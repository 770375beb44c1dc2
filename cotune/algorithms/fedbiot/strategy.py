"""FedBiOT (arXiv 2406.17706, DESIGN §4.4) and FedOT, its ablation without per-round emulator alignment.

Round 0: the LLM server compresses its model into emulator + adapter (CompressTask) and publishes it as a model
archive; the coordinator pulls it once and pushes it to every client (chunked, resumable, sha256-checked; a client
that already holds it receives nothing), and each client installs it in place of its configured model
(LoadModelTask). The server pre-aligns the emulator (S₀ steps of AlignEmulatorTask), the coordinator takes the
compressed model's LoRA (adapter + emulator) from the server and broadcasts it, so every client starts from it.
Round t: clients train only the adapter LoRA (CE + (ε/2)·‖θ − θᵗ‖² on the live parameters) → the coordinator
FedAvgs the uploads by sample count (validated like FedCoLLM's) → the server loads the aggregate's adapter layers,
plugs them into the full model by the layer map and re-aligns the emulator (S steps; FedOT: none) → the server's
compressed LoRA is broadcast → evaluation.

Evaluation reports the clients' emulator + adapter on their own eval sets, and on the LLM server's eval set both
the adapter plugged into the full model (party `llm`) and the emulator + adapter (party `llm/emulator`).
"""

from __future__ import annotations

import math

from cotune.errors import InvalidInput
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.algorithms import steps as lora_fed
from coordinator.driver import Party, RunDriver, Strategy

DEFAULTS = {"adapter_layers": 2, "drop": 0.2, "pre_align_steps": 20, "align_steps": 10, "beta": 1.0, "prox_eps": 0.01}
EMULATOR_SUFFIX = "/emulator"


def settings(spec: pb.RunSpec) -> dict:
    """The spec's FedBiOT settings with the defaults filled in (0 = default; pre_align_steps -1 = none)."""
    fb = spec.fedbiot
    out = {name: getattr(fb, name) or default for name, default in DEFAULTS.items()}
    out["pre_align_steps"] = max(out["pre_align_steps"], 0)
    out["align_lr"] = fb.align_lr
    return out


class FedBiOT(Strategy):
    name = "fedbiot"
    realign = True  # re-align the emulator after every aggregation

    def validate(self, spec, llm_info, client_infos) -> None:
        from cotune.algorithms.fedbiot.compress import plan

        fb = spec.fedbiot
        for name in ("drop", "beta", "prox_eps", "align_lr"):
            value = getattr(fb, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidInput(f"fedbiot.{name} must be finite and >= 0 (0 = default), got {value}")
        if fb.adapter_layers < 0 or fb.align_steps < 0 or fb.pre_align_steps < -1:
            raise InvalidInput("fedbiot.adapter_layers and align_steps must be >= 0 and pre_align_steps >= -1 "
                               f"(0 = default, -1 = no pre-alignment), got {fb.adapter_layers}, {fb.align_steps}, "
                               f"{fb.pre_align_steps}")
        s = settings(spec)
        if not 0 < s["drop"] < 1:
            raise InvalidInput(f"fedbiot.drop must be in (0, 1), got {s['drop']}")
        if not self.realign and fb.align_steps:
            raise InvalidInput(f"{self.name} never re-aligns the emulator after aggregation; leave fedbiot.align_steps "
                               "at 0 (use fedbiot for per-round alignment)")
        if not llm_info.num_layers:
            raise InvalidInput(f"the LLM server ({llm_info.model_name}) reports no decoder layer count: its architecture's "
                               "decoder layers cannot be located (or the server predates FedBiOT), so it cannot be compressed")
        try:
            plan(llm_info.num_layers, adapter_layers=s["adapter_layers"], drop=s["drop"])
        except ValueError as exc:
            raise InvalidInput(f"fedbiot cannot compress the LLM ({llm_info.model_name}, {llm_info.num_layers} "
                               f"layers) with adapter_layers={s['adapter_layers']}, drop={s['drop']}: {exc}") from exc
        if (spec.aggregation or "factors") not in ("factors", "product"):
            raise InvalidInput(f"aggregation must be factors or product, got {spec.aggregation!r}")
        empty = [cid for cid, info in client_infos.items() if not info.private_set_size]
        if empty:
            raise InvalidInput(f"{self.name}: client(s) {', '.join(sorted(empty))} hold no private data to train on")
        if not 0 <= spec.max_length <= 32768:
            raise InvalidInput(f"max_length must be in 0..32768 (0 = the parties' default), got {spec.max_length}")

    def execute(self, d: RunDriver) -> None:
        s = settings(d.spec)
        llm, clients = d.llm, d.clients

        d.set_step(0, "compress")
        res = d.task(llm, 0, "compress",
                     compress=party_pb2.CompressTask(adapter_layers=s["adapter_layers"], drop=s["drop"]))
        archive = res["blobs"]["model"]
        d.fetch(llm, archive, 0, "model_archive")
        lora_fed.record_artifact(d, 0, "model", archive)
        d.record_metrics(0, llm.party_id, res["metrics"])
        d.note(0, f"{self.name}: compressed the LLM into {int(res['metrics']['compressed_layers'])} of "
                  f"{int(res['metrics']['original_layers'])} layers (layer map {res['info']['layer_map']})", kind="info")

        def ship(c: Party):
            return d.task(c, 0, "load_model", before=lambda: d.deliver(c, archive, 0, "model_archive"),
                          load_model=party_pb2.LoadModelTask(model=d.ref(archive)))

        d.set_step(0, "load_model")
        d.on_parties(clients, 0, "load_model", ship, quorum=lora_fed.quorum(d))
        self.align(d, 0, steps=s["pre_align_steps"], aggregate="")
        theta = self.server_lora(d, 0)
        lora_fed.broadcast(d, clients, 0, theta)
        self.evaluate(d, 0)

        for rnd in range(1, d.spec.rounds + 1):
            d.check_cancelled()
            active, samples = lora_fed.train_local(d, clients, rnd, prox_eps=s["prox_eps"])
            aggregate, _ = lora_fed.collect_and_aggregate(d, active, rnd, theta, samples)
            self.align(d, rnd, steps=s["align_steps"] if self.realign else 0, aggregate=aggregate)
            theta = self.server_lora(d, rnd)
            lora_fed.broadcast(d, clients, rnd, theta)
            self.evaluate(d, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    def align(self, d: RunDriver, rnd: int, *, steps: int, aggregate: str) -> None:
        """Load the aggregate's adapter layers on the server (none at round 0), plug them into the full model and
        align the emulator for `steps` steps (0: plug only)."""
        s = settings(d.spec)
        task = party_pb2.AlignEmulatorTask(steps=steps, beta=s["beta"], lr=s["align_lr"],
                                           max_samples=d.spec.max_public_samples, max_length=d.spec.max_length)
        before = None
        if aggregate:
            task.adapter.CopyFrom(d.ref(aggregate))
            before = lambda: d.deliver(d.llm, aggregate, rnd, "adapter_aggregate")  # noqa: E731
        d.set_step(rnd, "align_emulator")
        res = d.task(d.llm, rnd, "align_emulator", before=before, align_emulator=task)
        d.record_metrics(rnd, d.llm.party_id, res["metrics"])

    @staticmethod
    def server_lora(d: RunDriver, rnd: int) -> str:
        """The server's compressed-model LoRA (adapter + aligned emulator): what the clients get next."""
        d.set_step(rnd, "get_compressed_lora")
        res = d.task(d.llm, rnd, "get_compressed_lora", get_lora=party_pb2.GetLoraTask(target="compressed"))
        sha = res["blobs"]["adapter"]
        d.fetch(d.llm, sha, rnd, "adapter_aligned")
        lora_fed.record_artifact(d, rnd, "aligned", sha)
        return sha

    @staticmethod
    def evaluate(d: RunDriver, rnd: int) -> None:
        d.set_step(rnd, "evaluate")
        lora_fed.evaluate(d, [d.llm, *d.clients], rnd)  # the LLM: full model with the adapter plugged in
        task = party_pb2.EvaluateTask(max_samples=d.spec.eval_max_samples, target="compressed")
        res = d.task(d.llm, rnd, "evaluate_emulator", evaluate=task)
        d.record_metrics(rnd, d.llm.party_id + EMULATOR_SUFFIX, res["metrics"])


class FedOT(FedBiOT):
    """FedBiOT's pipeline with the emulator aligned once (S₀ steps before round 1) and never again: the offsite-
    tuning baseline of the FedBiOT paper. The adapter is still plugged into the full model every round, for the
    adapter-in-full-model evaluation."""

    name = "fedot"
    realign = False
