"""The LLM server: the party that holds the large model (CUDA when present) and no private data."""

from __future__ import annotations

from cotune.config import PartyConfig
from cotune.party import serve_party


def serve(cfg: PartyConfig, port_file: str | None = None) -> None:
    serve_party(cfg, "llm", port_file)
