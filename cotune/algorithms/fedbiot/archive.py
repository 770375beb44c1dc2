"""Shipped FedBiOT model archives (a tar of the compressed model directory): checking one, unpacking it once into
<workdir>/models/<sha>, and reading its LoRA config and initial adapter. Used where a compressed model is installed
(an SLM client's LoadModelTask) or rebuilt (a party restoring a run's state)."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

from cotune.algorithms.fedbiot.compress import INITIAL_LORA_FILE, LAYER_MAP_FILE, LORA_CONFIG_FILE, unpack_dir
from cotune.config import LoraConfig
from cotune.errors import InvalidInput


def check_archive(path: Path) -> dict[str, int]:
    """Names and sizes of a shipped model archive's files; InvalidInput unless it is a tar of a compressed model."""
    try:
        with tarfile.open(str(path), mode="r:") as tar:
            members = {m.name: m.size for m in tar.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise InvalidInput(f"model archive is not a readable tar: {exc}") from exc
    missing = [n for n in ("config.json", LAYER_MAP_FILE, INITIAL_LORA_FILE) if n not in members]
    if missing:
        raise InvalidInput(f"model archive is not a compressed model: it lacks {', '.join(missing)}")
    return members


def unpacked(party, sha: str, members: dict[str, int]) -> Path:
    """<workdir>/models/<sha>, unpacked once: a directory is renamed into place only when complete."""
    root = Path(party.cfg.workdir) / "models"
    final = root / sha
    if final.is_dir() and all((final / n).is_file() and (final / n).stat().st_size == s for n, s in members.items()):
        return final
    tmp = root / f".{sha}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        unpack_dir(party.store.path(sha), tmp)
    except (ValueError, tarfile.TarError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InvalidInput(f"model archive {sha[:12]}…: {exc}") from exc
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def archive_model(party, sha: str) -> tuple[Path, LoraConfig, dict]:
    """The shipped model archive `sha` (in the party's store) unpacked: its directory, its LoRA config and its initial
    adapter; InvalidInput when it is not a readable compressed model."""
    from cotune.lm.lora import lora_from_bytes

    members = check_archive(party.store.path(sha))
    model_dir = unpacked(party, sha, members)
    try:
        lora = LoraConfig(**json.loads((model_dir / LORA_CONFIG_FILE).read_text())) \
            if LORA_CONFIG_FILE in members else party.cfg.lora
        initial = lora_from_bytes((model_dir / INITIAL_LORA_FILE).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidInput(f"model archive {sha[:12]}…: {exc}") from exc
    return model_dir, lora, initial
