"""Evaluate a universal-upsampler run and package it into featup_adapters/weights/universal.

    python scripts/package_universal.py outputs/universal --write featup_adapters/weights/universal

Runs ``featup-adapters eval`` (held-out multi-view error against bilinear and bicubic, linear-probe
mIoU on mosaics of the held-out photos, boundary F-score) for the run's upsampler on the held-out
backbone (efficientnet_lite2) and on the two it was trained on, and for the starting point (the
default backbone's JBU stages, untrained as a universal stack) on the held-out one.  With
``--write``: copies model.safetensors, config.json, metrics.csv there, with the loss curve and
eval.json (every table, as the eval command wrote it).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELD_OUT, TRAINED_ON = "efficientnet_lite2", ("efficientnet_lite0", "efficientnet_lite1")


def run_eval(backbone: str, upsampler: str, data: str, tmp: Path) -> dict:
    out = tmp / f"{backbone}_{Path(upsampler).name}.json"
    cmd = [sys.executable, "-m", "featup_adapters.cli", "eval", "--backbone", backbone,
           "--upsampler", upsampler, "--data", data, "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    print(res.stdout, end="")
    if res.returncode:
        raise SystemExit(f"eval failed for {backbone} / {upsampler}: {res.stderr.strip()[-500:]}")
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", help="the --out folder of train-universal")
    ap.add_argument("--data", default=str(Path.home() / ".cache/featup_adapters/photos/val"))
    ap.add_argument("--init", default=str(REPO / "featup_adapters/weights/efficientnet_lite0"),
                    help="the run's --init, evaluated as the starting point")
    ap.add_argument("--write", default=None, help="package into this folder")
    args = ap.parse_args()
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sys.path.insert(0, str(REPO))
        from featup_adapters.hub import load_upsampler
        from featup_adapters.upsamplers import UniversalJBUStack
        start = UniversalJBUStack.from_jbu_stack(load_upsampler(args.init)).eval()
        start.save_pretrained(tmp / "start", backbone_id="universal", use_norm=True,
                              extra={"backbone_pretrained": True})
        results = {"held_out_backbone": HELD_OUT, "trained_on": list(TRAINED_ON),
                   "eval_data": args.data, "tables": {}}
        results["tables"][f"{HELD_OUT} (held out), trained"] = run_eval(HELD_OUT, str(run), args.data, tmp)
        results["tables"][f"{HELD_OUT} (held out), starting point"] = run_eval(HELD_OUT, str(tmp / "start"),
                                                                              args.data, tmp)
        for b in TRAINED_ON:
            results["tables"][f"{b} (trained on)"] = run_eval(b, str(run), args.data, tmp)
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("model.safetensors", "config.json", "metrics.csv"):
            shutil.copy2(run / name, out / name)
        (out / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
        _plot(run / "metrics.csv", out / "training_curve.png")
        print(f"packaged into {out}")
    return 0


def _plot(metrics: Path, path: Path) -> None:
    import csv

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(metrics.open()))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for key in [k for k in rows[0] if k == "loss" or k.startswith("loss_")]:
        label = "loss (mean)" if key == "loss" else TRAINED_ON[int(key.split("_")[1])]
        ax.plot(steps, [float(r[key]) for r in rows], label=label, lw=1 if key != "loss" else 1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("multi-view loss (mean of 10 steps)")
    ax.set_title("universal JBU (efficientnet_lite0 + lite1)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
