"""Per-run, durable party state: what a party learned in a run survives its restart, and never leaks into another run.

Layout, under the party's workdir:

    runs/<run_id>/state/          the run's state after its last committed step
        meta.json                 which model the state belongs to (the configured one or a shipped archive), the
                                  step it committed, the algorithm states present
        lora.safetensors          the party's own adapter
        trainer.safetensors       its optimizer, schedule and counters (Trainer.state_dict_bytes; no pickle)
        info.pb                   how the party described itself then (PartyInfo: Describe for this run)
        states/<name>/            each algorithm state's own files (StateKind.save)
    runs/<run_id>/state.next/     staged by a step that has finished but is not published yet
    runs/<run_id>/ops/<h>.json    finished operations by idempotency key (the result a retry gets back)

A step commits in two phases, so a crash anywhere leaves either the old state (the step re-runs from it when the
coordinator asks again with the same key) or the new state together with its operation record (a retry gets the
stored result): the work stages `state.next`, the operation manager writes the operation record (`commit`), and only
then is `state.next` promoted to `state` and the operation published. A restarted party finds the record and promotes
a staged state whose record exists; a staged state without one is discarded.

Runs are isolated: the party's single operation worker runs one task at a time, and a task of another run than the
one in memory first switches: the new run's committed state is restored, or, for a run it has never seen, every
model starts from the configured base with a fresh adapter and optimizer. Concurrent runs are therefore queued per
party and interleave safely (a switch costs restoring an adapter and optimizer; for a shipped FedBiOT model also
reloading that model).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.errors import Precondition

log = logging.getLogger(__name__)
FORMAT = "cotune.party-run-state/1"


@dataclass(frozen=True)
class StateKind:
    """How a party keeps one algorithm's per-run state (attached with ModelParty.set_state under its name).

    save(state, directory)     write the state's durable parts into `directory` (created, empty)
    restore(party, directory)  rebuild the state from what save wrote
    reset(party)               the state a new run starts with (None: absent until a task creates it)"""

    save: Callable[[Any, Path], None]
    restore: Callable[[Any, Path], Any]
    reset: Callable[[Any], Any]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunStates:
    """The run whose state is in memory, and the durable copies of every run's (see the module doc)."""

    def __init__(self, party):
        self.party = party
        self.root = Path(party.cfg.workdir) / "runs"
        self.current: str | None = None  # the run whose state the party's models hold now
        self._swap = threading.Lock()  # a promotion's renames against Describe reading a run's saved state

    # -- paths ------------------------------------------------------------------------------------------------
    def _run_dir(self, run_id: str) -> Path:
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise Precondition(f"run id {run_id!r:.80} cannot name a state directory")
        return self.root / run_id

    def _op_path(self, key: str) -> Path:
        run_id = key.split("/", 1)[0]
        return self._run_dir(run_id) / "ops" / (hashlib.sha256(key.encode()).hexdigest()[:40] + ".json")

    def _committed(self, run_id: str) -> Path | None:
        """The run's committed state directory, finishing or undoing a commit a crash interrupted."""
        d = self._run_dir(run_id)
        state, staged, old = d / "state", d / "state.next", d / "state.old"
        if staged.is_dir():
            key = json.loads((staged / "meta.json").read_text()).get("op_key", "")
            if key and self._op_path(key).exists():  # its operation was recorded: the commit had happened
                self._promote(d)
            else:
                shutil.rmtree(staged)
        if not state.is_dir() and old.is_dir():
            old.rename(state)
        shutil.rmtree(old, ignore_errors=True)
        return state if state.is_dir() else None

    def recover(self) -> None:
        """At start-up: finish or undo the commits a crash interrupted, for every run on disk."""
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and not d.name.startswith("."):
                    self._committed(d.name)

    def saved_info(self, run_id: str):
        """How the party described itself when run `run_id` last committed a step (a PartyInfo), or None when it
        holds no saved state for that run."""
        from cotune.v1 import party_pb2

        d = self._run_dir(run_id)
        with self._swap:
            for state in (d / "state", d / "state.old"):  # state.old: a promotion in progress
                try:
                    data = (state / "info.pb").read_bytes()
                except OSError:
                    continue
                return party_pb2.PartyInfo.FromString(data)
        return None

    # -- switching runs -----------------------------------------------------------------------------------------
    def enter(self, run_id: str, resumes: bool) -> None:
        """Make `run_id`'s state the one in memory (on the operation worker, before a task of that run). `resumes`:
        the coordinator says this party completed steps of the run before, so its state must be on disk."""
        if run_id == self.current:
            return
        state = self._committed(run_id)
        if state is not None:
            self._restore(state)
            log.info("%s: restored run %s from %s", self.party.cfg.party_id, run_id, state)
        else:
            if resumes:  # never start over silently
                self.current = None
                raise Precondition(
                    f"party {self.party.cfg.party_id} holds no saved state for run {run_id}, which it took part in: "
                    f"its workdir lost runs/{run_id}/state; it cannot continue this run")
            self._reset()
        self.current = run_id

    def forget_current(self) -> None:
        """After a failed or cancelled task: the models may hold half a step, so the next task restores the last
        committed state."""
        self.current = None

    def _reset(self) -> None:
        p = self.party
        if p.loaded_model:  # a shipped model from another run: back to the configured one
            p.install_model(p.cfg.model.path, p.cfg.lora)
            p.on_model_installed()
        else:
            p.reset_adapter()
        for name, kind in p.durable_states.items():
            p.set_state(name, kind.reset(p))

    def _restore(self, state: Path) -> None:
        from cotune.lm.lora import load_lora_state_dict, lora_from_bytes

        p = self.party
        meta = json.loads((state / "meta.json").read_text())
        if meta.get("format") != FORMAT:
            raise Precondition(f"party {p.cfg.party_id}: {state} holds state format {meta.get('format')!r}, "
                               f"expected {FORMAT!r}")
        model = meta.get("loaded_model", "")
        if model != p.loaded_model:
            if model:
                p.install_archive(model)
            else:
                p.install_model(p.cfg.model.path, p.cfg.lora)
                p.on_model_installed()
        load_lora_state_dict(p.model, lora_from_bytes((state / "lora.safetensors").read_bytes()))
        p.trainer = p.new_trainer(p.model)
        p.trainer.load_state_bytes((state / "trainer.safetensors").read_bytes())
        for name, kind in p.durable_states.items():
            sub = state / "states" / name
            p.set_state(name, kind.restore(p, sub) if sub.is_dir() else kind.reset(p))

    # -- committing a step ----------------------------------------------------------------------------------
    def stage(self, run_id: str, op_key: str) -> None:
        """Write the in-memory state as `state.next` (after a task's work, before its operation is published)."""
        p = self.party
        d = self._run_dir(run_id)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "state.next.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        lora = p.lora_bytes()
        _write_atomic(tmp / "lora.safetensors", lora)
        _write_atomic(tmp / "trainer.safetensors", p.trainer.state_dict_bytes())
        info = p.live_info(lora_hash=hashlib.sha256(lora).hexdigest())  # Describe for this run
        _write_atomic(tmp / "info.pb", info.SerializeToString(deterministic=True))
        present = []
        for name, kind in p.durable_states.items():
            value = p.state_for(name)
            if value is not None:
                (tmp / "states" / name).mkdir(parents=True)
                kind.save(value, tmp / "states" / name)
                present.append(name)
        meta = {"format": FORMAT, "run_id": run_id, "op_key": op_key, "loaded_model": p.loaded_model,
                "states": present}
        _write_atomic(tmp / "meta.json", json.dumps(meta, sort_keys=True).encode())
        shutil.rmtree(d / "state.next", ignore_errors=True)
        tmp.rename(d / "state.next")

    def _promote(self, d: Path) -> None:
        state, staged, old = d / "state", d / "state.next", d / "state.old"
        with self._swap:
            shutil.rmtree(old, ignore_errors=True)
            if state.is_dir():
                state.rename(old)
            staged.rename(state)
        shutil.rmtree(old, ignore_errors=True)

    def promote(self, run_id: str) -> None:
        """Make the staged state the committed one (for a step without an operation key)."""
        d = self._run_dir(run_id)
        if (d / "state.next").is_dir():
            self._promote(d)

    # -- the operation journal (cotune.rpc.operations.OperationManager's `journal`) ------------------------------
    def load(self, key: str):
        """(kind, fingerprint, Operation bytes) recorded for `key`, or None."""
        try:
            path = self._op_path(key)
        except Precondition:
            return None
        if not path.exists():
            return None
        entry = json.loads(path.read_text())
        if entry.get("key") != key:
            return None
        return entry["kind"], entry["fingerprint"], base64.b64decode(entry["operation"])

    def commit(self, key: str, kind: str, fingerprint: str, operation: bytes) -> None:
        """Record a finished operation, then promote the state its work staged: from here a retry of `key` gets this
        operation back, and the run continues from the new state."""
        path = self._op_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {"key": key, "kind": kind, "fingerprint": fingerprint,
                 "operation": base64.b64encode(operation).decode()}
        _write_atomic(path, json.dumps(entry).encode())
        self.promote(key.split("/", 1)[0])
