"""Evaluate a trained upsampler for the default backbone and package it into featup_adapters/weights.

    python scripts/eval_default_upsampler.py outputs/efficientnet_lite0_jbu \
        --write featup_adapters/weights/efficientnet_lite0

Multi-view reconstruction error (``featup_adapters.training.evaluate.multiview_error``: fixed
area-average downsampler, relative to the target variance, lower is better) on the held-out
embedded photos (``featup_adapters.data.HELD_OUT``) for the trained JBU, bilinear, bicubic and an
untrained JBU; train step time from the run's metrics.csv.  With ``--write``, copies the saved
upsampler (model.safetensors + config.json), metrics.csv, a loss-curve PNG and eval.json there.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="the --out folder of the training run")
    ap.add_argument("--write", default=None, help="package into this folder")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--views", type=int, default=8)
    args = ap.parse_args()

    from featup_adapters.data import as_dataset
    from featup_adapters.hub import load_upsampler
    from featup_adapters.training.evaluate import multiview_error
    from featup_adapters.training.source import feature_source
    from featup_adapters.upsamplers import make_upsampler

    run = Path(args.run)
    torch.manual_seed(0)
    src = feature_source("efficientnet_lite0")
    ds = as_dataset("embedded:val", args.image_size)
    images = torch.stack([ds[i] for i in range(len(ds))])
    trained = load_upsampler(run).eval()
    if trained.config.get("use_norm"):      # trained on LayerNorm-ed features: all methods get them
        src = _Normed(src)
    candidates = {"jbu_trained": trained, "bilinear": make_upsampler("bilinear"),
                  "bicubic": make_upsampler("bicubic"),
                  "jbu_untrained": make_upsampler("jbu", dim=src.feature_dim).eval()}
    results = {"held_out": [p.name for p in ds.files], "image_size": args.image_size,
               "views_per_image": args.views, "errors": {}}
    for d in (1, 2):
        key = f"output {args.image_size // d}px"
        results["errors"][key] = {}
        for name, up in candidates.items():
            t0 = time.perf_counter()
            err = multiview_error(src, up, images, n_views=args.views, seed=0, hr_downscale=d)
            results["errors"][key][name] = round(err, 5)
            print(f"{key:12s} {name:14s} {err:.5f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    secs = [float(r["sec_per_step"]) for r in rows]
    results["train"] = {"steps": int(rows[-1]["step"]), "final_loss": float(rows[-1]["loss"]),
                        "first_loss": float(rows[0]["loss"]),
                        "median_sec_per_step": round(statistics.median(secs), 3),
                        "total_minutes": round(sum(
                            s * (int(r["step"]) - (int(rows[i - 1]["step"]) if i else 0))
                            for i, (s, r) in enumerate(zip(secs, rows))) / 60, 1)}
    print(json.dumps(results, indent=1))
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json", "metrics.csv"):
            shutil.copy2(run / name, out / name)
        (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
        _plot(rows, out / "training_curve.png")
    return 0


class _Normed:
    """A feature source whose features pass through the trainer's channel LayerNorm."""

    def __init__(self, src):
        self.src = src
        self.stride, self.mean, self.std, self.feature_dim = src.stride, src.mean, src.std, src.feature_dim

    def features(self, x):
        from featup_adapters.training.losses import channel_norm
        return channel_norm(self.src.features(x).float())


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot(steps, loss)
    ax.set_xlabel("step")
    ax.set_ylabel("multi-view loss (mean of 5 steps)")
    ax.set_title("JBU for efficientnet_lite0 (blocks.6, 320 ch)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
