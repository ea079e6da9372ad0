#!/usr/bin/env bash
# The issue 17 GPU check: the CUDA path end to end (quantize -> sample -> save -> reload bit-exact),
# the scale benchmark on cuda, and a timed google/ddpm-cifar10-32-architecture calibration at the demo
# budget; JSON in OUT_DIR (gpu_check.json, benchmark_scale.jsonl). Sized to finish within 8 minutes on
# one GPU; a hard limit of 470 s keeps it there (partial results stay in gpu_check.json).
#
#   examples/gpu_check.sh OUT_DIR [python]
set -euo pipefail
out=${1:?usage: examples/gpu_check.sh OUT_DIR [python]}
python=${2:-python}
here=$(cd "$(dirname "$0")/.." && pwd)
if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check.sh: torch sees no CUDA device here; this check needs a GPU machine" >&2
    exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" || true
cd "$here"
exec timeout --signal=TERM --kill-after=10 470 "$python" examples/gpu_check.py --device cuda --out "$out"
