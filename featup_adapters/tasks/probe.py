"""FeatUp's linear-probe protocol: frozen features, upsampled to the label size, a 1x1 conv head.

    results = linear_probe("efficientnet_lite0", train_set, val_set, num_classes=8, upsampler="auto")
    # {"lowres": {"miou", "pixel_acc", ...}, "bilinear": {...}, "jbu": {...}}

Methods (every one is evaluated at the label resolution, so the numbers compare):
- ``lowres``: the features as they are, each pixel taking its own feature cell (nearest upsampling);
- ``bilinear``: bilinear upsampling of the features;
- ``jbu``: the given (trained, frozen) JBU upsampler guided by the image.
The backbone and the upsamplers are frozen; only the 1x1 conv is trained (Adam, cross-entropy,
ignore 255), with the same seed, steps and batches for every method.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from .metrics import BoundaryMeter, SegMeter
from .seg_data import IGNORE_INDEX

__all__ = ["linear_probe", "METHODS"]

METHODS = ("lowres", "bilinear", "jbu")


@torch.no_grad()
def _extract(neck, data: Dataset, mean: Tensor, std: Tensor, device) -> List[tuple]:
    """Per sample: (lowres Tensor[C, h, w], guidance Tensor[3, H, W], mask LongTensor[H, W]) on CPU."""
    out = []
    for i in range(len(data)):
        image, mask = data[i]
        g = ((image[None].to(device) - mean) / std)
        out.append((neck.features(g)[0].cpu(), g[0].cpu(), mask))
    return out


def _upsample(method: str, up: Optional[nn.Module], lowres: Tensor, guidance: Tensor, size) -> Tensor:
    if method == "lowres":
        return F.interpolate(lowres, size=size, mode="nearest")
    if method == "bilinear":
        return F.interpolate(lowres, size=size, mode="bilinear", align_corners=False)
    out = up(lowres, guidance, output_size=size)
    if out.shape[-2:] != tuple(size):
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator):
    order: List[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n, generator=gen).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def resolve_methods(methods, upsampler) -> list:
    """The probe methods to run: ``None`` -> all of ``METHODS`` (without ``"jbu"`` when there is no
    upsampler); anything else is checked, naming what was expected."""
    if methods is None:
        methods = [m for m in METHODS if not (m == "jbu" and upsampler is None)]
    methods = list(methods)
    if "jbu" in methods and upsampler is None:
        raise ValueError(f"methods {methods} include 'jbu' but upsampler=None: drop 'jbu' or pass the "
                         "upsampler to probe")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"expected methods among {list(METHODS)}, got {list(methods)}")
    return methods


def linear_probe(backbone: Union[str, nn.Module], train_data: Dataset, val_data: Dataset, num_classes: int, *,
                 upsampler: Union[None, str, nn.Module] = "auto", methods: Optional[Sequence[str]] = None,
                 layer: Optional[str] = None, steps: int = 300, batch_size: int = 8, lr: float = 1e-2,
                 device: Union[str, torch.device] = "cpu", seed: int = 0, progress: bool = False,
                 ignore_index: int = IGNORE_INDEX, pretrained: Union[None, bool, str] = None,
                 cache_bytes: int = 2 << 30, boundary_tolerance: int = 2) -> Dict[str, dict]:
    """Train a 1x1 conv on frozen upsampled features for each method; return metrics per method.

    Args:
        backbone: module or spec string (see ``featup_adapters.adapters.create_backbone``).
        upsampler: the JBU for the "jbu" method: "auto" (the registered pretrained one), a directory /
            registered name, or a module; None drops "jbu" from ``methods``.
        methods: subset of ("lowres", "bilinear", "jbu"); None = all (without "jbu" when
            ``upsampler`` is None).
        cache_bytes: keep the upsampled features in memory (computed once per method) when they fit.
        boundary_tolerance: pixels (at label resolution) within which a predicted label edge counts
            as on a true one, for ``metrics.BoundaryMeter``.
    Returns:
        ``{method: {"miou", "pixel_acc", "iou", "boundary_f", "boundary_precision",
        "boundary_recall", "seconds"}}`` on ``val_data`` at label resolution.
    """
    import featup_adapters
    from featup_adapters.adapters import create_backbone

    methods = resolve_methods(methods, upsampler)
    if isinstance(backbone, str):
        backbone = create_backbone(backbone, pretrained=pretrained)
    neck = featup_adapters.wrap(backbone, upsampler if "jbu" in methods else "bilinear", layer=layer)
    neck.eval().to(device)
    for p in neck.parameters():
        p.requires_grad_(False)
    mean = torch.tensor([float(v) for v in neck.mean], device=device).view(1, 3, 1, 1)
    std = torch.tensor([float(v) for v in neck.std], device=device).view(1, 3, 1, 1)
    train, val = _extract(neck, train_data, mean, std, device), _extract(neck, val_data, mean, std, device)
    if not train or not val:
        raise ValueError(f"expected non-empty train and val sets, got {len(train)} and {len(val)} samples")
    up = neck.upsampler if "jbu" in methods else None
    results: Dict[str, dict] = {}
    per_sample = max(neck.feature_dim * m.numel() * 4 for _, _, m in train + val)
    cache = per_sample * (len(train) + len(val)) <= cache_bytes

    def feats_of(sample, store, key):
        if cache and key in store:
            return store[key].to(device)
        lr_feat, g, mask = sample
        with torch.no_grad():
            f = _upsample(method, up, lr_feat[None].to(device), g[None].to(device), tuple(mask.shape))
        if cache:
            store[key] = f.cpu()
        return f

    for method in methods:
        t0 = time.perf_counter()
        store: Dict[tuple, Tensor] = {}
        torch.manual_seed(seed)
        head = nn.Conv2d(neck.feature_dim, num_classes, 1).to(device)
        opt = torch.optim.Adam(head.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        it = _batches(len(train), batch_size, steps, gen)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=steps, desc=f"probe {method}", unit="step")
        for idx in it:
            # samples one by one (labels may differ in size), gradients summed over the batch
            loss = 0.0
            opt.zero_grad(set_to_none=True)
            for i in idx:
                mask = train[i][2]
                feats = feats_of(train[i], store, ("train", i))
                li = F.cross_entropy(head(feats), mask[None].to(device), ignore_index=ignore_index) / len(idx)
                li.backward()
                loss += li.item()
            opt.step()
        meter = SegMeter(num_classes, ignore_index)
        edges = BoundaryMeter(boundary_tolerance, ignore_index)
        with torch.no_grad():
            for i, sample in enumerate(val):
                mask = sample[2]
                feats = feats_of(sample, store, ("val", i))
                pred = head(feats).argmax(1).cpu()
                meter.update(pred, mask[None])
                edges.update(pred, mask[None])
        results[method] = {**meter.compute(), **edges.compute(), "seconds": time.perf_counter() - t0}
    neck.remove()
    return results
