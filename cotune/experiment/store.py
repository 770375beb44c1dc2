"""Where an experiment's report directory keeps its cells, and how they are written (atomically) and read."""

from __future__ import annotations

import json
import os
from pathlib import Path

SUCCEEDED = "RUN_SUCCEEDED"  # cotune.v1.RunState's name, as run summaries (cotune.report.run_summary) record it


def cell_path(out: Path, task: str, variant_name: str, seed: int) -> Path:
    return out / "cells" / task / variant_name / f"seed{seed}.json"


def read_cell(path: Path) -> dict | None:
    """A cell's record, or None when it is missing or unreadable (a half-written file never is: see write_json_atomic)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_cells(out: Path) -> list[dict]:
    return [c for p in sorted((out / "cells").glob("*/*/seed*.json")) if (c := read_cell(p)) is not None]


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never a part: a temporary file in
    the same folder, flushed to disk, then renamed over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
