"""Kill matrix: every service killed with SIGKILL at every step kind of a run, restarted, and the run still ends exactly
as an uninterrupted run of the same spec on the same cluster.

For each cell (service × step) a run of a fixed spec is started; when the run reaches the step (its `step` event, or
for the alignment service a build's `progress` event) and, for a party taking part, about half of the time that
party's task took in the reference run has passed, the service is killed (`LocalCluster.kill`), what it had made
durable is inspected (did the step commit before the kill?), and it is restarted (`LocalCluster.restart`: the LLM
server and the alignment service on their port, a client on a new port, registered again). The run must then
succeed, and match the reference run:

- every metric of every party and round, exactly (timings excluded: the profile's `time/<step>/<phase>`; see
  NONDETERMINISTIC);
- the artifacts each round recorded (logits shards, aggregates, the FedBiOT model archive: content hashes; client
  uploads by their tensors and tags but the run id, which a tagged upload carries by design, so their bytes differ
  from run to run);
- no party dropped, no extra note;
- the final adapter of every party, byte for byte: exported after the run with a `get_lora` task under the run's id
  (`RunContext.resumes`: the party restores that run's committed state), and the digests of every file of the run's
  committed state on the party's disk (adapter, optimizer/schedule/counters, algorithm states).

Where the kill landed is reported from what the service had made durable when it died: a party's step in flight
(no operation record for its step key) or after its commit; a party taking no part in the step ("idle": it must
restore the run's state at its next step); the coordinator's stored step results; the alignment builds cached. Also
how the coordinator met it (its run events: the operation lost and re-issued, a wait, or nothing).

Time to recover: kill → the first progress event of the killed service's work after it was restarted (for the
coordinator, of the run: anyone's progress, a round completed, or the run's end; for a party killed while idle this
includes waiting for its next step; "no work of it left" when it had none). Also reported: kill → the service
healthy again (restarted; a client registered again), and how long the coordinator waited for it (its "... is back
after N s" event).

The reference is an uninterrupted run on the same cluster; runs are isolated (each starts from the configured models),
which `test_reference_is_repeatable` checks with a second uninterrupted run.

CI runs a slice (llm@llm_distill, client-1@train_local, coordinator@client_logits, alignment@vocab_map, and FedBiOT's
client-1@load_model); `--full-kill-matrix` (or COTUNE_FULL_KILL_MATRIX=1) runs every cell. The table is printed (-s)
and written as JSON to $COTUNE_KILL_MATRIX_JSON when set.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import pytest
import yaml

from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2
from cotune.algorithms.aggregate import parse_adapter
from tests.integration.cluster_fixtures import TEST_PRESET, Artifacts, coordinator_client, start_tiny_cluster

pytestmark = pytest.mark.integration

TERMINAL = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
# metrics that measure time, not what was computed: they legitimately differ between two runs of one spec
NONDETERMINISTIC = ("time/",)
RUN_ID_TAG = "cotune.run_id"  # the run an upload answers, in its safetensors metadata: differs per run by design
CLIENTS = ("client-1", "client-2")

# steps made long enough (a few tenths of a second each on 2 cores) that a kill can land while they run
MKT_SPEC = dict(algorithm="fedmkt", rounds=1, max_public_samples=16, local_epochs=3,
                fedmkt=dict(top_k=8, ce_weight=TEST_PRESET.lam, distill_epochs=3))
BIOT_SPEC = dict(algorithm="fedbiot", rounds=1, max_public_samples=8,
                 fedbiot=dict(adapter_layers=2, drop=0.5, pre_align_steps=4, align_steps=2, align_lr=1e-3,
                              prox_eps=0.05))


def make_spec(spec: dict, **over) -> pb.RunSpec:
    spec = {**spec, **over}
    kw = {k: v for k, v in spec.items() if k not in ("fedmkt", "fedbiot", "fedavg")}
    if "fedmkt" in spec:
        kw["fedmkt"] = pb.FedMKTSpec(**spec["fedmkt"])
    if "fedbiot" in spec:
        kw["fedbiot"] = pb.FedBiOTSpec(**spec["fedbiot"])
    if "fedavg" in spec:
        kw["fedavg"] = pb.FedAvgSpec(**spec["fedavg"])
    return pb.RunSpec(name=f"km-{spec['algorithm']}", max_length=TEST_PRESET.max_length, **kw)


# -- following a run ---------------------------------------------------------------------------------------------
class EventLog:
    """A run's events, followed in a thread across coordinator restarts (it redials the cluster's coordinator at its
    current address)."""

    def __init__(self, cluster, run_id: str):
        self.cluster, self.run_id = cluster, run_id
        self.events: list[pb.RunEvent] = []
        self.cond = threading.Condition()
        self.finished = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name=f"events-{run_id}", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        last = 0
        while not self._stop.is_set():
            if not self.cluster.services["coordinator"].address:  # being restarted: no port yet
                time.sleep(0.05)
                continue
            try:
                client = self.cluster.coordinator_client()
            except Exception:  # noqa: BLE001 - the coordinator is being restarted
                time.sleep(0.1)
                continue
            try:
                for event in client.watch_run(self.run_id, after_seq=last, timeout=60):
                    last = event.seq
                    with self.cond:
                        self.events.append(event)
                        self.cond.notify_all()
                if client.get_run(self.run_id).state in TERMINAL:
                    with self.cond:
                        self.finished = True
                        self.cond.notify_all()
                    return
            except grpc.RpcError:
                time.sleep(0.1)
            finally:
                client.close()

    def wait_for(self, match, timeout: float = 300.0) -> pb.RunEvent:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for event in self.events[seen:]:
                    if match(event):
                        return event
                seen = len(self.events)
                if self.finished:
                    raise AssertionError(f"run {self.run_id} ended without the event awaited")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"run {self.run_id}: the event awaited did not come within {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))

    def wait_finished(self, timeout: float = 600.0) -> pb.Run:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self.finished:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"run {self.run_id} did not finish within {timeout:.0f} s")
                self.cond.wait(min(left, 1.0))
        client = self.cluster.coordinator_client()
        try:
            return client.get_run(self.run_id)
        finally:
            client.close()

    def close(self) -> None:
        self._stop.set()


def run_alone(cluster, spec: pb.RunSpec, timeout: float = 600.0) -> pb.Run:
    client = coordinator_client(cluster)
    try:
        run = client.start_run(spec)
    finally:
        client.close()
    log = EventLog(cluster, run.run_id)
    try:
        return log.wait_finished(timeout)
    finally:
        log.close()


# -- what a run computed -------------------------------------------------------------------------------------------
def timing(name: str) -> bool:
    return name.startswith(NONDETERMINISTIC[0]) or any(part in name for part in NONDETERMINISTIC[1:])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def state_digests(cluster, run_id: str) -> dict[str, dict[str, str]]:
    """Per party: sha256 of every file of the run's committed state on its disk (meta.json, which names the run and
    the step that committed it, left out)."""
    out = {}
    for name in ["llm", *CLIENTS]:
        root = Path(cluster.workdir) / name / "runs" / run_id / "state"
        if not root.is_dir():
            continue
        out[name] = {str(p.relative_to(root)): _sha(p.read_bytes()) for p in sorted(root.rglob("*"))
                     if p.is_file() and p.name != "meta.json"}
    return out


def export_adapters(cluster, run: pb.Run, targets: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Each party's final adapter for `run` (sha256 of its canonical safetensors bytes), read with a `get_lora` task
    of that run (resumes: the party restores the run's committed state), as the coordinator."""
    last = max((r.round for r in run.rounds), default=0)
    out = {}
    for name, names in targets.items():
        client = cluster.party_client(name)
        try:
            for target in names:
                ctx = party_pb2.RunContext(run_id=run.run_id, round=last, task_key=f"export/{target or 'model'}",
                                           resumes=True)
                op = client.run_task(party_pb2.TaskRequest(ctx=ctx, get_lora=party_pb2.GetLoraTask(target=target)),
                                     timeout_s=300)
                res = party_pb2.GetLoraResult()
                assert op.result.Unpack(res), op.result.type_url
                assert res.adapter.sha256 == res.lora_hash, (name, target)  # the canonical bytes, untagged
                out[f"{name}/{target or 'model'}"] = res.lora_hash
        finally:
            client.close()
    return out


def upload_digest(data: bytes) -> str:
    """A client upload's content: its tensors and its tags but the run id (an upload names the run it answers, so its
    bytes differ from run to run by design; cotune.party.tasks.get_lora)."""
    tensors, meta = parse_adapter(data)
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = tensors[key]
        h.update(f"{key}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(json.dumps({k: v for k, v in sorted(meta.items()) if k != RUN_ID_TAG}).encode())
    return "content:" + h.hexdigest()


def fingerprint(cluster, run: pb.Run, targets: dict[str, tuple[str, ...]]) -> dict:
    """Everything a run computed that another run of its spec must reproduce exactly."""
    metrics, artifacts, dropped, notes = {}, {}, {}, {}
    store = Artifacts(cluster, Path(cluster.workdir) / "kill-matrix-pulled")
    try:
        for rec in run.rounds:
            for p in rec.parties:
                metrics[f"r{rec.round}/{p.party_id}"] = {k: v for k, v in sorted(p.metrics.items()) if not timing(k)}
            artifacts[f"r{rec.round}"] = {name: upload_digest(store.read(sha)) if name.startswith("upload/") else sha
                                          for name, sha in sorted(rec.artifacts.items())}
    finally:
        store.close()
    for rec in run.rounds:
        dropped[f"r{rec.round}"] = sorted(rec.dropped)
        notes[f"r{rec.round}"] = sorted(rec.notes)
    return {"metrics": metrics, "artifacts": artifacts, "dropped": dropped, "notes": notes,
            "adapters": export_adapters(cluster, run, targets), "state": state_digests(cluster, run.run_id)}


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def differences(got: dict, want: dict, *, what: tuple[str, ...] = ("metrics", "artifacts", "dropped", "notes",
                                                                    "adapters", "state")) -> list[str]:
    """Where fingerprint `got` differs from `want` (one line each; empty: identical)."""
    out = []
    for section in what:
        g, w = got.get(section, {}), want.get(section, {})
        for key in sorted(set(g) | set(w)):
            if key not in g or key not in w:
                out.append(f"{section}: {key} only in {'the reference' if key in w else 'this run'}")
                continue
            gv, wv = g[key], w[key]
            if isinstance(gv, dict) and isinstance(wv, dict):
                for name in sorted(set(gv) | set(wv)):
                    if name not in gv or name not in wv or not _same(gv[name], wv[name]):
                        out.append(f"{section}: {key} {name}: {gv.get(name)!r} != reference {wv.get(name)!r}")
            elif not _same(gv, wv):
                out.append(f"{section}: {key}: {gv!r} != reference {wv!r}")
    return out


def task_walls(run: pb.Run) -> dict[tuple[int, str, str], float]:
    """(round, task step, party) -> the task's wall time (the driver's time/<step>/wall)."""
    out = {}
    for rec in run.rounds:
        for p in rec.parties:
            for name, value in p.metrics.items():
                if name.startswith("time/") and name.endswith("/wall"):
                    out[(rec.round, name.split("/")[1], p.party_id)] = value
    return out


# -- the matrix ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """Kill `service` when the run reaches `step` (a `step` event of round `round`; with `progress`, the first
    `progress` event of that step name instead), after `delay` (None: half of what the step's task took in the
    reference run for that party, or for the slowest party when the service takes no part)."""

    family: str           # "fedmkt" | "fedbiot": which cluster and spec
    service: str          # coordinator | llm | client-1 | alignment
    step: str             # the strategy's step name (set_step), or a build's progress step with `progress`
    round: int
    task: str = ""        # the task that step runs on parties ("" for none)
    parties: tuple = ()   # the parties running it
    also: tuple = ()      # (party, task) pairs running at the same time (overlapped steps): they take part too
    progress: bool = False
    delay: float | None = None
    cold_alignment: bool = False  # wipe the alignment service's cache first, so its builds really run
    name: str = ""        # what the cell kills (default: the step)

    def task_of(self, party: str) -> str:
        """The task `party` runs during this step ("" for none)."""
        return self.task if party in self.parties else dict(self.also).get(party, "")

    @property
    def id(self) -> str:
        return f"{self.family}:{self.service}@r{self.round}-{self.name or self.step}"


ALL = ("llm", *CLIENTS)
MKT_STEPS = [  # (step, round, task, parties, also): FedMKT's steps in order (rounds=1)
    ("align", 0, "", (), ()),
    ("evaluate", 0, "evaluate", ALL, ()),
    ("train_local", 1, "train_local", CLIENTS, ()),
    ("client_logits", 1, "public_logits", CLIENTS, ()),
    ("llm_distill", 1, "distill", ("llm",), ()),
    ("llm_logits", 1, "public_logits", ("llm",), ()),
    ("client_distill", 1, "distill", CLIENTS, (("llm", "evaluate"),)),  # the LLM's evaluation overlaps (overlap_steps)
    ("evaluate", 1, "evaluate", CLIENTS, ()),
]
BIOT_STEPS = [  # FedBiOT's round 0 (compress, ship, pre-align) and round 1's re-alignment
    ("compress", 0, "compress", ("llm",)),
    ("load_model", 0, "load_model", CLIENTS),
    ("align_emulator", 0, "align_emulator", ("llm",)),
    ("align_emulator", 1, "align_emulator", ("llm",)),
]


def _mkt_cells() -> list[Cell]:
    cells = []
    for service in ("coordinator", "llm", "client-1"):
        for step, rnd, task, parties, also in MKT_STEPS:
            cells.append(Cell("fedmkt", service, step, rnd, task, parties, also,
                              delay=1.5 if step == "align" else None, cold_alignment=step == "align"))
    # the alignment service during its builds, which the coordinator asks for one after another at step align of
    # round 0: per client a vocab map LLM -> client, the sequence alignment, then both client -> LLM. A map takes
    # 2-3 s to build on 2 cores, a sequence alignment of the public set about 1 s; a build's progress event comes when
    # it ends. So: 1 s after the first sequence alignment ended, the second map is being built; 0.7 s after the first
    # map ended (its result pulled, the public set pushed), the first sequence alignment is.
    cells.append(Cell("fedmkt", "alignment", "align:seq_alignment", 0, progress=True, delay=1.0, cold_alignment=True,
                      name="vocab_map"))
    cells.append(Cell("fedmkt", "alignment", "align:vocab_map", 0, progress=True, delay=0.7, cold_alignment=True,
                      name="seq_alignment"))
    return cells


def _biot_cells() -> list[Cell]:
    return [Cell("fedbiot", service, step, rnd, task, parties)
            for service in ("coordinator", "llm", "client-1") for step, rnd, task, parties in BIOT_STEPS]


SLICE = ("fedmkt:llm@r1-llm_distill", "fedmkt:client-1@r1-train_local", "fedmkt:coordinator@r1-client_logits",
         "fedmkt:alignment@r0-vocab_map", "fedbiot:client-1@r0-load_model")


def full_matrix(config) -> bool:
    try:
        option = config.getoption("--full-kill-matrix")
    except ValueError:  # tests/conftest.py did not register it
        option = False
    return bool(option) or os.environ.get("COTUNE_FULL_KILL_MATRIX", "") not in ("", "0")


def pytest_generate_tests(metafunc):
    full = full_matrix(metafunc.config)
    for name, cells in (("mkt_cell", _mkt_cells()), ("biot_cell", _biot_cells())):
        if name in metafunc.fixturenames:
            chosen = cells if full else [c for c in cells if c.id in SLICE]
            metafunc.parametrize(name, chosen, ids=[c.id for c in chosen])


def _step_label(cell: Cell) -> str:
    if cell.service == "alignment":
        return f"r0 align: {cell.name} build"
    tasks = ([cell.task] if cell.task and cell.task != cell.step else []) + [f"{p}: {t}" for p, t in cell.also]
    return f"r{cell.round} {cell.step}" + (f" ({'; '.join(tasks)})" if tasks else "")


@dataclass
class Row:
    cell: str
    service: str
    step: str
    landed: str = ""             # where the kill hit: the step in flight, committed, or the service idle
    coordinator_saw: str = ""    # how the coordinator met the outage (its run events)
    recovered: bool = False      # the run succeeded
    identical: bool = False      # ... and equals the reference run
    recover_s: float | None = None   # kill -> first progress of the killed service's work after its restart
    restart_s: float | None = None   # kill -> the service healthy (and registered) again
    waited_s: float | None = None    # the coordinator's wait for it ("... is back after N s")
    run_s: float | None = None       # the whole run
    differences: list = field(default_factory=list)
    error: str = ""
    trace: list = field(default_factory=list)  # the run's events from the kill to the recovery: (s after kill, event)


# -- inspecting the killed service -----------------------------------------------------------------------------------
def _op_path(party_dir: Path, run_id: str, key: str) -> Path:
    return party_dir / "runs" / run_id / "ops" / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")


def _party_landing(cluster, cell: Cell, run_id: str) -> str:
    task = cell.task_of(cell.service)
    if not task:
        return "idle (not in this step)"
    d = Path(cluster.workdir) / cell.service
    key = f"{run_id}/{cell.round}/r{cell.round}/{task}/{cell.service}"
    if _op_path(d, run_id, key).exists():
        return "after its commit"
    if (d / "runs" / run_id / "state.next").is_dir():
        return "staged, not committed"
    return "in flight (not committed)"


def _coordinator_landing(cluster, cell: Cell, run_id: str) -> str:
    path = Path(yaml.safe_load(cluster.services["coordinator"].config_path.read_text())["workdir"]) / "state.sqlite3"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        keys = [r[0] for r in db.execute("SELECT step_key FROM steps WHERE run_id = ?", (run_id,))]
    finally:
        db.close()
    if cell.step == "align":
        built = sum(k.startswith(("r0/vocab_map/", "r0/seq_alignment/")) for k in keys)
        return f"in flight ({built} of 8 alignment builds stored)"
    want = {f"r{cell.round}/{cell.task_of(p)}/{p}" for p in (*cell.parties, *dict(cell.also))}
    done = len(want & set(keys))
    return f"{'in flight' if done < len(want) else 'step stored'} ({done} of {len(want)} results stored)"


def _alignment_dir(cluster) -> Path:
    return Path(yaml.safe_load(cluster.services["alignment"].config_path.read_text())["workdir"])


def _alignment_landing(cluster) -> str:
    keys = [json.loads(p.read_text())["key"] for p in (_alignment_dir(cluster) / "index").glob("*.json")]
    maps = sum(k.startswith("vocab-map/") for k in keys)
    seqs = sum(k.startswith("seq-align/") for k in keys)
    return f"during the builds ({maps} vocab maps, {seqs} sequence alignments done before)"


def cold_alignment(cluster) -> None:
    """Make the alignment service forget what it built (its cache index, and its operations: a restart), so the next
    run's builds really run."""
    if "alignment" not in cluster.services:
        return
    cluster.kill("alignment")
    for p in (_alignment_dir(cluster) / "index").glob("*.json"):
        p.unlink()
    cluster.restart("alignment")


# -- one cell --------------------------------------------------------------------------------------------------------
def _trigger(cell: Cell):
    if cell.progress:
        return lambda e: e.kind == "progress" and e.step == cell.step
    return lambda e: e.kind == "step" and e.round == cell.round and e.step == cell.step


def _delay(cell: Cell, walls: dict) -> float:
    if cell.delay is not None:
        return cell.delay
    if not cell.task:
        return 0.0
    if cell.task_of(cell.service):
        return 0.5 * walls.get((cell.round, cell.task_of(cell.service), cell.service), 0.0)
    # the coordinator (or a party taking no part): while the parties run the step, early, since short steps end fast
    return 0.25 * max((walls.get((cell.round, cell.task, p), 0.0) for p in cell.parties), default=0.0)


def _recovery(events: list[pb.RunEvent], cell: Cell, t_kill: float) -> float | None:
    """Kill -> the first progress event of the killed service's work after it came back. The coordinator's work is the
    run: any party's progress, a round completed, or the run's end (a resumed step whose operations had all finished
    re-attaches to them without a progress event). None: the killed party had no work left in the run."""
    if cell.service == "coordinator":
        match = [e for e in events if e.time > t_kill and (e.kind in ("progress", "metrics") or
                                                           (e.kind == "state" and e.state in TERMINAL))]
    elif cell.service == "alignment":
        match = [e for e in events if e.kind == "progress" and e.step.startswith("align:") and e.time > t_kill + 0.5]
    else:  # events recorded within 0.5 s of the kill may still be the old process's (a reply in flight); a build's
        # progress names the party it is for, not one that works on it
        match = [e for e in events if e.kind == "progress" and e.party_id == cell.service
                 and not e.step.startswith("align:") and e.time > t_kill + 0.5]
    return min(e.time for e in match) - t_kill if match else None


def _waited(events: list[pb.RunEvent], t_kill: float) -> float | None:
    waits = [float(e.message.rsplit(" after ", 1)[1].split(" s")[0]) for e in events
             if " is back after " in e.message and e.time > t_kill]
    return max(waits) if waits else None


def _coordinator_saw(events: list[pb.RunEvent], cell: Cell, t_kill: float) -> str:
    """How the coordinator met the killed service, from its run events after the kill."""
    if cell.service == "coordinator":
        return "restarted; resumed the run" if any("coordinator restarted; resuming" in e.message for e in events
                                                   if e.time > t_kill) else "?"

    def about(e):
        if cell.service == "alignment":
            return e.message.startswith("alignment service")
        return e.party_id == cell.service or f"({cell.service} at " in e.message

    mine = [e.message for e in events if e.time > t_kill and about(e)]
    lost = any("no longer knows operation" in m for m in mine)
    waited = any("waiting up to" in m for m in mine)
    reissued = any("re-issuing the step" in m for m in mine)
    if lost:
        return "its operation was lost: re-issued" + (" (after a wait)" if "is back after 0.0 s" not in " ".join(mine)
                                                       else "")
    if waited or reissued:
        return "unreachable: waited, re-issued"
    return "nothing (its call retries, or the next step, met the restarted service)"


def kill_cell(cluster, cell: Cell, spec: pb.RunSpec, reference: dict, walls: dict, targets) -> Row:
    row = Row(cell.id, cell.service, _step_label(cell))
    if cell.cold_alignment:
        cold_alignment(cluster)
    client = coordinator_client(cluster)
    try:
        run = client.start_run(spec)
    finally:
        client.close()
    started = time.time()
    log = EventLog(cluster, run.run_id)
    try:
        log.wait_for(_trigger(cell))
        time.sleep(_delay(cell, walls))
        t_kill = time.time()
        cluster.kill(cell.service)
        if cell.service == "coordinator":
            row.landed = _coordinator_landing(cluster, cell, run.run_id)
        elif cell.service == "alignment":
            row.landed = _alignment_landing(cluster)
        else:
            row.landed = _party_landing(cluster, cell, run.run_id)
        cluster.restart(cell.service)
        row.restart_s = time.time() - t_kill
        final = log.wait_finished()
        row.run_s = time.time() - started
        events = list(log.events)
    finally:
        log.close()
    row.recovered = final.state == pb.RUN_SUCCEEDED
    row.error = final.error
    row.recover_s = _recovery(events, cell, t_kill)
    row.waited_s = _waited(events, t_kill)
    row.coordinator_saw = _coordinator_saw(events, cell, t_kill)
    until = t_kill + (row.recover_s if row.recover_s is not None else 15.0) + 0.01
    row.trace = [f"{e.time - t_kill:+.2f} s {e.kind} r{e.round} {e.step} {e.party_id} {e.done}/{e.total} "
                 f"{e.message[:160]}".rstrip() for e in events if t_kill - 0.5 <= e.time <= until]
    if row.recovered:
        row.differences = differences(fingerprint(cluster, final, targets), reference)
        row.identical = not row.differences
    return row


# -- clusters, references, report --------------------------------------------------------------------------------------
ROWS: list[Row] = []


def _report(rows: list[Row]) -> str:
    def s(v):
        return "—" if v is None else f"{v:.1f}"

    lines = ["| service | step | kill landed | the coordinator saw | recovered | identical | time to recover (s) | "
             "restart (s) | coordinator waited (s) | run (s) |", "|---|---|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        recover = "— (no work of it left)" if r.recover_s is None else s(r.recover_s)
        lines.append(f"| {r.service} | {r.step} | {r.landed} | {r.coordinator_saw} | "
                     f"{'yes' if r.recovered else 'NO'} | "
                     f"{'yes' if r.identical else 'NO'} | {recover} | {s(r.restart_s)} | {s(r.waited_s)} | "
                     f"{s(r.run_s)} |")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def matrix_report():
    yield ROWS
    if not ROWS:
        return
    print("\n\nkill matrix (SIGKILL at the step, restart at once; identical = metrics, artifacts and final adapters "
          "byte for byte equal to an uninterrupted run)\n" + _report(ROWS))
    for r in ROWS:
        if r.differences or r.error:
            print(f"  {r.cell}: {r.error} {r.differences[:10]}")
    out = os.environ.get("COTUNE_KILL_MATRIX_JSON")
    if out:
        Path(out).write_text(json.dumps({"nondeterministic_metrics": list(NONDETERMINISTIC),
                                         "rows": [asdict(r) for r in ROWS]}, indent=2))


class _Family:
    def __init__(self, cluster, spec: pb.RunSpec, targets: dict):
        self.cluster, self.spec, self.targets = cluster, spec, targets
        started = time.time()
        self.run = run_alone(cluster, spec)
        self.run_s = time.time() - started
        assert self.run.state == pb.RUN_SUCCEEDED, self.run.error
        self.reference = fingerprint(cluster, self.run, targets)
        self.walls = task_walls(self.run)


def _family(tmp_path_factory, algorithm: str, spec: dict, targets: dict):
    # a workdir of its own one level down, so the alignment cache (beside the cluster's workdir) is this module's
    cluster = start_tiny_cluster(tmp_path_factory.mktemp(f"kill-{algorithm}") / "w", algorithm)
    try:
        family = _Family(cluster, make_spec(spec), targets)
    except BaseException:
        cluster.down()
        raise
    return family


@pytest.fixture(scope="class")
def mkt(tmp_path_factory, shared_data):
    family = _family(tmp_path_factory, "fedmkt", MKT_SPEC, {"llm": ("",), **{c: ("",) for c in CLIENTS}})
    yield family
    family.cluster.down()


@pytest.fixture(scope="class")
def biot(tmp_path_factory, shared_data):
    family = _family(tmp_path_factory, "fedbiot", BIOT_SPEC, {"llm": ("", "compressed"), **{c: ("",) for c in CLIENTS}})
    yield family
    family.cluster.down()


def _check(row: Row) -> None:
    ROWS.append(row)
    print(f"\n{row.cell}: landed {row.landed}; recovered {row.recovered}, identical {row.identical}, "
          f"recover {row.recover_s}, restart {row.restart_s}, waited {row.waited_s}")
    assert row.recovered, row.error
    assert row.identical, row.differences[:20]
    if row.recover_s is None:  # only a party with no work left in the run shows no progress after its restart
        assert row.service not in ("coordinator", "alignment") and "in flight" not in row.landed, \
            "no progress of the killed service's work after its restart"


class TestFedMKT:
    def test_reference_is_repeatable(self, mkt):
        """A second uninterrupted run of the spec on the same cluster equals the first: the baseline is valid."""
        again = run_alone(mkt.cluster, mkt.spec)
        assert again.state == pb.RUN_SUCCEEDED, again.error
        assert differences(fingerprint(mkt.cluster, again, mkt.targets), mkt.reference) == []

    def test_kill(self, mkt, mkt_cell):
        _check(kill_cell(mkt.cluster, mkt_cell, mkt.spec, mkt.reference, mkt.walls, mkt.targets))


class TestFedBiOT:
    def test_kill(self, biot, biot_cell):
        _check(kill_cell(biot.cluster, biot_cell, biot.spec, biot.reference, biot.walls, biot.targets))
