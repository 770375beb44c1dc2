#!/usr/bin/env bash
# Install what every test needs (the real small models included), then run them all (unit and integration):
#   scripts/test.sh [pytest options]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --models  # the real small models too: the tests that read their tokenizers and weights run
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
