#!/usr/bin/env bash
# The GPU check (issue 25): the CUDA tests, then every instrument at real shapes (random-init
# Qwen2.5-0.5B student / 1.5B teacher) and on the embedded demo pair; positions/s, peak GPU memory,
# MFU and the ratio to the naive reference into one folder. About 5 minutes on one H100/H200, no network.
#
#   bash scripts/gpu_check.sh [--device cuda|cpu] [--tiny] [--out DIR] [--work DIR] [--pairs shapes,demo]
#                             [--only STAGE,...] [--budget-s 420]
#   bash scripts/gpu_check.sh --device cpu --tiny --out /tmp/dry     # the CPU dry run the tests run
#
# benchmarks/gpu_check.py --help says what each stage measures and what the folder holds.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's teachdiag, whatever is installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1         # every model is a local folder: never wait on a hub
exec "${PYTHON:-python}" "$ROOT/benchmarks/gpu_check.py" "$@"
