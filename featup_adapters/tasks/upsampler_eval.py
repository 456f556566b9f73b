"""``featup-adapters eval``: how much an upsampler beats bilinear, on any backbone, in one run.

    results = evaluate_upsampler("efficientnet_lite0", "auto", "photos/val")
    featup-adapters eval --backbone efficientnet_lite0 --upsampler auto --data photos/val --json e.json

Three measures on held-out photos (none of them seen in training), each against bilinear on the
very same features (the upsampler's own ``use_norm`` applies to all methods):

1. **Multi-view error** (``training.evaluate.multiview_error``): predict the features of jittered
   views with a fixed area-average downsampler; relative to the target variance, lower is better;
   for the upsampler, bilinear and bicubic, at ``factor`` x the feature grid (16x by default).
2. **Linear probe mIoU** on labelled mosaics built from the held-out photos: Voronoi regions, each
   a random crop of one photo, label = which photo (``seg_data.TextureMosaic`` with the photos as
   textures).  The probe's training mosaics use the top half of each photo, its evaluation mosaics
   the bottom half.  Labels at the upsampled resolution; ``tasks.probe.linear_probe`` trains one
   1x1 conv per method with the same seed and batches.
3. **Boundary F-score** of those probe predictions (``metrics.BoundaryMeter``): predicted label
   edges within ``boundary_tolerance`` px of the true region edges (precision) and vice versa.

For a JBU stack the learned range temperatures ``exp(range_temp)`` of its stages are reported too.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_upsampler", "format_table", "add_eval_parser"]


def _finite(obj):
    """Replace NaN/inf by None so the JSON is valid."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class _LabelsAt(torch.utils.data.Dataset):
    """A segmentation dataset with its masks resized (nearest) to ``size``."""

    def __init__(self, data, size):
        self.data, self.size = data, tuple(size)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, mask = self.data[i]
        m = F.interpolate(mask[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        return image, m


def range_temperatures(up: nn.Module) -> Optional[list]:
    """``[clamp(exp(range_temp), 1e-4, 1e4)]`` per JBU stage (None if ``up`` has no such stages)."""
    temps = [float(m.range_temp.detach().exp().clamp(1e-4, 1e4)) for m in up.modules()
             if isinstance(getattr(m, "range_temp", None), torch.Tensor)]
    return temps or None


def evaluate_upsampler(backbone: Union[str, nn.Module], upsampler: Union[str, nn.Module] = "auto",
                       data=None, *, layer: Optional[str] = None, image_size: int = 224,
                       factor: int = 16, views: int = 8, probe_train: int = 48, probe_val: int = 24,
                       probe_steps: int = 300, boundary_tolerance: int = 2, seed: int = 0,
                       device: str = "cpu") -> dict:
    """Evaluate ``upsampler`` on ``backbone``'s features against bilinear (and bicubic).

    Args:
        backbone: what ``featup_adapters.wrap`` accepts.
        upsampler: ``"auto"``, a registered name, a saved directory, or a module with
            ``forward(source[B, C, h, w], guidance[B, 3, H, W], output_size=(H, W))``.
        data: held-out photos (a folder, file list or ``"embedded:val"``); None = ``"embedded:val"``.
            At least 2 photos (they are the probe's classes).
        image_size: square centre crops of this size. factor: output = ``factor`` x the feature grid;
            must divide the backbone's stride.
        views: jittered views per photo for the multi-view error.
        probe_train, probe_val: mosaics for training / evaluating the probe; probe_steps: its steps.

    Returns:
        A JSON-able dict (NaN replaced by None): ``multiview_error``, ``multiview_ratio``
        (method / bilinear), ``probe`` (per method: miou, pixel_acc, boundary_f, ...),
        ``range_temperatures``, and what was measured on.
    """
    import featup_adapters
    from ..data import as_dataset
    from ..training.evaluate import multiview_error
    from ..upsamplers import make_upsampler
    from .probe import linear_probe
    from .seg_data import TextureMosaic

    if factor < 1 or views < 1 or probe_train < 1 or probe_val < 1 or probe_steps < 1:
        raise ValueError(f"expected factor, views, probe_train, probe_val, probe_steps >= 1, got "
                         f"{factor}, {views}, {probe_train}, {probe_val}, {probe_steps}")
    t0 = time.perf_counter()
    neck = featup_adapters.wrap(backbone, upsampler, layer=layer)
    try:
        stride = int(neck.stride)
        if factor > stride or stride % factor:
            raise ValueError(f"expected a factor that divides the backbone's stride {stride} "
                             f"(e.g. {stride // 2 if stride > 1 else 1}), got {factor}")
        if image_size % (stride // factor) or image_size < stride:
            raise ValueError(f"expected an image size of at least the stride {stride} and divisible "
                             f"by {stride // factor}, got {image_size}")
        d = stride // factor
        out_size = (image_size // d, image_size // d)
        neck.eval().to(device)
        up = neck.upsampler
        use_norm = neck.norm is not None
        ds = as_dataset("embedded:val" if data is None else data, image_size, min_size=stride)
        if len(ds) < 2:
            raise ValueError(f"expected at least 2 held-out photos (the probe's classes), got {len(ds)}")
        photos = [ds[i] for i in range(len(ds))]
        images = torch.stack(photos).to(device)
        names = [Path(f).name for f in ds.files]

        methods = {"upsampler": up, "bilinear": make_upsampler("bilinear"),
                   "bicubic": make_upsampler("bicubic")}
        mv = {}
        for name, m in methods.items():
            mv[name] = multiview_error(neck, m, images, n_views=views, seed=seed, hr_downscale=d)
        ratio = {k: v / mv["bilinear"] for k, v in mv.items()}

        # probe mosaics from the held-out photos: top halves train the probe, bottom halves test it
        full = [as_dataset([f], (image_size * 2, image_size * 2), min_size=1)[0] for f in ds.files]
        top = [p[:, :image_size] for p in full]
        bottom = [p[:, image_size:] for p in full]
        k = len(full)
        train = _LabelsAt(TextureMosaic(probe_train, (image_size, image_size), k, textures=top,
                                        class_names=names, seed=seed), out_size)
        val = _LabelsAt(TextureMosaic(probe_val, (image_size, image_size), k, textures=bottom,
                                      class_names=names, seed=seed + 1), out_size)
        backbone_module = neck.backbone
    finally:
        neck.remove()
    probe = linear_probe(backbone_module, train, val, k, upsampler=up,
                         methods=("lowres", "bilinear", "jbu"), layer=neck.layer, steps=probe_steps,
                         device=device, seed=seed, boundary_tolerance=boundary_tolerance)
    probe = {("upsampler" if m == "jbu" else m): {kk: v for kk, v in r.items() if kk != "iou"}
             for m, r in probe.items()}
    cfg = getattr(up, "config", None) or {}
    res = {
        "backbone": backbone if isinstance(backbone, str) else type(backbone).__name__,
        "backbone_id": neck.backbone_id, "layer": neck.layer, "feature_dim": neck.feature_dim,
        "stride": stride, "upsampler": upsampler if isinstance(upsampler, str) else type(upsampler).__name__,
        "upsampler_class": type(up).__name__, "upsampler_backbone_id": cfg.get("backbone_id"),
        "use_norm": use_norm, "image_size": image_size, "factor": factor,
        "output_size": list(out_size), "held_out": names, "views_per_photo": views,
        "probe_mosaics": {"train": probe_train, "val": probe_val, "classes": k, "steps": probe_steps},
        "boundary_tolerance_px": boundary_tolerance,
        "multiview_error": mv, "multiview_ratio": ratio, "probe": probe,
        "probe_miou_gain_over_bilinear": probe["upsampler"]["miou"] - probe["bilinear"]["miou"],
        "range_temperatures": range_temperatures(up), "seed": seed,
        "seconds": time.perf_counter() - t0,
    }
    return _finite(res)


def format_table(res: dict) -> str:
    """The table ``eval`` prints: one row per method."""
    rows = [f"{res['backbone']} [{res['layer']}, {res['feature_dim']} ch], upsampler "
            f"{res['upsampler']} ({res['upsampler_class']}), {res['factor']}x -> "
            f"{res['output_size'][0]}x{res['output_size'][1]}, {len(res['held_out'])} held-out photos",
            f"{'method':<10} {'mv error':>9} {'x bilinear':>10} {'probe mIoU':>10} {'boundary F':>10}"]

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for m in ("upsampler", "bilinear", "bicubic", "lowres"):
        mv = res["multiview_error"].get(m)
        pr = res["probe"].get(m, {})
        miou = pr.get("miou")
        rows.append(f"{m:<10} {f(mv, '9.4f'):>9} {f(res['multiview_ratio'].get(m), '10.3f'):>10} "
                    f"{f(None if miou is None else 100 * miou, '10.2f'):>10} "
                    f"{f(pr.get('boundary_f'), '10.3f'):>10}")
    if res.get("range_temperatures"):
        rows.append("range temperatures exp(range_temp): "
                    + ", ".join(f"{t:.3g}" for t in res["range_temperatures"]))
    return "\n".join(rows)


def add_eval_parser(subparsers):
    """Register ``eval``: multi-view error, linear probe and boundary F-score against bilinear."""
    p = subparsers.add_parser(
        "eval", help="evaluate an upsampler against bilinear/bicubic on held-out photos",
        description="Held-out multi-view error (vs bilinear and bicubic), a linear-probe mIoU on "
                    "mosaics of the held-out photos and the probe's boundary F-score; prints a "
                    "table, writes JSON with --json.")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="timm:NAME | hf:ID | open_clip:NAME | a registered name (default: %(default)s)")
    p.add_argument("--layer", default=None)
    p.add_argument("--upsampler", default="auto",
                   help="auto | a registered name (e.g. universal) | a saved directory (default: auto)")
    p.add_argument("--data", default="embedded:val",
                   help="held-out photos: a folder or embedded:val (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--factor", type=int, default=16, help="output / feature grid (default: 16)")
    p.add_argument("--views", type=int, default=8, help="jittered views per photo")
    p.add_argument("--probe-train", type=int, default=48, help="mosaics to train the probe")
    p.add_argument("--probe-val", type=int, default=24, help="mosaics to evaluate the probe")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--boundary-tolerance", type=int, default=2, help="px at the output size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run_eval, command="eval")
    return p


def run_eval(args) -> int:
    from .._io import atomic_write

    res = evaluate_upsampler(args.backbone, args.upsampler, args.data, layer=args.layer,
                             image_size=args.image_size, factor=args.factor, views=args.views,
                             probe_train=args.probe_train, probe_val=args.probe_val,
                             probe_steps=args.probe_steps, boundary_tolerance=args.boundary_tolerance,
                             seed=args.seed, device=args.device)
    print(format_table(res))
    if args.json:
        text = json.dumps(res, indent=1, allow_nan=False)
        with atomic_write(args.json, "w") as fh:
            fh.write(text + "\n")
        print(f"wrote {args.json}")
    return 0
