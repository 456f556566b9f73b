"""Multi-view reconstruction error: how well ``upsample`` predicts the features of jittered views.

For each image x and random view t: ``err = |avgpool(t(up(f(x), x))) - f(t(x))|^2``, with a FIXED
area-average downsampler (one stride x stride patch per feature cell) so that upsamplers trained with
a learned downsampler get no advantage.  Reported relative to the variance of the target features
(0 = perfect; about 1 = no better than predicting the mean).  Lower is better.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .jitter import sample_jitter


def view_error(hr: Tensor, t, target: Tensor, k: int) -> Tensor:
    """Squared error (a 0-d tensor, differentiable in ``hr``) of one view: the upsampled map
    ``hr[B, C, H, W]`` seen through the jitter ``t``, resized bilinearly to ``k`` times the
    target's size if it is not already, area-averaged over ``k x k`` cells, against
    ``target[B, C, h, w]`` (the backbone's features of the jittered image)."""
    v = t(hr)
    h, w = target.shape[-2:]
    if tuple(v.shape[-2:]) != (h * k, w * k):
        v = nn.functional.interpolate(v, size=(h * k, w * k), mode="bilinear", align_corners=False)
    return (nn.functional.avg_pool2d(v, k) - target).square().sum()


def target_spread(target: Tensor) -> Tensor:
    """Sum of squared deviations of ``target[B, C, h, w]`` from its per-channel mean: the
    denominator that makes ``view_error`` relative (predicting the mean scores about 1)."""
    return (target - target.mean(dim=(0, 2, 3), keepdim=True)).square().sum()


def view_target(src, x: Tensor, t, d: int) -> Tensor:
    """The backbone's features of the image ``x`` seen through the jitter ``t`` (sampled at
    ``1 / d`` of the image's size, so applied scaled by ``d``)."""
    return src.features(t.scaled(d)(x)).float()


@torch.no_grad()
def multiview_error(src, upsampler: nn.Module, images: Tensor, *, n_views: int = 8,
                    max_pad: int = 20, max_zoom: float = 2.0, seed: int = 0,
                    batch_size: int = 2, hr_downscale: int = 1) -> float:
    """Mean relative multi-view reconstruction error.

    Args:
        src: a feature source (``features``, ``stride``, ``mean``, ``std``), e.g. a wrapped neck.
        upsampler: ``forward(source[B, C, h, w], guidance[B, 3, H, W], output_size=(H, W))``.
        images: ``Tensor[N, 3, H, W]`` in [0, 1].
        hr_downscale: upsample to ``(H, W) / hr_downscale`` instead of the image size (views are
            then sampled at that size and applied, scaled, to the image).
    """
    from .trainer import _normalize

    g = torch.Generator().manual_seed(seed)
    d = int(hr_downscale)
    k = int(src.stride) // d
    num = den = 0.0
    for i in range(0, images.shape[0], batch_size):
        x = _normalize(images[i:i + batch_size].float(), src.mean, src.std)
        H, W = x.shape[-2] // d, x.shape[-1] // d
        hr = upsampler(src.features(x).float(), x, output_size=(H, W)).float()
        for _ in range(n_views):
            t = sample_jitter((H, W), max_pad // d, max_zoom, generator=g)
            target = view_target(src, x, t, d)
            num += float(view_error(hr, t, target, k))
            den += float(target_spread(target))
    return num / max(den, 1e-12)
