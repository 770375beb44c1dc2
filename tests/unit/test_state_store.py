"""The coordinator's state database carries its format version: a database written in another format is refused with
a clear error instead of failing later on runs it cannot read."""

from __future__ import annotations

import sqlite3

import pytest

from coordinator.store import FORMAT_VERSION, StateStore
from cotune.config import ConfigError
from cotune.v1 import coordinator_pb2 as pb


def test_a_new_database_gets_the_current_format_and_reopens(tmp_path):
    path = tmp_path / "state.sqlite3"
    store = StateStore(path)
    store.put_run(pb.Run(run_id="r1", spec=pb.RunSpec(algorithm="fedmkt", rounds=2), created_at=1.0))
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
    assert StateStore(path).get_run("r1").spec.rounds == 2


def test_a_database_of_an_earlier_format_is_refused_and_left_untouched(tmp_path):
    path = tmp_path / "state.sqlite3"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, run BLOB NOT NULL, state INTEGER NOT NULL, "
               "created_at REAL NOT NULL)")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="format 1.*Move the file aside"):
        StateStore(path)
    assert path.read_bytes() == before
