"""The coordinator: client registry, run API, and the run executor that drives strategies round by round."""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from coordinator.driver import RunCancelled, RunDriver
from coordinator.store import StateStore, run_state_name
from cotune import metrics
from cotune.algorithms.aggregate import UploadRejected, parse_adapter, validate_upload
from cotune.algorithms.base import PartyRef
from cotune.algorithms.config import SpecError, parse_spec
from cotune.algorithms.registry import get_strategy
from cotune.config import CoordinatorConfig
from cotune.export import EXTRA_TARGETS, ExportedAdapter, adapter_name, describe_adapter, model_card
from cotune.errors import (AlreadyExists, InvalidInput, NotFound, PermissionDenied, Precondition, Unavailable, rpc_method,
                           status_for)
from cotune.rpc.channel import Credentials
from cotune.rpc.clients import AlignmentClient, PartyClient
from cotune.rpc.guard import caller
from cotune.rpc.server import credentials, service_host
from cotune.security.identity import NAME_RE
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import coordinator_pb2_grpc, party_pb2
from cotune.wire.blobs import service_store
from cotune.workdir import WorkdirLock

log = logging.getLogger(__name__)
TERMINAL = (pb.RUN_SUCCEEDED, pb.RUN_FAILED, pb.RUN_CANCELLED)
REGISTER_DIAL_TIMEOUT_S = 5.0  # RegisterClient dials the address it is given: briefly, so it cannot hold a worker
WATCH_MAX_S = 600.0
RESPONSE_BUDGET_BYTES = 3 << 20  # list answers stay under the 4 MiB message limit            # a WatchRun stream ends after this long; clients resume with after_seq


class Coordinator:
    def __init__(self, cfg: CoordinatorConfig):
        cfg.validate()
        self.cfg = cfg
        root = Path(cfg.workdir)
        self.workdir_lock = WorkdirLock(root, "coordinator")  # one coordinator per state database
        self.state = StateStore(root / "state.sqlite3")
        metrics.watch_runs(self.state.count_by_state)  # cotune_runs{state}, counted at scrape time
        self.artifacts = service_store(root / "artifacts", cfg.blob_quota_gib)
        self.creds: Credentials = credentials(cfg)
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._resume_lock = threading.Lock()
        self._last_address: dict[str, str] = {}  # client id -> the address a run last dialled it at
        self._exporting: dict[str, threading.Lock] = {}  # run id -> held while ExportRun exports it

    # -- clients ---------------------------------------------------------------------------------------------
    def party_client(self, address: str, role: str, party_id: str = "", *, for_run: bool = False) -> PartyClient:
        """A client of the party at `address`; over mTLS it must present the certificate of `llm` or
        `client/<party_id>`, so an address can never stand in for another party. `for_run`: for a run's driver,
        which waits for restarts itself (so the client does not retry an unreachable party)."""
        return PartyClient(address, role=role, party_id=party_id, creds=self.creds, retry_unavailable=not for_run)

    @staticmethod
    def _check_may_act_for(client_id: str, action: str) -> None:
        who = caller()
        if who is not None and who.kind == "client" and who.name != client_id:
            raise PermissionDenied(f"{who} may {action} only itself, not client {client_id!r:.70}")

    def _address_allowed(self, client_id: str, address: str) -> bool:
        configured = {e.client_id: e.address for e in self.cfg.clients}
        return configured.get(client_id) == address or any(fnmatch.fnmatchcase(address, pattern)
                                                            for pattern in self.cfg.client_addresses)

    def register_client(self, desc: pb.ClientDescriptor, *, dial_timeout_s: float = REGISTER_DIAL_TIMEOUT_S) -> pb.ClientRecord:
        """Register (or re-point) client `client_id` at `address` after asking it to describe itself. A client identity
        may register only itself; the address must be one the config allows; over mTLS the service there must hold
        the client's own certificate, and in any mode it must call itself `client_id` and no other client may hold the
        address (one process, one vote)."""
        if not desc.client_id or not desc.address:
            raise InvalidInput("client_id and address are both required")
        if not NAME_RE.match(desc.client_id):
            raise InvalidInput(f"client_id must be 1-63 lower-case letters, digits or '-' (it names the identity "
                               f"client/<id> in certificates), got {desc.client_id!r:.70}")
        self._check_may_act_for(desc.client_id, "register")
        if not self._address_allowed(desc.client_id, desc.address):
            raise PermissionDenied(f"address {desc.address!r:.100} is not allowed for clients by this coordinator's "
                                   "config (client_addresses)")
        holder = next((r.client.client_id for r in self.state.clients()
                       if r.client.address == desc.address and r.client.client_id != desc.client_id), None)
        if holder is not None:
            raise AlreadyExists(f"address {desc.address} is registered to client {holder}; deregister it first")
        info = self._describe(desc.address, "slm", f"SLM client {desc.client_id}", party_id=desc.client_id,
                              timeout=dial_timeout_s, retries=0)
        if info.role != "slm":
            raise InvalidInput(f"{desc.address} is a {info.role or 'unknown'} service, not an SLM client")
        if info.party_id != desc.client_id:
            raise PermissionDenied(f"the SLM client at {desc.address} is {info.party_id!r:.70}, not {desc.client_id!r}")
        return self.state.put_client(desc, info)

    def deregister_client(self, client_id: str) -> None:
        self._check_may_act_for(client_id, "deregister")
        if not self.state.remove_client(client_id):
            raise NotFound(f"no registered client {client_id!r:.70}; `cotune clients` lists them")

    def register_configured_clients(self, *, attempts_until: float = 600.0) -> list:
        """Register the clients listed in the config (their configured address wins over a stale registration),
        retrying for `attempts_until` seconds while they start up. Returns the entries still unreachable."""
        pending = list(self.cfg.clients)
        deadline = time.monotonic() + attempts_until
        while pending:
            for entry in list(pending):
                try:
                    self.register_client(pb.ClientDescriptor(client_id=entry.client_id, address=entry.address),
                                         dial_timeout_s=15.0)
                    pending.remove(entry)
                except Precondition:
                    pass
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
        return pending

    # -- runs ------------------------------------------------------------------------------------------------
    def get_run(self, run_id: str) -> pb.Run:
        run = self.state.get_run(run_id) if run_id else None
        if run is None:
            raise NotFound(f"unknown run id {run_id!r:.80}; `cotune run list` shows the known runs")
        return run

    def start_run(self, spec: pb.RunSpec) -> pb.Run:
        """Validate everything the spec can express, against the parties it names, and start the run. Every problem
        found is reported at once (one SpecError naming each bad field); nothing is created unless there are none."""
        if not spec.algorithm:
            raise SpecError(["algorithm is required (`cotune algorithms` lists them)"])
        strategy = get_strategy(spec.algorithm)
        problems: list[str] = []
        run_config = algo_config = None
        try:
            run_config, algo_config = parse_spec(spec, strategy.config_class)
        except SpecError as exc:
            problems += exc.problems
        registered = {r.client.client_id: r for r in self.state.clients()}
        chosen = list(spec.clients) or sorted(registered)
        unknown = [c for c in chosen if c not in registered]
        if unknown:
            problems.append(f"clients: unknown client id(s) {', '.join(unknown)[:400]}; registered: "
                            f"{', '.join(sorted(registered))[:400] or 'none'}")
        if len(set(chosen)) != len(chosen):
            problems.append("clients lists a client twice")
        if spec.HasField("min_clients") and spec.min_clients > len(chosen):
            problems.append(f"min_clients={spec.min_clients} exceeds the {len(chosen)} selected clients")
        if problems:
            raise SpecError(problems)
        if not chosen:
            raise Precondition("no SLM clients are registered; register clients before starting a run")
        # each party as the new run will find it (the configured model with a fresh adapter), whatever it holds now
        run_id = uuid.uuid4().hex[:16]
        llm_info = self._describe(self.cfg.llm, "llm", "LLM server", run_id=run_id)
        infos = {c: self._describe(registered[c].client.address, "slm", f"client {c}", party_id=c, run_id=run_id)
                 for c in chosen}
        public = spec.public_set_hash or llm_info.public_set_hash
        mismatched = [p for p, i in [("llm", llm_info), *infos.items()] if i.public_set_hash != public]
        if mismatched:
            raise Precondition(f"public set {public[:16]}… differs from what {', '.join(mismatched)} hold; "
                               "every party must hold the same public set (samples are matched by position)")
        problems = strategy.check(algo_config, run_config, llm_info, infos)
        if problems:
            raise SpecError(problems)
        run = pb.Run(run_id=run_id, spec=spec, state=pb.RUN_PENDING, created_at=time.time())
        run.spec.clients[:] = chosen
        run.spec.public_set_hash = public
        self.state.put_run(run)
        self.state.add_event(pb.RunEvent(run_id=run.run_id, kind="state", state=run.state, message="run created"))
        self._launch(run.run_id)
        return run

    def _describe(self, address: str, role: str, what: str, *, party_id: str = "", run_id: str = "",
                  timeout: float = 15.0, retries: int = 4):
        client = self.party_client(address, role, party_id)
        try:
            info = client.describe(timeout=timeout, retries=retries, run_id=run_id)
        except grpc.RpcError as exc:
            hint = f" (or is not {client.peer}: over mTLS its certificate must name {client.peer.dns_name})" \
                if self.creds.tls.enabled else ""
            raise Precondition(f"{what} at {address} is unreachable{hint}: {exc.details()}") from exc
        finally:
            client.close()
        if not info.ready:
            raise Precondition(f"{what} at {address} is still loading its model; retry shortly")
        return info

    def cancel_run(self, run_id: str) -> pb.Run:
        run = self.get_run(run_id)
        if run.state in TERMINAL:
            return run
        with self._lock:
            event = self._cancel.get(run_id)
        if event is None:  # not executing here (e.g. pending after a restart): cancel in place
            run.state = pb.RUN_CANCELLED
            self.state.put_run(run)
        else:
            event.set()
        self.state.add_event(pb.RunEvent(run_id=run_id, kind="state", state=run.state, message="cancel requested"))
        return self.get_run(run_id)

    def resume_run(self, run_id: str) -> pb.Run:
        """Move a FAILED or CANCELLED run back to PENDING and relaunch it: completed steps replay from their stored
        results at once, the step that failed is issued again. Any other state is FAILED_PRECONDITION."""
        resumable = (pb.RUN_FAILED, pb.RUN_CANCELLED)

        def refuse(run: pb.Run):
            if run.state not in resumable:
                raise Precondition(f"run {run.run_id} is {pb.RunState.Name(run.state)}; only a RUN_FAILED or "
                                   "RUN_CANCELLED run can be resumed")

        refuse(self.get_run(run_id))
        with self._lock:
            thread = self._threads.get(run_id)
        if thread is not None and thread.is_alive():  # its executor has recorded the end and is closing its clients
            thread.join(timeout=30.0)
            if thread.is_alive():
                raise Unavailable(f"run {run_id} is still shutting down its last execution; retry shortly")
        with self._resume_lock:  # two ResumeRun calls at once: one resumes, the other sees a PENDING run
            run = self.get_run(run_id)
            refuse(run)
            previous = pb.RunState.Name(run.state)
            run.state = pb.RUN_PENDING
            run.error = ""
            self.state.put_run(run)
            self.state.add_event(pb.RunEvent(run_id=run_id, kind="state", state=run.state,
                                             message=f"resumed by an operator after {previous}, at round "
                                                     f"{run.current_round} step {run.current_step or '-'}; completed "
                                                     "steps replay from their stored results"))
            self._launch(run_id)
        return self.get_run(run_id)

    def export_run(self, run_id: str, cancel: threading.Event | None = None) -> pb.ExportRunResponse:
        """The final adapters of a SUCCEEDED run (any other state is FAILED_PRECONDITION naming it), pulled into the
        artifact store and recorded in Run.exports, with the run's model card. Every party that took steps in the run
        (the LLM server only then; a client unless dropped from the last round) runs `get_lora` (tagged) in the run's
        context, so it restores that run's saved state whatever run it holds now; the LLM server also hands over its
        companion SLM's (fedcollm) or compressed model's (fedbiot, fedot) adapter. Each is a step of the run driver
        keyed `r<last round>/export[_<target>]/<party>`: blobs are pulled, a restarting party is waited for, and a
        repeated export returns the stored steps at once. Nothing is added to the run's round records."""
        run = self.get_run(run_id)
        if run.state != pb.RUN_SUCCEEDED:
            raise Precondition(f"run {run_id} is {pb.RunState.Name(run.state)}; only a RUN_SUCCEEDED run can be "
                               "exported")
        with self._lock:
            lock = self._exporting.setdefault(run_id, threading.Lock())
        with lock:  # two exports of one run at once: the second finds the first's stored steps
            return self._export(self.get_run(run_id), cancel or threading.Event())

    def _export(self, run: pb.Run, cancel: threading.Event) -> pb.ExportRunResponse:
        run_id = run.run_id
        strategy = get_strategy(run.spec.algorithm)
        run_config, _ = parse_spec(run.spec, strategy.config_class)
        rounds = sorted(run.rounds, key=lambda r: r.round)
        last = rounds[-1].round if rounds else run.current_round
        dropped = set(rounds[-1].dropped) if rounds else set()
        registered = {r.client.client_id: r for r in self.state.clients()}
        skipped: dict[str, str] = {}
        jobs: list[tuple[PartyRef, list[str]]] = []  # (party, targets in order)
        llm = PartyRef("llm", "llm", party_pb2.PartyInfo())
        if self.state.has_party_steps(run_id, "llm"):
            extra = EXTRA_TARGETS.get(run.spec.algorithm)
            jobs.append((llm, ["", extra] if extra else [""]))
        clients = []
        for cid in run.spec.clients:
            if cid in dropped:
                skipped[cid] = f"dropped from round {last}"
            elif not self.state.has_party_steps(run_id, cid):
                skipped[cid] = "it completed no step of the run"
            else:
                address = registered[cid].client.address if cid in registered else self._last_address.get(cid, "")
                if not address:
                    raise Precondition(f"client {cid} of run {run_id} is no longer registered; register it again "
                                       "(`cotune clients register`) to export its adapter")
                self._last_address[cid] = address
                ref = PartyRef(cid, "slm", party_pb2.PartyInfo.FromString(
                    registered[cid].info.SerializeToString()) if cid in registered else party_pb2.PartyInfo())
                clients.append((ref, self.party_client(address, "slm", cid, for_run=True)))
                jobs.append((ref, [""]))
        if not jobs:
            raise Precondition(f"run {run_id}: no party holds an adapter of it to export ("
                               + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) + ")")
        driver = _ExportDriver(run=run, config=run_config, store=self.state, artifacts=self.artifacts,
                               llm=(llm, self.party_client(self.cfg.llm, "llm", "llm", for_run=True)),
                               clients=clients, alignment=None, cancel_event=cancel, redial=self._redial,
                               party_grace_s=self.cfg.party_grace_s)
        try:
            def export(job: tuple[PartyRef, list[str]]) -> list[tuple[str, str, str]]:
                party, targets = job
                earlier = driver.stored(party, last, "export") is not None
                out = []
                for i, target in enumerate(targets):
                    step = f"export_{target}" if target else "export"
                    if i and earlier and driver.stored(party, last, step) is None:
                        # its own adapter was exported earlier, so the party may hold another run by now: have it
                        # restore this run, against whose state a target such as "compressed" is checked
                        driver.enter_run(party, last)
                    res = driver.task(party, last, step, get_lora=party_pb2.GetLoraTask(target=target, tag=True))
                    out.append((party.party_id, target, res.result.adapter.sha256))
                return out

            with ThreadPoolExecutor(max_workers=min(len(jobs), 16)) as pool:
                results = [sha for shas in pool.map(export, jobs) for sha in shas]
            names = self._party_models(run, [p for p, _ in jobs])
            adapters: list[ExportedAdapter] = []
            for pid, target, sha in results:
                if not self.artifacts.has(sha):
                    raise Precondition(f"run {run_id}: the adapter {pid} exported earlier ({sha[:12]}…) is gone from "
                                       "the coordinator's artifact store")
                data = self.artifacts.read_bytes(sha)
                try:
                    state, meta = parse_adapter(data)
                    validate_upload(state, state, meta=meta, max_abs=run_config.adapter_max_abs,
                                    expect={"cotune.run_id": run_id, "cotune.party_id": pid,
                                            "cotune.target": target or "model"})
                    model = names.get(adapter_name(pid, target), "")
                    adapters.append(describe_adapter(data, party_id=pid, target=target, sha256=sha, model=model))
                except (UploadRejected, ValueError) as exc:
                    raise Precondition(f"run {run_id}: the adapter {adapter_name(pid, target)} exported "
                                       f"({sha[:12]}…) is not a usable LoRA adapter: {exc}") from exc
            exports = {a.name: a.sha256 for a in adapters}
            driver.emit("info", round=last, step="export",
                        message="exported: " + ", ".join(f"{k} {v[:12]}" for k, v in sorted(exports.items())))
        except RunCancelled:
            raise Unavailable(f"export of run {run_id} stopped: its caller went away") from None
        finally:
            driver.close()
        with self._lock:  # record them on the run (unchanged on a repeat: the run keeps its updated_at)
            stored = self.get_run(run_id)
            if dict(stored.exports) != exports:
                stored.exports.clear()
                stored.exports.update(exports)
                self.state.put_run(stored)
            run = stored
        card = model_card(run, adapters, skipped=skipped, summary=strategy.summary)
        return pb.ExportRunResponse(adapters={a.name: self.artifacts.stat(a.sha256).ref() for a in adapters},
                                    model_card_markdown=card)

    def _party_models(self, run: pb.Run, parties: list[PartyRef]) -> dict[str, str]:
        """adapter name -> the model it adapts, as each party describes itself for the run; a party that does not
        answer: as it described itself when it registered."""
        registered = {r.client.client_id: r.info for r in self.state.clients()}
        names: dict[str, str] = {}
        for party in parties:
            client = self._redial(party)
            try:
                info = client.describe(timeout=10.0, retries=1, run_id=run.run_id)
            except grpc.RpcError:
                info = registered.get(party.party_id, party_pb2.PartyInfo())
            finally:
                client.close()
            names[party.party_id] = info.model_name or "unknown model"
            if info.HasField("companion"):
                names[adapter_name(party.party_id, "companion")] = f"{info.companion.model_name} (companion SLM)"
            names[adapter_name(party.party_id, "compressed")] = \
                f"{info.model_name or 'the LLM'}, compressed (emulator + adapter)"
        return names

    def resume_unfinished(self) -> None:
        for run in self.state.runs_in_state(pb.RUN_PENDING, pb.RUN_RUNNING):
            log.info("resuming run %s at round %d step %s", run.run_id, run.current_round, run.current_step)
            self.state.add_event(pb.RunEvent(run_id=run.run_id, kind="state", state=run.state, message="coordinator restarted; resuming"))
            self._launch(run.run_id)

    def _launch(self, run_id: str) -> None:
        with self._lock:
            if run_id in self._threads and self._threads[run_id].is_alive():
                return
            self._cancel[run_id] = threading.Event()
            thread = threading.Thread(target=self._execute, args=(run_id,), name=f"run-{run_id}", daemon=True)
            self._threads[run_id] = thread
        thread.start()

    def _redial(self, party: PartyRef) -> PartyClient:
        """A new client of `party` at its address now: the LLM server's configured one, a client's registered one (a
        restarted client may have registered elsewhere; a client deregistered since keeps the address it had)."""
        if party.role == "llm":
            return self.party_client(self.cfg.llm, "llm", party.party_id, for_run=True)
        record = next((r for r in self.state.clients() if r.client.client_id == party.party_id), None)
        address = record.client.address if record is not None else ""
        if not address:
            address = self._last_address.get(party.party_id, "")
        self._last_address[party.party_id] = address
        return self.party_client(address, "slm", party.party_id, for_run=True)

    def _execute(self, run_id: str) -> None:
        run = self.get_run(run_id)
        cancel = self._cancel[run_id]
        rpcs: list = []
        alignment = None
        driver = None
        try:
            strategy = get_strategy(run.spec.algorithm)
            run_config, algo_config = parse_spec(run.spec, strategy.config_class)
            registered = {r.client.client_id: r for r in self.state.clients()}
            missing = [cid for cid in run.spec.clients if cid not in registered]
            if missing:
                raise Precondition(f"client(s) {', '.join(missing)} of this run are no longer registered; register "
                                   "them again (`cotune clients register`) and resume the run")

            def party(party_id: str, address: str, role: str, info: party_pb2.PartyInfo):
                client = self.party_client(address, role, party_id, for_run=True)
                rpcs.append(client)
                self._last_address[party_id] = address
                return PartyRef(party_id, role, party_pb2.PartyInfo.FromString(info.SerializeToString())), client

            llm = party("llm", self.cfg.llm, "llm", party_pb2.PartyInfo())
            clients = [party(cid, registered[cid].client.address, "slm", registered[cid].info)
                       for cid in run.spec.clients]
            if self.cfg.alignment:
                alignment = AlignmentClient(self.cfg.alignment, creds=self.creds, retry_unavailable=False)
            driver = RunDriver(run=run, config=run_config, store=self.state, artifacts=self.artifacts, llm=llm,
                               clients=clients, alignment=alignment, cancel_event=cancel, redial=self._redial,
                               redial_alignment=(lambda: AlignmentClient(self.cfg.alignment, creds=self.creds,
                                                                         retry_unavailable=False))
                               if self.cfg.alignment else None,
                               party_grace_s=self.cfg.party_grace_s)
            # every party as it describes itself for this run (waiting for one that is restarting or loading)
            driver.connect({cid: registered[cid].info for cid in run.spec.clients})
            run.state = pb.RUN_RUNNING
            driver.save()
            driver.emit("state", message="running")
            strategy.execute(driver, algo_config)
            driver.finish_rounds()  # the last round's duration
            run.state = pb.RUN_SUCCEEDED
            run.current_step = "done"
        except RunCancelled:
            run.state = pb.RUN_CANCELLED
        except Exception as exc:  # noqa: BLE001 - recorded on the run
            _, message = status_for(exc, f"run {run_id}")  # logs an INTERNAL failure with its traceback
            run.state = pb.RUN_FAILED
            run.error = message
        finally:
            self.state.put_run(run)
            metrics.RUNS_ENDED.labels(run_state_name(run.state)).inc()
            self.state.add_event(pb.RunEvent(run_id=run_id, kind="state", state=run.state, message=run.error or pb.RunState.Name(run.state)))
            if driver is not None:
                driver.close()  # the clients it was given, those it redialled, the alignment service's
            else:
                for client in [*rpcs, alignment]:
                    if client is not None:
                        client.close()


class _ExportDriver(RunDriver):
    """The run driver as ExportRun uses it on a finished run: the same stored, resumable steps (pushes, pulls, waiting
    for a party that restarts), but the run's round records are left as they were: the export's bytes and timings are
    not the run's, and its progress is not reported."""

    def record_metrics(self, round: int, party_id: str, metrics: dict) -> None:
        pass

    def count_bytes(self, round: int, direction: str, kind: str, n: int) -> None:
        if n > 0:  # not the run's bytes, but bytes this coordinator moved (cotune_message_bytes)
            metrics.message_bytes(direction, kind, n)

    def emit(self, kind: str, **kw) -> None:
        if kind != "progress":
            super().emit(kind, **kw)

    def stored(self, party: PartyRef, round: int, step: str) -> dict | None:
        """The stored result of `step` on `party`, or None (the key RunDriver.task gives it)."""
        return self.store.step_result(self.run_id, f"r{round}/{step}/{party.party_id}")

    def enter_run(self, party: PartyRef, round: int) -> None:
        """Have `party` switch to this run's saved state: an untagged get_lora without an idempotency key (nothing is
        journaled; the party re-stages the state it restored), waiting for the party if it restarts."""
        ctx = party_pb2.RunContext(run_id=self.run_id, round=round, public_set_hash=self.public_set_hash,
                                   resumes=True)
        request = party_pb2.TaskRequest(ctx=ctx, get_lora=party_pb2.GetLoraTask())
        self._resilient(self._party_peer(party), round, "export",
                        lambda client: client.run_task(request, timeout_s=self.timeout_s,
                                                       should_stop=self._cancel.is_set))


def within_response_budget(items: list, budget: int = RESPONSE_BUDGET_BYTES) -> list:
    """The leading `items` whose encoding fits `budget` bytes, so a list answer never outgrows the message limit
    (however many runs or clients accumulate); a shortened answer is logged."""
    total = 0
    for i, item in enumerate(items):
        total += item.ByteSize() + 8
        if total > budget:
            log.warning("list answer shortened to %d of %d entries (%d-byte budget)", i, len(items), budget)
            return items[:i]
    return items


class CoordinatorServicer(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    @rpc_method
    def RegisterClient(self, request, context):
        return self.c.register_client(request.client)

    @rpc_method
    def DeregisterClient(self, request, context):
        self.c.deregister_client(request.client_id)
        return pb.DeregisterClientResponse()

    @rpc_method
    def ListClients(self, request, context):
        return pb.ListClientsResponse(clients=within_response_budget(self.c.state.clients()))

    @rpc_method
    def StartRun(self, request, context):
        return self.c.start_run(request.spec)

    @rpc_method
    def GetRun(self, request, context):
        return self.c.get_run(request.run_id)

    @rpc_method
    def CancelRun(self, request, context):
        return self.c.cancel_run(request.run_id)

    @rpc_method
    def ResumeRun(self, request, context):
        return self.c.resume_run(request.run_id)

    @rpc_method
    def ExportRun(self, request, context):
        cancel = threading.Event()
        context.add_callback(cancel.set)  # the caller went away: stop waiting on the parties
        return self.c.export_run(request.run_id, cancel)

    @rpc_method
    def ListRuns(self, request, context):
        limit = request.limit or 50
        if not 1 <= limit <= 10_000:
            raise InvalidInput(f"limit must be in 1..10000, got {limit}")
        summaries = []
        for run in self.c.state.list_runs(limit):
            run.ClearField("rounds")  # a list shows summaries; GetRun has the round records
            summaries.append(run)
        return pb.ListRunsResponse(runs=within_response_budget(summaries))

    @rpc_method
    def WatchRun(self, request, context):
        run_id = request.run_id
        self.c.get_run(run_id)  # NOT_FOUND for unknown ids
        seq = request.after_seq
        ends = time.monotonic() + WATCH_MAX_S
        while context.is_active() and time.monotonic() < ends:
            events = self.c.state.events_after(run_id, seq)
            for event in events:
                seq = event.seq
                yield event
            if not events:
                if self.c.get_run(run_id).state in TERMINAL and not self.c.state.events_after(run_id, seq):
                    return
                with self.c.state.events_changed:
                    self.c.state.events_changed.wait(timeout=1.0)


def serve(cfg: CoordinatorConfig, port_file: str | None = None) -> None:
    coordinator = Coordinator(cfg)
    host = service_host("cotune.coordinator", cfg, "coordinator")
    host.add(coordinator_pb2_grpc.add_CoordinatorServicer_to_server, CoordinatorServicer(coordinator), pb, "Coordinator")
    host.add_blobs_and_operations(coordinator.artifacts, None)
    host.start(port_file)
    if coordinator.register_configured_clients(attempts_until=0):  # one pass before SERVING; the rest in background
        threading.Thread(target=coordinator.register_configured_clients, daemon=True).start()
    coordinator.resume_unfinished()
    host.set_serving(True)
    host.wait_for_termination_signal()
