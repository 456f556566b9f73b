#!/usr/bin/env bash
# The prepared GPU check (see benchmarks/gpu_check.py): on a machine with a CUDA GPU, builds the
# extension for that GPU, runs the CUDA tests and benchmarks, and writes OUTDIR/gpu.json and
# OUTDIR/gpu.md within about six minutes. Exit 77 (and a message) when no GPU is visible.
#   usage: scripts/gpu_check.sh OUTDIR [--sizes 224,448,1024] [--dtypes float32,bfloat16] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
exec "$PY" benchmarks/gpu_check.py "$@"
