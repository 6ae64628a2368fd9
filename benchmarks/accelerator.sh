#!/usr/bin/env bash
# One-shot accelerator benchmark: bash benchmarks/accelerator.sh OUT_DIR [OFFICIAL_BIFORMER_CHECKOUT]
# Runs benchmarks/accelerator.py from the repository root under an 8-minute limit.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash benchmarks/accelerator.sh OUT_DIR [OFFICIAL_BIFORMER_CHECKOUT]}"
official=()
if [[ $# -ge 2 ]]; then official=(--official_repo="$2"); fi
# XLA's default of 75% of GPU memory leaves PyTorch's official model room on the same device.
exec timeout 480 "${PYTHON:-python}" benchmarks/accelerator.py --out="$out" ${official[@]+"${official[@]}"}
