#!/usr/bin/env bash
# Install what the tests need, then run them all (unit and integration): scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
