"""Bicubic upsampling followed by reflect padding, as one step.

``bicubic_pad(x, (H, W), r)`` equals
``pad2d(F.interpolate(x, (H, W), mode="bicubic", align_corners=False), r)`` (up to float rounding).
On CPU, for maps up to ``DENSE_MAX_SIDE`` pixels a side, it is two matrix products with
precomputed interpolation matrices whose rows already follow the reflect padding: the padded map
comes out directly, without the resized map and its padded copy (on CPU each fresh large tensor
costs page faults), and BLAS runs it faster than ``upsample_bicubic2d`` at these sizes.  Larger
maps and other devices use ``F.interpolate`` and ``F.pad``.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_MAX_SIDE = 256
_A = -0.75  # PyTorch's bicubic coefficient


def pad_mode(h: int, w: int, r: int) -> str:
    """Reflection needs sides > r; smaller maps are padded by replication."""
    return "reflect" if min(h, w) > r else "replicate"


def pad2d(x: Tensor, r: int) -> Tensor:
    """Reflect-pad the last two dims by ``r`` (replicate when a side is <= r)."""
    if r == 0:
        return x
    return F.pad(x, [r, r, r, r], mode=pad_mode(x.shape[-2], x.shape[-1], r))


def _cubic_weights(t: float) -> tuple[float, float, float, float]:
    def near(x):     # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):      # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return far(t + 1), near(t), near(1 - t), far(2 - t)


@functools.lru_cache(maxsize=64)
def _matrix(n_in: int, n_out: int, r: int, mode: str) -> Tensor:
    """``[n_out + 2r, n_in]`` float64: row ``i`` interpolates padded output position ``i - r``."""
    scale = n_in / n_out                   # align_corners=False, size given (no scale factor)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        x = (o + 0.5) * scale - 0.5         # not clamped at 0 for cubic, like PyTorch
        f = math.floor(x)
        for k, wk in enumerate(_cubic_weights(x - f)):
            m[o, min(max(f - 1 + k, 0), n_in - 1)] += wk
    if mode == "reflect":
        rows = [*range(r, 0, -1), *range(n_out), *range(n_out - 2, n_out - 2 - r, -1)]
    else:
        rows = [0] * r + list(range(n_out)) + [n_out - 1] * r
    return m[rows]


def bicubic_pad(x: Tensor, size: tuple[int, int], r: int) -> Tensor:
    """``Tensor[B, C, h, w]`` -> bicubic to ``size`` and reflect-padded by ``r``:
    ``Tensor[B, C, H + 2r, W + 2r]`` in the dtype of ``x`` (autocast does not change it)."""
    B, C, h, w = x.shape
    H, W = size
    if x.device.type != "cpu" or max(h, w) > DENSE_MAX_SIDE or not x.is_floating_point():
        return pad2d(F.interpolate(x, (H, W), mode="bicubic", align_corners=False), r)
    mode = pad_mode(H, W, r)
    mh = _matrix(h, H, r, mode).to(x.dtype)
    mw = _matrix(w, W, r, mode).to(x.dtype)
    with torch.autocast("cpu", enabled=False):
        y = torch.matmul(x.reshape(B * C * h, w), mw.t())           # [B*C*h, W + 2r]
        return torch.matmul(mh, y.view(B, C, h, W + 2 * r))          # [B, C, H + 2r, W + 2r]
