"""Where an experiment's report directory keeps its cells, and how they are written (atomically) and read."""

from __future__ import annotations

import json
import os
from pathlib import Path


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
