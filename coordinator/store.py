"""The coordinator's durable state in SQLite: clients, runs, rounds, completed steps and run events.

Completed steps are stored with their results so that a restarted coordinator resumes a run at its last
completed step without asking any party to redo delivered work.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from cotune.config import ConfigError
from cotune.v1 import coordinator_pb2 as pb
from cotune.v1 import party_pb2

SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (client_id TEXT PRIMARY KEY, address TEXT NOT NULL, labels TEXT NOT NULL,
                                    info BLOB, registered_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, run BLOB NOT NULL, state INTEGER NOT NULL,
                                 created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS steps (run_id TEXT NOT NULL, step_key TEXT NOT NULL, result TEXT NOT NULL,
                                  finished_at REAL NOT NULL, PRIMARY KEY (run_id, step_key));
CREATE TABLE IF NOT EXISTS events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,
                                   PRIMARY KEY (run_id, seq));
"""


# Bumped whenever stored runs or step results stop being readable by the code (2: RunSpec with per-algorithm
# settings, typed task results in step records).
FORMAT_VERSION = 2


def run_state_name(state: int) -> str:
    """A RunState as a metric label: RUN_SUCCEEDED -> succeeded ("unknown" for a value this version does not name)."""
    try:
        return pb.RunState.Name(state).removeprefix("RUN_").lower()
    except ValueError:
        return "unknown"


class StateStore:
    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        has_tables = self._db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]
        if has_tables and version != FORMAT_VERSION:
            self._db.close()
            raise ConfigError(f"{path} holds coordinator state in format {version or 1}; this Cotune reads format "
                             f"{FORMAT_VERSION} (its runs cannot be resumed by this version). Move the file aside to "
                             "start with an empty state, or run the Cotune version that wrote it")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._db.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        self._lock = threading.RLock()
        self.events_changed = threading.Condition(self._lock)

    # -- clients ---------------------------------------------------------------------------------------------
    def put_client(self, desc: pb.ClientDescriptor, info: party_pb2.PartyInfo) -> pb.ClientRecord:
        now = time.time()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?)",
                             (desc.client_id, desc.address, json.dumps(dict(desc.labels)), info.SerializeToString(), now))
        return pb.ClientRecord(client=desc, info=info, registered_at=now)

    def remove_client(self, client_id: str) -> bool:
        """Forget a client; False if it was not registered."""
        with self._lock:
            return self._db.execute("DELETE FROM clients WHERE client_id = ?", (client_id,)).rowcount > 0

    def clients(self) -> list[pb.ClientRecord]:
        with self._lock:
            rows = self._db.execute("SELECT client_id, address, labels, info, registered_at FROM clients ORDER BY client_id").fetchall()
        return [pb.ClientRecord(client=pb.ClientDescriptor(client_id=r[0], address=r[1], labels=json.loads(r[2])),
                                info=party_pb2.PartyInfo.FromString(r[3] or b""), registered_at=r[4]) for r in rows]

    # -- runs ------------------------------------------------------------------------------------------------
    def put_run(self, run: pb.Run) -> None:
        run.updated_at = time.time()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?)",
                             (run.run_id, run.SerializeToString(), int(run.state), run.created_at))

    def get_run(self, run_id: str) -> pb.Run | None:
        with self._lock:
            row = self._db.execute("SELECT run FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return pb.Run.FromString(row[0]) if row else None

    def list_runs(self, limit: int) -> list[pb.Run]:
        with self._lock:
            rows = self._db.execute("SELECT run FROM runs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [pb.Run.FromString(r[0]) for r in rows]

    def count_by_state(self) -> dict[str, int]:
        """How many runs are in each state, by lower-case state name without the RUN_ prefix (metrics)."""
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM runs GROUP BY state").fetchall()
        return {run_state_name(state): n for state, n in rows}

    def runs_in_state(self, *states) -> list[pb.Run]:
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(f"SELECT run FROM runs WHERE state IN ({marks}) ORDER BY created_at", [int(s) for s in states]).fetchall()
        return [pb.Run.FromString(r[0]) for r in rows]

    # -- steps -----------------------------------------------------------------------------------------------
    def step_result(self, run_id: str, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT result FROM steps WHERE run_id = ? AND step_key = ?", (run_id, key)).fetchone()
        return json.loads(row[0]) if row else None

    def has_party_steps(self, run_id: str, party_id: str) -> bool:
        """Whether party `party_id` completed any step of the run (step keys end in /<party_id>)."""
        with self._lock:
            row = self._db.execute("SELECT 1 FROM steps WHERE run_id = ? AND step_key LIKE ? LIMIT 1",
                                   (run_id, f"%/{party_id}")).fetchone()
        return row is not None

    def put_step(self, run_id: str, key: str, result: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO steps VALUES (?, ?, ?, ?)", (run_id, key, json.dumps(result), time.time()))

    # -- events ----------------------------------------------------------------------------------------------
    def add_event(self, event: pb.RunEvent) -> pb.RunEvent:
        with self._lock:
            row = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events WHERE run_id = ?", (event.run_id,)).fetchone()
            event.seq = row[0] + 1
            event.time = event.time or time.time()
            self._db.execute("INSERT INTO events VALUES (?, ?, ?)", (event.run_id, event.seq, event.SerializeToString()))
            self.events_changed.notify_all()
        return event

    def events_after(self, run_id: str, after_seq: int, limit: int = 1000) -> list[pb.RunEvent]:
        with self._lock:
            rows = self._db.execute("SELECT event FROM events WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                                    (run_id, after_seq, limit)).fetchall()
        return [pb.RunEvent.FromString(r[0]) for r in rows]
