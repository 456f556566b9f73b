"""The picture commands of ``featup-adapters``: ``demo``, ``cam`` (see cli.py; ``upsample`` is in extract.py).

Each ``run_*(args) -> int`` prints what it did and where it wrote it; failures raise exceptions
with a one-line message, which ``cli.main`` turns into one line on stderr.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from . import viz
from ._cli_base import PROG, CLIError
from ._validate import check_output_file
from .images import check_min_size, default_image, read_rgb, resize_rgb, to_tensor

__all__ = ["run_demo", "run_cam"]


@contextmanager
def _step(label: str, timings: list):
    t0 = time.perf_counter()
    yield
    timings.append((label, time.perf_counter() - t0))


def _print_timings(timings) -> None:
    width = max(len(label) for label, _ in timings)
    for label, seconds in timings:
        print(f"  {label:<{width}}  {seconds * 1e3:8.1f} ms")


def _device(args) -> torch.device:
    name = args.device if args.device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise CLIError(f"unknown device {name!r} ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__})")
    return device


def _backbone(args):
    from .adapters.registry import PretrainedWeightsError, resolve_backbone

    try:
        model, origin = resolve_backbone(args.backbone, pretrained=args.pretrained)
    except ImportError as exc:
        raise CLIError(f"backbone {args.backbone!r} needs a package that is not installed: {exc}") from None
    except (ValueError, PretrainedWeightsError):
        raise
    except Exception as exc:
        raise CLIError(f"cannot build backbone {args.backbone!r}: {' '.join(str(exc).split())}") from None
    if origin.pretrained is False:
        print(f"{PROG}: note: {args.backbone} is random-init (--no-pretrained)", file=sys.stderr)
    return model


def _neck(args, model, device, *, fallback: str | None = None):
    """(neck, upsampler label); with ``fallback``, a backbone without a registered upsampler
    gets that baseline and a notice instead of an error."""
    from .neck import wrap

    try:
        neck = wrap(model, args.upsampler, layer=args.layer,
                    max_memory=getattr(args, "max_memory", None))
        label = _upsampler_label(neck, args.upsampler)
    except LookupError as exc:
        if fallback is None or args.upsampler != "auto":
            raise
        print(f"{PROG}: note: {' '.join(str(exc).split('. ')[0].split())}; showing {fallback} instead",
              file=sys.stderr)
        neck = wrap(model, fallback, layer=args.layer)
        label = None
    getattr(args, "_necks", []).append(neck)
    _upsample_in_dtype(neck, getattr(args, "dtype", None))
    return neck.to(device).eval(), label


def _upsample_in_dtype(neck, dtype_name) -> None:
    """``upsample --dtype float16``: an upsampler that takes ``out_dtype`` (JBUStack) writes its
    output in that dtype directly (half the peak memory of a float32 output converted after);
    the others' outputs are converted when saved."""
    from .neck import _supported

    if dtype_name in (None, "float32"):
        return
    options = {**neck.upsampler_options, "out_dtype": getattr(torch, dtype_name)}
    try:
        neck.upsampler_options = _supported(neck.upsampler, options)
    except TypeError:
        pass                      # no out_dtype on this upsampler: converted per image instead


def _upsampler_label(neck, requested: str) -> str:
    cfg = getattr(neck.upsampler, "config", None) or {}
    name = cfg.get("name")
    if requested in ("bilinear", "bicubic", "nearest"):
        return requested
    kind = type(neck.upsampler).__name__
    return f"{'JBU' if 'JBU' in kind else kind} ({name or requested})"


def _size_text(t) -> str:
    return f"{t.shape[-2]}x{t.shape[-1]}"


def _describe(neck) -> str:
    return (f"backbone {neck.backbone_id or type(neck.backbone).__name__}, layer {neck.layer}, "
            f"{neck.feature_dim} channels, stride {neck.stride}")


def _load_one(path, neck, size):
    """(Tensor[1, 3, H, W], rgb, label) for a file or, with ``path=None``, the embedded photo."""
    if path is None:
        rgb, label = default_image()
    else:
        rgb, label = read_rgb(path), str(path)
    rgb = resize_rgb(rgb, size)
    check_min_size(rgb, neck.stride, name=label)
    return to_tensor(rgb, neck.mean, neck.std), rgb, label


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

def run_demo(args) -> int:

    timings: list = []
    check_output_file(args.out, "--out")
    device = _device(args)
    if args.image is not None:
        read_rgb(args.image)  # fail on a bad file before loading any model
    with _step("build backbone", timings):
        model = _backbone(args)
    with _step("load upsampler", timings):
        neck, label = _neck(args, model, device, fallback="bilinear")
    print(f"{PROG} demo: {_describe(neck)}; upsampler {label or 'none registered'}")
    with _step("read image", timings):
        x, rgb, image_label = _load_one(args.image, neck, args.size)
    x = x.to(device)
    size = tuple(x.shape[-2:])
    with torch.inference_mode():
        with _step("backbone features", timings):
            lr = neck.features(x)
        with _step("bilinear upsampling", timings):
            bil = F.interpolate(lr, size=size, mode="bilinear", align_corners=False)
        hr = None
        if label is not None:
            with _step("backbone + JBU upsampling", timings):
                hr = neck(x)
    with _step("PCA + picture", timings):
        maps = [lr[0], bil[0]] + ([hr[0]] if hr is not None else [])
        pics = viz.pca_rgb(*maps, fit_on=0)
        titles = [f"image {rgb.shape[0]}x{rgb.shape[1]}",
                  f"low-res features {_size_text(lr)} ({lr.shape[1]} ch)",
                  f"bilinear {_size_text(bil)}"]
        if hr is not None:
            titles.append(f"{label} {_size_text(hr)}")
        out = Path(args.out)
        picture = viz.panel([rgb, *pics], titles, path=out)
    print(f"  image: {image_label}")
    _print_timings(timings)
    print(f"wrote {out} ({picture.width}x{picture.height})")
    return 0


# --------------------------------------------------------------------------------------------
# cam
# --------------------------------------------------------------------------------------------

def _class_index(spec: str | None, logits, num_classes: int) -> int:
    if spec is None:
        return int(logits.argmax())
    text = spec.strip()
    if text.lstrip("-").isdigit():
        idx = int(text)
        if not 0 <= idx < num_classes:
            raise CLIError(f"class index {idx} out of range: the classifier has {num_classes} classes")
        return idx
    if num_classes != 1000:
        raise CLIError(f"class names are known for ImageNet (1000 classes) only; this classifier has "
                       f"{num_classes}: pass --class IDX")
    names = _imagenet_names()
    key = text.lower()
    exact = [i for i, n in enumerate(names) if key in [s.strip().lower() for s in n.split(",")]]
    if exact:
        return exact[0]
    partial = [i for i, n in enumerate(names) if key in n.lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        shown = "; ".join(f"{i} {names[i]}" for i in partial[:6])
        raise CLIError(f"class name {spec!r} is ambiguous: {shown}{' ...' if len(partial) > 6 else ''}")
    import difflib

    close = difflib.get_close_matches(key, [s.strip().lower() for n in names for s in n.split(",")], n=3)
    raise CLIError(f"unknown ImageNet class {spec!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))


def _imagenet_names() -> list[str]:
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        raise CLIError("class names need timm's ImageNet tables (pip install timm); pass --class IDX") from None
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(info.num_classes())]


def run_cam(args) -> int:

    timings: list = []
    check_output_file(args.out, "--out")
    device = _device(args)
    if args.image is not None:
        read_rgb(args.image)
    with _step("build backbone", timings):
        model = _backbone(args)
    with _step("load upsampler", timings):
        neck, label = _neck(args, model, device)
    if neck.norm is not None:
        raise CLIError("cam needs the backbone's own features, but this upsampler applies a LayerNorm to "
                       "them (use_norm); pick an upsampler trained without it")
    head, classifier = viz.classifier_head(neck.backbone, neck.layer)
    print(f"{PROG} cam: {_describe(neck)}; upsampler {label}")
    with _step("read image", timings):
        x, rgb, image_label = _load_one(args.image, neck, args.size)
    x = x.to(device)
    size = tuple(x.shape[-2:])
    with torch.inference_mode():
        with _step("backbone + JBU upsampling", timings):
            hr, lr = neck(x, return_lowres=True)
        logits = viz.class_logit_map(lr, classifier, head).mean((2, 3))[0]
        k = _class_index(args.class_, logits, logits.shape[0])
        with _step("CAM low-res", timings):
            cam_lr = viz.cam(lr, classifier, k, head=head)
        with _step("CAM bilinear features", timings):
            bil = F.interpolate(lr, size=size, mode="bilinear", align_corners=False)
            cam_bil = viz.cam(bil, classifier, k, head=head)
        with _step("CAM JBU features", timings):
            cam_hr = viz.cam(hr, classifier, k, head=head)
    names = _imagenet_names() if logits.shape[0] == 1000 else None

    def name(i):
        return names[i].split(",")[0] if names else f"class {i}"

    probs = logits.softmax(0)
    top = probs.topk(min(5, probs.numel()))
    print(f"  image: {image_label}; top-{len(top.indices)}: "
          + ", ".join(f"{int(i)} {name(int(i))} {float(p):.2f}" for p, i in zip(top.values, top.indices)))
    print(f"  class: {k} {name(k)} (p={float(probs[k]):.2f})")
    with _step("picture", timings):
        pics = [rgb, viz.overlay(rgb, cam_lr[0], resample="nearest"), viz.overlay(rgb, cam_bil[0]),
                viz.overlay(rgb, cam_hr[0])]
        titles = [f"image {rgb.shape[0]}x{rgb.shape[1]}\n{name(k)}", f"CAM low-res {_size_text(lr)}\n ",
                  f"CAM bilinear features\n{_size_text(bil)}", f"CAM {label}\n{_size_text(hr)}"]
        out = Path(args.out)
        picture = viz.panel(pics, titles, path=out)
    _print_timings(timings)
    print(f"wrote {out} ({picture.width}x{picture.height})")
    return 0

