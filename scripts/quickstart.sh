#!/usr/bin/env bash
# The README's first command: set up (if needed) and run the quickstart experiment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
CONFIG=configs/quickstart.toml
if ! compgen -G "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte*" >/dev/null && [[ -z ${MMFL_DATA:-} ]]; then
  echo "quickstart: Fashion-MNIST is not installed; running the offline variant configs/quickstart_offline.toml"
  CONFIG=configs/quickstart_offline.toml
fi
OUT=${1:-runs/quickstart}
rm -rf "$OUT"
exec .venv/bin/mmfl run "$CONFIG" --out "$OUT"
