"""Steps several strategies share: evaluation, local training, adapter broadcast and FedAvg of client adapters.

Adapters travel store-and-forward through the coordinator's artifact store (the driver moves them and counts the
bytes by task field: `get_lora.adapter` up, `set_lora.adapter` down, ...). The shas of what a round moved are kept
in the round record's artifacts for audit (and for tests that recompute the aggregate from what the clients sent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from cotune.algorithms.aggregate import UploadRejected, aggregate_uploads, parse_adapter, validate_upload
from cotune.algorithms.base import Driver, MalformedResult, PartyRef
from cotune.errors import Precondition
from cotune.v1 import party_pb2
from cotune.wire.media import MEDIA_ADAPTER
from cotune.wire.safetensors_io import adapter_bytes


@dataclass(frozen=True)
class Aggregate:
    """A round's FedAvg: the aggregate's sha in the artifact store, the accepted clients' weights, and why the
    others were rejected."""

    sha: str
    accepted: dict[str, float]
    rejected: dict[str, str]


def quorum(d: Driver, parties: Sequence[PartyRef] | None = None) -> int:
    """How many of `parties` (default: the run's clients) must succeed: all of them unless min_clients is set."""
    return d.run.quorum(len(d.clients if parties is None else parties))


def evaluate(d: Driver, parties: Sequence[PartyRef], rnd: int, *, target: str = "", suffix: str = "") -> None:
    """Evaluate `parties` (quorum 1: evaluation informs, it does not gate the run); metrics recorded under
    party_id + suffix."""
    task = party_pb2.EvaluateTask(max_samples=d.run.eval_max_samples, target=target)
    step = f"evaluate{'_' + target if target else ''}"
    out = d.on_parties(parties, rnd, step, lambda p: d.task(p, rnd, step, evaluate=task), quorum=1)
    for pid, res in out.ok.items():
        d.record_metrics(rnd, pid + suffix, res.metrics)


def train_local(d: Driver, clients: Sequence[PartyRef], rnd: int, *, task=None) -> tuple[list[PartyRef], dict[str, float]]:
    """Local training on every client: CE on private data (TrainLocalTask), or the task given (FedBiOT's
    TrainAdapterTask). Returns (the clients that succeeded, their sample counts: the FedAvg weights)."""
    task = task if task is not None else party_pb2.TrainLocalTask(epochs=d.run.local_epochs)
    kind = "train_adapter" if isinstance(task, party_pb2.TrainAdapterTask) else "train_local"
    d.set_step(rnd, "train_local")

    def one(c: PartyRef):
        res = d.task(c, rnd, "train_local", **{kind: task})
        # the sample count is the client's FedAvg weight: no more than the private set it described
        if not 0 <= res.result.samples <= c.info.private_set_size:
            raise MalformedResult(c, rnd, "train_local", f"it reports {res.result.samples} training samples, but "
                                                         f"described {c.info.private_set_size} private samples")
        return res

    out = d.on_parties(clients, rnd, "train_local", one, quorum=quorum(d, clients))
    for pid, res in out.ok.items():
        d.record_metrics(rnd, pid, res.metrics)
    return [c for c in clients if c.party_id in out.ok], {pid: float(res.result.samples) for pid, res in out.ok.items()}


def broadcast(d: Driver, clients: Sequence[PartyRef], rnd: int, sha: str) -> list[PartyRef]:
    """SetLora on every client with the artifact `sha` (canonical adapter bytes: the client's lora_hash afterwards
    equals sha). A client that fails is dropped from the round; returns the clients that now hold it."""
    d.set_step(rnd, "set_lora")
    d.record_artifact(rnd, "broadcast", sha)

    def one(c: PartyRef):
        res = d.task(c, rnd, "set_lora", set_lora=party_pb2.SetLoraTask(adapter=d.ref(sha)))
        if res.result.lora_hash != sha:  # e.g. a client in bf16 rounds the adapter: legitimate, but worth a note
            d.note(rnd, f"set_lora: {c.party_id} holds adapter {res.result.lora_hash[:12]}… after loading {sha[:12]}… "
                        "(dtype cast?)")
        return res

    out = d.on_parties(clients, rnd, "set_lora", one, quorum=quorum(d))
    return [c for c in clients if c.party_id in out.ok]


def get_adapter(d: Driver, source: PartyRef, rnd: int, *, target: str = "", record: str = "") -> str:
    """The adapter `source` holds (its model, its companion SLM or its compressed model), pulled into the artifact
    store; its sha is recorded in the round's artifacts as `record` when given."""
    step = f"get_{target}_lora" if target else "get_lora"
    d.set_step(rnd, step)
    res = d.task(source, rnd, step, get_lora=party_pb2.GetLoraTask(target=target))
    sha = res.result.adapter.sha256
    check_adapter(d, source, rnd, step, sha)
    if record:
        d.record_artifact(rnd, record, sha)
    return sha


def check_adapter(d: Driver, party: PartyRef, rnd: int, step: str, sha: str, *, like: str = "") -> None:
    """The adapter `party` answered `step` with (artifact `sha`) is what an upload must be (aggregate.validate_upload:
    the keys and shapes of the adapter `like`, when given; finite values within the bound), else MalformedResult, so
    a bad adapter is refused where it came from instead of failing every party it is sent to."""
    try:
        state, _ = parse_adapter(d.read_artifact(sha))
        validate_upload(state, parse_adapter(d.read_artifact(like))[0] if like else state, max_abs=d.run.adapter_max_abs)
    except UploadRejected as exc:
        raise MalformedResult(party, rnd, step, f"its adapter {sha[:12]}…: {exc}") from exc


def collect_and_aggregate(d: Driver, clients: Sequence[PartyRef], rnd: int, reference_sha: str,
                          samples: dict[str, float], mode: str) -> tuple[str, list[PartyRef]]:
    """Pull every client's adapter (tagged with its run/round/step), validate each against the round's reference
    adapter, drop the bad ones with a reported reason, and FedAvg the rest by sample count. Returns the aggregate's
    sha (canonical bytes, in the artifact store) and the clients whose uploads were accepted."""
    d.set_step(rnd, "get_lora")
    out = d.on_parties(clients, rnd, "get_lora",
                       lambda c: d.task(c, rnd, "get_lora", get_lora=party_pb2.GetLoraTask(tag=True)), quorum=quorum(d))
    uploads = {pid: res.result.adapter.sha256 for pid, res in out.ok.items()}
    for pid, sha in uploads.items():
        d.record_artifact(rnd, f"upload/{pid}", sha)

    def aggregate() -> dict:
        reference, _ = parse_adapter(d.read_artifact(reference_sha))
        expect = {pid: {"cotune.run_id": d.run_id, "cotune.round": str(rnd), "cotune.party_id": pid,
                        "cotune.task_key": f"r{rnd}/get_lora/{pid}"} for pid in uploads}
        try:
            result = aggregate_uploads({pid: d.read_artifact(sha) for pid, sha in uploads.items()},
                                       {pid: samples.get(pid, float("nan")) for pid in uploads}, reference,
                                       expect=expect, mode=mode, min_accepted=quorum(d), max_abs=d.run.adapter_max_abs)
        except ValueError as exc:
            raise Precondition(f"round {rnd} aggregation: {exc}") from exc
        sha = d.put_artifact(adapter_bytes(result.state), MEDIA_ADAPTER)
        return dataclasses.asdict(Aggregate(sha, dict(result.accepted), dict(result.rejected)))

    d.set_step(rnd, "aggregate")
    res = Aggregate(**d.local_step(f"r{rnd}/aggregate", aggregate))  # stored as JSON: a restart replays it
    for pid, reason in res.rejected.items():
        d.note(rnd, f"aggregate: {pid} dropped from round {rnd}: upload rejected: {reason}", dropped=pid,
               step="aggregate")
    for pid, weight in res.accepted.items():
        d.record_metrics(rnd, pid, {"fedavg_weight": weight})
    d.record_artifact(rnd, "aggregate", res.sha)
    d.emit("metrics", round=rnd, step="aggregate",
           message=f"aggregate {res.sha[:12]} ({mode}) of {', '.join(sorted(res.accepted))}")
    return res.sha, [c for c in clients if c.party_id in res.accepted]


def homogeneity_problems(client_infos: dict, *, what: str, reference: tuple[str, str, str] | None = None) -> list[str]:
    """Every client (and the optional reference: (name, tokenizer hash, LoRA layout hash)) shares one tokenizer and
    one LoRA layout, so adapters average key by key."""
    entries = [(cid, i.tokenizer_hash, i.lora_layout_hash) for cid, i in sorted(client_infos.items())]
    if reference is not None:
        entries.insert(0, reference)
    problems = []
    if len({t for _, t, _ in entries}) > 1:
        problems.append(f"{what} needs every SLM to share one tokenizer (adapters are averaged key by key); these "
                        "differ: " + ", ".join(f"{n}={t[:12]}" for n, t, _ in entries)
                        + ". Use fedmkt for clients with different tokenizers")
    layouts = {lay for _, _, lay in entries}
    if len(layouts) > 1 or "" in layouts:
        problems.append(f"{what} needs one LoRA layout (same model architecture and lora.r/target modules) on every "
                        "SLM; these differ: " + ", ".join(f"{n}={(lay or 'unknown')[:12]}" for n, _, lay in entries))
    return problems

