"""A workdir holds one live service: a second holder is refused naming the first's pid; the lock dies with it."""

import os
import subprocess
import sys

import pytest

from cotune.config import ConfigError
from cotune.workdir import WorkdirLock


def test_a_second_holder_is_refused_with_the_holders_pid(tmp_path):
    first = WorkdirLock(tmp_path, "coordinator")
    with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"):
        WorkdirLock(tmp_path, "coordinator")
    first.release()
    WorkdirLock(tmp_path, "coordinator").release()  # free again


def test_the_lock_is_released_when_its_process_dies(tmp_path):
    code = f"from cotune.workdir import WorkdirLock; WorkdirLock({str(tmp_path)!r}, 'x'); print('held', flush=True); input()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"process {proc.pid}"):
            WorkdirLock(tmp_path, "x")
    finally:
        proc.kill()
        proc.wait()
    WorkdirLock(tmp_path, "x").release()  # SIGKILL left no stale lock
