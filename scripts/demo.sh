#!/usr/bin/env bash
# Install what the demo needs, then run it: scripts/demo.sh [cotune demo options, e.g. --preset tiny --rounds 2 --json out.json]
set -euo pipefail
cd "$(dirname "$0")/.."
models=--models
for arg in "$@"; do [ "$arg" = "tiny" ] && models=""; done
scripts/bootstrap.sh $models
exec .venv/bin/cotune demo "$@"
