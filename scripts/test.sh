#!/usr/bin/env bash
# The README's second command: run the whole test suite (sets up .venv first if it is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/pytest ]] || bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
