#!/usr/bin/env bash
# One prepared GPU run of benchmarks/gpu_scale.py (LLaDA-V at its published size, random weights):
# saliency, relabel (exact and prefix-cached) and the projector fine-tune at 1,485 and 3,627
# visual tokens, with the memory planner's estimate beside every measured peak. Needs one GPU with
# at least 80 GB, Python with torch and the runner's dependencies (or wheels of them in .whl/,
# installed into a scratch folder first); runs from the repository root in about 3 minutes.
#
#     bash benchmarks/gpu_scale.sh [gpu_scale.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/disp-site .whl/*.whl
    export PYTHONPATH=/tmp/disp-site
fi
export PYTHONPATH="$PWD/api:$PWD/store:$PWD/runner:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader || true
report="${OUT:-/tmp}/gpu_scale.txt"
python3 benchmarks/gpu_scale.py --relabel-batch 8 "$@" 2>&1 | tee "$report"
