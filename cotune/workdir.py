"""One live process per workdir: a service holds an exclusive lock on `<workdir>/.lock` for as long as it runs.

Two coordinators on one SQLite database, or two parties writing one blob store, corrupt each other silently; the
lock turns that into an error at start naming the process that holds the workdir. The kernel releases the lock
when the holder dies (even by SIGKILL), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from cotune.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirLock:
    """Held from construction until `release()` or the end of the process."""

    def __init__(self, workdir: str | os.PathLike, what: str):
        root = Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOCK_FILE
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{what}: workdir {root} is in use by process {holder} (another service runs on it); "
                              "stop that process or give this one its own workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None
