"""Steps shared by the strategies that move LoRA adapters (FedCoLLM, FedAvg) and by the simple baselines.

Adapters travel store-and-forward through the coordinator's artifact store; every transfer is counted per
message type in the round record (`adapter_up`: client → coordinator, `adapter_down`: coordinator → client,
`adapter_aggregate`: coordinator → LLM server, `adapter_distilled` / `adapter_init`: LLM server → coordinator).
The shas of what a round moved are kept in `RoundRecord.artifacts` for audit (and for tests that recompute
the aggregate from what the clients sent).
"""

from __future__ import annotations

import hashlib

from cotune.errors import InvalidInput, Precondition
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.algorithms.aggregate import MODES, aggregate_uploads, parse_adapter
from coordinator.driver import Party, RunDriver


def quorum(d: RunDriver) -> int:
    return d.spec.min_clients or len(d.clients)


def record_artifact(d: RunDriver, rnd: int, name: str, sha: str) -> None:
    with d._lock:
        d.round_record(rnd).artifacts[name] = sha
        d.save()


def evaluate(d: RunDriver, parties, rnd: int) -> None:
    task = party_pb2.EvaluateTask(max_samples=d.spec.eval_max_samples)
    out = d.on_parties(parties, rnd, "evaluate", lambda p: d.task(p, rnd, "evaluate", evaluate=task), quorum=1)
    for pid, res in out.ok.items():
        d.record_metrics(rnd, pid, res["metrics"])


def train_local(d: RunDriver, clients, rnd: int, *, prox_eps: float = 0.0) -> tuple[list[Party], dict[str, float]]:
    """Local training on every client (CE; FedBiOT's adapter-only CE + proximal term when prox_eps > 0); returns
    (the clients that succeeded, their sample counts)."""
    task = party_pb2.TrainLocalTask(epochs=d.spec.local_epochs or 1, prox_eps=prox_eps)
    d.set_step(rnd, "train_local")
    out = d.on_parties(clients, rnd, "train_local", lambda c: d.task(c, rnd, "train_local", train_local=task), quorum=quorum(d))
    for pid, res in out.ok.items():
        d.record_metrics(rnd, pid, res["metrics"])
    return [c for c in clients if c.party_id in out.ok], {pid: res["metrics"].get("train_samples", 0.0) for pid, res in out.ok.items()}


def broadcast(d: RunDriver, clients, rnd: int, sha: str, *, step: str = "set_lora") -> list[Party]:
    """SetLora on every client with the artifact `sha` (canonical adapter bytes: the client's lora_hash afterwards
    equals sha). A client that fails is dropped from the round; returns the clients that now hold it."""
    d.set_step(rnd, step)
    record_artifact(d, rnd, "broadcast", sha)

    def one(c: Party):
        res = d.task(c, rnd, step, before=lambda: d.deliver(c, sha, rnd, "adapter_down"),
                     set_lora=party_pb2.SetLoraTask(adapter=d.ref(sha)))
        got = res["info"].get("lora_hash", "")
        if got != sha:  # e.g. a client in bf16 rounds the adapter: legitimate, but worth a note
            d.note(rnd, f"{step}: {c.party_id} holds adapter {got[:12]}… after loading {sha[:12]}… (dtype cast?)")
        return res

    out = d.on_parties(clients, rnd, step, one, quorum=quorum(d))
    return [c for c in clients if c.party_id in out.ok]


def initial_adapter(d: RunDriver, source: Party, *, target: str = "") -> str:
    """Round 0: the adapter everyone starts from, pulled from `source` (its model, its companion SLM or its
    compressed model)."""
    step = f"get_{target}_lora" if target else "get_lora"
    d.set_step(0, step)
    res = d.task(source, 0, step, get_lora=party_pb2.GetLoraTask(target=target))
    sha = res["blobs"]["adapter"]
    d.fetch(source, sha, 0, "adapter_init")
    record_artifact(d, 0, "init", sha)
    return sha


def collect_and_aggregate(d: RunDriver, clients, rnd: int, reference_sha: str, samples: dict[str, float]) -> tuple[str, list[Party]]:
    """Pull every client's adapter (tagged with its run/round/step), validate each against the round's reference
    adapter, drop the bad ones with a reported reason, and FedAvg the rest by sample count. Returns the aggregate's
    sha (canonical bytes, in the artifact store) and the clients whose uploads were accepted."""
    d.set_step(rnd, "get_lora")

    def upload(c: Party):
        res = d.task(c, rnd, "get_lora", get_lora=party_pb2.GetLoraTask(tag=True))
        d.fetch(c, res["blobs"]["adapter"], rnd, "adapter_up")
        return res

    out = d.on_parties(clients, rnd, "get_lora", upload, quorum=quorum(d))
    uploads = {pid: res["blobs"]["adapter"] for pid, res in out.ok.items()}
    for pid, sha in uploads.items():
        record_artifact(d, rnd, f"upload/{pid}", sha)
    mode = d.spec.aggregation or "factors"

    def aggregate():
        from cotune.lm.lora import lora_to_bytes

        reference, _ = parse_adapter(d.artifacts.read_bytes(reference_sha))
        expect = {pid: {"cotune.run_id": d.run_id, "cotune.round": str(rnd), "cotune.party_id": pid,
                        "cotune.task_key": f"r{rnd}/get_lora/{pid}"} for pid in uploads}
        try:
            result = aggregate_uploads({pid: d.artifacts.read_bytes(sha) for pid, sha in uploads.items()},
                                       {pid: samples.get(pid, float("nan")) for pid in uploads}, reference,
                                       expect=expect, mode=mode, min_accepted=quorum(d))
        except ValueError as exc:
            raise Precondition(f"round {rnd} aggregation: {exc}") from exc
        blob = d.artifacts.put_bytes(lora_to_bytes(result.state), "application/safetensors+lora")
        return {"aggregate": blob.sha256, "accepted": result.accepted, "rejected": result.rejected, "mode": mode}

    d.set_step(rnd, "aggregate")
    res = d.step(f"r{rnd}/aggregate", aggregate)
    for pid, reason in res["rejected"].items():
        d.note(rnd, f"aggregate: {pid} dropped from round {rnd}: upload rejected: {reason}", dropped=pid)
    for pid, weight in res["accepted"].items():
        d.record_metrics(rnd, pid, {"fedavg_weight": weight})
    record_artifact(d, rnd, "aggregate", res["aggregate"])
    d.emit("metrics", round=rnd, step="aggregate",
           message=f"aggregate {res['aggregate'][:12]} ({res['mode']}) of {', '.join(sorted(res['accepted']))}")
    return res["aggregate"], [c for c in clients if c.party_id in res["accepted"]]


def validate_homogeneous(spec: pb.RunSpec, client_infos: dict, *, what: str, reference: tuple[str, str, str] | None = None) -> None:
    """Every client (and the optional reference: (name, tokenizer hash, LoRA layout hash)) shares one tokenizer and
    one LoRA layout, so adapters average key by key."""
    if (spec.aggregation or "factors") not in MODES:
        raise InvalidInput(f"aggregation must be one of {', '.join(MODES)}, got {spec.aggregation!r}")
    entries = [(cid, i.tokenizer_hash, i.lora_layout_hash) for cid, i in sorted(client_infos.items())]
    if reference is not None:
        entries.insert(0, reference)
    toks = {t for _, t, _ in entries}
    if len(toks) > 1:
        raise InvalidInput(f"{what} needs every SLM to share one tokenizer (adapters are averaged key by key); "
                           "these differ: " + ", ".join(f"{n}={t[:12]}" for n, t, _ in entries)
                           + ". SLMs with different tokenizers cannot average adapters; use fedmkt for heterogeneous clients")
    layouts = {lay for _, _, lay in entries}
    if len(layouts) > 1 or "" in layouts:
        raise InvalidInput(f"{what} needs one LoRA layout (same model architecture and lora.r/target modules) on every SLM; "
                           "these differ: " + ", ".join(f"{n}={(lay or 'unknown')[:12]}" for n, _, lay in entries))


def canonical_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
