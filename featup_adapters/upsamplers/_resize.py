"""Bicubic upsampling followed by reflect padding, as one step (the input of each JBU stage).

``bicubic_pad(x, (H, W), r)`` equals
``pad2d(F.interpolate(x, (H, W), mode="bicubic", align_corners=False), r)`` (up to float rounding).
It is the ``featup_adapters.ops.bicubic_pad`` op: on CPU one separable 4-tap pass that writes
the padded map directly (no resized map and padded copy, no dense interpolation matrices), on
CUDA torch's own kernels behind the same op.  A NaN/Inf in the source stays as local as with
``F.interpolate``.
"""
from __future__ import annotations

from torch import Tensor

from ..ops import bicubic_pad_conv
from ..ops.resize import bicubic_pad as _bicubic_pad_op
from ..ops.resize import pad2d, pad_mode

__all__ = ["bicubic_pad", "bicubic_pad_conv", "pad2d", "pad_mode"]


def bicubic_pad(x: Tensor, size: tuple[int, int], r: int) -> Tensor:
    """``Tensor[B, C, h, w]`` -> bicubic to ``size`` and reflect-padded by ``r``:
    ``Tensor[B, C, H + 2r, W + 2r]`` in the dtype of ``x`` (autocast does not change it)."""
    return _bicubic_pad_op(x, size, r)
