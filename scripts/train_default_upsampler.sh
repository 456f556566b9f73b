#!/usr/bin/env bash
# Train the JBU upsampler shipped in featup_adapters/weights/efficientnet_lite0 (the default
# backbone, timm tf_efficientnet_lite0 with the embedded ImageNet weights, features of blocks.6:
# 320 channels, stride 32) on the embedded photos minus the held-out ones, then evaluate it on the
# held-out photos and package it.  CPU only; about 300 steps x 1-10 s on a shared 2-core machine.
#
# Resuming is exact, so a run stopped and continued with --resume "$OUT" gives the same weights.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/efficientnet_lite0_jbu}
STEPS=${STEPS:-300}

OMP_NUM_THREADS=2 "$PY" -m featup_adapters.training.cli train \
    --backbone efficientnet_lite0 --data embedded:train --out "$OUT" \
    --steps "$STEPS" --batch-size 2 --n-jitters 2 --hr-downscale 2 --image-size 224 \
    --log-every 5 --checkpoint-every 25 --seed 0 --no-progress ${RESUME:+--resume "$OUT"}

"$PY" scripts/eval_default_upsampler.py "$OUT" --views 24 --write featup_adapters/weights/efficientnet_lite0
