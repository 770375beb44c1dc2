"""Per-round reports of a run: JSON for machines, a markdown table for people."""

from __future__ import annotations

from cotune.profile import PHASES
from cotune.v1 import coordinator_pb2 as pb

# (metric key, column title, format)
COLUMNS = [
    ("train_loss_last", "train CE", "{:.3f}"),
    ("distill_kd_before", "KD before", "{:.3f}"),
    ("distill_kd_after", "KD after", "{:.3f}"),
    ("public_loss", "public loss", "{:.3f}"),
    ("public_bpb", "public bpb", "{:.3f}"),
    ("eval_accuracy", "eval acc", "{:.3f}"),
]


def run_summary(run: pb.Run) -> dict:
    rounds = []
    for rec in sorted(run.rounds, key=lambda r: r.round):
        rounds.append({
            "round": rec.round,
            "parties": {p.party_id: dict(sorted(p.metrics.items())) for p in rec.parties},
            "bytes_sent": dict(rec.bytes_sent),
            "bytes_received": dict(rec.bytes_received),
            "dropped": list(rec.dropped),
            "notes": list(rec.notes),
        })
    return {
        "run_id": run.run_id,
        "algorithm": run.spec.algorithm,
        "settings": _settings(run.spec),
        "state": pb.RunState.Name(run.state),
        "error": run.error,
        "clients": list(run.spec.clients),
        "public_set_hash": run.spec.public_set_hash,
        "rounds": rounds,
    }


def _settings(spec: pb.RunSpec) -> dict:
    """The algorithm's settings as the spec gave them (unset fields take the algorithm's defaults)."""
    from google.protobuf import json_format

    section = spec.WhichOneof("config")
    return json_format.MessageToDict(getattr(spec, section), preserving_proto_field_name=True) if section else {}


def _party_order(pid: str) -> tuple:
    return (0 if pid.split("/")[0] == "llm" else 1, pid)  # "llm/emulator": FedBiOT's emulator + adapter


def markdown_table(run: pb.Run) -> str:
    lines = ["| round | party | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
             "|---:|---|" + "---:|" * len(COLUMNS)]
    for rec in sorted(run.rounds, key=lambda r: r.round):
        for party in sorted(rec.parties, key=lambda p: _party_order(p.party_id)):
            cells = [fmt.format(party.metrics[key]) if key in party.metrics else "" for key, _, fmt in COLUMNS]
            lines.append(f"| {rec.round} | {party.party_id} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bytes_table(run: pb.Run) -> str:
    kinds = sorted({k for r in run.rounds for k in list(r.bytes_sent) + list(r.bytes_received)})
    if not kinds:
        return ""
    lines = ["| round | " + " | ".join(f"{k} sent / received" for k in kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for rec in sorted(run.rounds, key=lambda r: r.round):
        cells = [f"{human_bytes(rec.bytes_sent.get(k, 0))} / {human_bytes(rec.bytes_received.get(k, 0))}" for k in kinds]
        lines.append(f"| {rec.round} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


PROFILE_COLUMNS = ("wall", "data", "forward", "backward", "optimizer", "codec", "other", "transfer", "queue", "wait")


def step_profiles(run: pb.Run) -> list[tuple[int, str, str, dict[str, float]]]:
    """(round, step, party, seconds by phase) of every task the run recorded, in order. Phases: the party's
    `data`/`forward`/`backward`/`optimizer`/`codec` (cotune.profile) and `other` (the rest of its work), the
    coordinator's `transfer` (moving the task's blobs), `queue` (waiting for the party's worker and its answer),
    `wait` (for the slowest party of the step) and `wall` (the step on this party, transfers included)."""
    rows = []
    for rec in sorted(run.rounds, key=lambda r: r.round):
        for party in sorted(rec.parties, key=lambda p: _party_order(p.party_id)):
            steps: dict[str, dict[str, float]] = {}
            for key, value in party.metrics.items():
                if key.startswith("time/"):
                    _, step, name = key.split("/", 2)
                    steps.setdefault(step, {})[name] = value
            for step, seconds in steps.items():
                work = seconds.get("total", 0.0)
                seconds["other"] = max(0.0, work - sum(seconds.get(p, 0.0) for p in PHASES))
                rows.append((rec.round, step, party.party_id, seconds))
    return sorted(rows, key=lambda r: (r[0], -r[3].get("wall", 0.0)))


def profile_table(run: pb.Run) -> str:
    """Where each step's time went, per party, seconds (the slowest steps of each round first)."""
    rows = step_profiles(run)
    if not rows:
        return ""
    lines = ["| round | step | party | " + " | ".join(PROFILE_COLUMNS) + " |", "|---:|---|---|" + "---:|" * len(PROFILE_COLUMNS)]
    for rnd, step, pid, seconds in rows:
        cells = [f"{seconds[c]:.1f}" if c in seconds else "" for c in PROFILE_COLUMNS]
        lines.append(f"| {rnd} | {step} | {pid} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """A byte count for people: 812 B, 3.4 KiB, 1.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
