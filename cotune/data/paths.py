"""Where the shared, third-party data lives (tokenizers and task datasets).

The data is never copied into the repository. It is found, in order, at

1. ``$COTUNE_SHARED_DATA`` when that variable is set (used as given, even if it does not exist, so a
   wrong setting is reported rather than silently replaced by another copy);
2. the first existing ``shared/data`` directory seen walking up from the current directory;
3. the first existing ``shared/data`` directory seen walking up from this file's location (the
   repository is checked out with ``../shared`` beside it, so ``<checkout>/../shared/data`` is found).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "COTUNE_SHARED_DATA"


def _walk_up_for_shared(start: Path) -> Path | None:
    for base in (start, *start.parents):
        candidate = base / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


def shared_data_dir() -> Path | None:
    """The shared data directory (the one holding ``datasets/`` and ``tokenizers/``), or None if not found."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    starts: list[Path] = []
    try:
        starts.append(Path.cwd().resolve())
    except OSError:  # the current directory was removed
        pass
    starts.append(Path(__file__).resolve().parent)
    for start in starts:
        found = _walk_up_for_shared(start)
        if found is not None:
            return found
    return None


def require_shared_data() -> Path:
    """Like :func:`shared_data_dir`, but raise FileNotFoundError with a fix when the directory is missing."""
    found = shared_data_dir()
    env = os.environ.get(ENV_VAR)
    if found is not None and found.is_dir():
        return found
    if env:
        raise FileNotFoundError(
            f"{ENV_VAR} is set to {env!r}, which is not a directory. Point it at the shared data directory "
            f"(the one containing datasets/ and tokenizers/), or unset it to search for shared/data."
        )
    try:
        cwd = str(Path.cwd())
    except OSError:
        cwd = "<unavailable>"
    raise FileNotFoundError(
        "Shared data directory not found: no shared/data above the current directory "
        f"({cwd}) or above the cotune package ({Path(__file__).resolve().parent}). Set {ENV_VAR}=/path/to/shared/data, "
        "or place the shared/ directory beside the repository checkout (so that <checkout>/../shared/data exists)."
    )
