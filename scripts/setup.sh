#!/usr/bin/env bash
# Set up mmfl on a fresh Debian machine: the Fashion-MNIST package (when apt is usable), a .venv in
# the repository root with the pinned environment, and mmfl itself (editable).
# Usage: bash scripts/setup.sh        (idempotent; safe to run again)
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist
if [[ ! -d $FMNIST ]]; then
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    echo "setup: installing the Debian package dataset-fashion-mnist"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
      || echo "setup: notice: could not install dataset-fashion-mnist; fashion_mnist tasks need it (offline datasets still work)"
  else
    echo "setup: notice: apt-get is not usable here (not root?); run 'sudo apt-get install dataset-fashion-mnist'" \
         "for fashion_mnist tasks. The quickstart falls back to offline datasets."
  fi
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
echo "setup: installing the pinned environment (requirements-dev.txt) and mmfl"
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
echo "setup: done"
