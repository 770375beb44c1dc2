"""FedBiOT (arXiv 2406.17706) and FedOT, its ablation without per-round emulator alignment.

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

from cotune.algorithms import steps
from cotune.algorithms.base import Driver, Strategy
from cotune.algorithms.fedbiot.config import FedBiOTConfig, FedOTConfig
from cotune.algorithms.fedbiot.plan import plan
from cotune.v1 import party_pb2

EMULATOR_SUFFIX = "/emulator"


class FedBiOT(Strategy):
    name = "fedbiot"
    config_class = FedBiOTConfig
    summary = "the server compresses its LLM into emulator + adapter; clients tune the adapter; the emulator is re-aligned"
    realign = True  # re-align the emulator after every aggregation

    def check(self, config: FedBiOTConfig, run, llm, clients) -> list[str]:
        problems = []
        if not llm.num_layers:
            problems.append(f"the LLM server ({llm.model_name}) reports no decoder layer count: its architecture's "
                            "decoder layers cannot be located, so it cannot be compressed")
        else:
            try:
                plan(llm.num_layers, adapter_layers=config.adapter_layers, drop=config.drop)
            except ValueError as exc:
                problems.append(f"fedbiot cannot compress the LLM ({llm.model_name}, {llm.num_layers} layers) with "
                                f"adapter_layers={config.adapter_layers}, drop={config.drop}: {exc}")
        empty = sorted(cid for cid, info in clients.items() if not info.private_set_size)
        if empty:
            problems.append(f"{self.name}: client(s) {', '.join(empty)} hold no private data to train on")
        return problems

    def execute(self, d: Driver, config: FedBiOTConfig) -> None:
        llm, clients = d.llm, d.clients

        d.set_step(0, "compress")
        res = d.task(llm, 0, "compress",
                     compress=party_pb2.CompressTask(adapter_layers=config.adapter_layers, drop=config.drop))
        archive = res.result.model
        d.record_artifact(0, "model", archive.sha256)
        d.record_metrics(0, llm.party_id, res.metrics)
        d.note(0, f"{self.name}: compressed the LLM into {len(res.result.layer_map)} of {res.result.original_layers} "
                  f"layers (original layers {', '.join(map(str, res.result.layer_map))})", kind="info")

        d.set_step(0, "load_model")
        out = d.on_parties(clients, 0, "load_model",
                           lambda c: d.task(c, 0, "load_model", load_model=party_pb2.LoadModelTask(model=archive)),
                           quorum=steps.quorum(d))
        clients = [c for c in clients if c.party_id in out.ok]  # without the compressed model a client cannot take part
        self.align(d, config, 0, steps=config.pre_align_steps, aggregate="")
        theta = steps.get_adapter(d, llm, 0, target="compressed", record="aligned")
        steps.broadcast(d, clients, 0, theta)
        self.evaluate(d, clients, 0)

        train = party_pb2.TrainAdapterTask(epochs=d.run.local_epochs, prox_eps=config.prox_eps)
        for rnd in range(1, d.run.rounds + 1):
            d.check_cancelled()
            active, samples = steps.train_local(d, clients, rnd, task=train)
            aggregate, _ = steps.collect_and_aggregate(d, active, rnd, theta, samples, config.aggregation)
            self.align(d, config, rnd, steps=config.align_steps if self.realign else 0, aggregate=aggregate)
            theta = steps.get_adapter(d, llm, rnd, target="compressed", record="aligned")
            steps.broadcast(d, clients, rnd, theta)
            self.evaluate(d, clients, rnd)
            d.emit("metrics", round=rnd, message=f"round {rnd} complete")

    @staticmethod
    def align(d: Driver, config: FedBiOTConfig, rnd: int, *, steps: int, aggregate: str) -> None:
        """Load the aggregate's adapter layers on the server (none at round 0), plug them into the full model and
        align the emulator for `steps` steps (0: plug only)."""
        task = party_pb2.AlignEmulatorTask(steps=steps, kl_weight=config.kl_weight, max_samples=d.run.max_public_samples,
                                           max_length=d.run.max_length)
        if config.align_lr is not None:
            task.lr = config.align_lr
        if aggregate:
            task.adapter.CopyFrom(d.ref(aggregate))
        d.set_step(rnd, "align_emulator")
        res = d.task(d.llm, rnd, "align_emulator", align_emulator=task)
        d.record_metrics(rnd, d.llm.party_id, res.metrics)

    @staticmethod
    def evaluate(d: Driver, clients, rnd: int) -> None:
        """The clients' emulator + adapter; on the LLM server both the adapter plugged into the full model (party
        `llm`) and the emulator + adapter (party `llm/emulator`)."""
        d.set_step(rnd, "evaluate")
        steps.evaluate(d, [d.llm, *clients], rnd)
        steps.evaluate(d, [d.llm], rnd, target="compressed", suffix=EMULATOR_SUFFIX)


class FedOT(FedBiOT):
    """FedBiOT's pipeline with the emulator aligned once (S₀ steps before round 1) and never again: the offsite-
    tuning baseline of the FedBiOT paper. The adapter is still plugged into the full model every round, for the
    adapter-in-full-model evaluation."""

    name = "fedot"
    config_class = FedOTConfig
    summary = "FedBiOT without per-round emulator alignment (offsite-tuning)"
    realign = False
