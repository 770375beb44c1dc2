"""An SLM client: one data owner's small model, its private data, and the shared public set."""

from __future__ import annotations

from cotune.config import PartyConfig
from cotune.party import serve_party


def serve(cfg: PartyConfig, port_file: str | None = None) -> None:
    serve_party(cfg, "slm", port_file)
