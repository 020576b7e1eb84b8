#!/usr/bin/env bash
# The GPU benchmark: Pivotal's training step against the reference at SD's native sizes (SD1.5
# architecture at 512 px, batch 1 and 4; SDXL architecture at 1024 px, batch 1), fp16 / bf16,
# gradient checkpointing, SDPA on/off; step time, peak memory, model FLOPs utilisation. About 5
# minutes on one H100-class GPU, never more than 8 (variants past a 7-minute budget are skipped and
# listed). Writes bench/results/gpu.json and the gpu section of bench/RESULTS.md.
#   bash bench/gpu.sh                 the measurement (needs CUDA)
#   bash bench/gpu.sh --quick         the CPU smoke test: tiny demo models, one timed pair, no files
#                                     (add --json PATH / --results PATH to see what it would write)
# Other arguments go to bench/gpu.py (--variants, --peak-tflops, --budget).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
if [ "${1:-}" = "--quick" ]; then
    shift
    exec "$py" bench/gpu.py --quick "$@"
fi
exec "$py" bench/gpu.py --json bench/results/gpu.json "$@"
