"""Bicubic resize followed by reflect padding, as one op: the input JBU's adaptive convolution reads.

``bicubic_pad(x, (H, W), r)`` equals ``pad2d(F.interpolate(x, (H, W), mode="bicubic",
align_corners=False), r)``: torch's bicubic convention (A = -0.75, source index
``(o + 0.5) * h / H - 0.5``, taps clamped at the borders), then reflect padding by ``r``
(replicate when a side of the output is <= r).  A NaN or Inf in the source reaches only the
outputs whose four taps per axis touch it, as with ``F.interpolate``.

Backends: on CPU the compiled kernel (``csrc/cpu/resize_cpu.cpp``: separable 4-tap passes, the
padding folded into the output index tables, no resized copy before the padded one); on CUDA the
same op served by torch's own ``F.interpolate`` + ``F.pad``; anywhere else, or without the
extension, the pure PyTorch reference below.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import SUPPORTED_DTYPES, _shape
from ._loader import extension_loaded

__all__ = ["bicubic_pad", "bicubic_pad_reference", "pad_mode", "pad2d"]

_OP_DEVICES = ("cpu", "cuda")  # the op's kernels: compiled on CPU, torch's own on CUDA


def pad_mode(h: int, w: int, r: int) -> str:
    """Reflection needs sides > r; smaller maps are padded by replication."""
    return "reflect" if min(h, w) > r else "replicate"


def pad2d(x: Tensor, r: int) -> Tensor:
    """Reflect-pad the last two dims by ``r`` (replicate when a side is <= r)."""
    if r == 0:
        return x
    return F.pad(x, [r, r, r, r], mode=pad_mode(x.shape[-2], x.shape[-1], r))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def bicubic_pad_reference(x: Tensor, size: Sequence[int], r: int) -> Tensor:
    """``F.interpolate`` + ``F.pad``: the test oracle and the fallback (half computed in float32)."""
    y = F.interpolate(x.to(_acc_dtype(x.dtype)), size=tuple(size), mode="bicubic",
                      align_corners=False)
    return pad2d(y, r).to(x.dtype)


def check_bicubic_pad_args(x: Tensor, size: Sequence[int], r: int) -> tuple[int, int]:
    """Raise a ValueError/TypeError naming what was expected and what came; returns (H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"bicubic_pad: expected a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"bicubic_pad: expected input of shape [B, C, h, w] (4-D), got "
                         f"{x.dim()}-D tensor of shape {_shape(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bicubic_pad: expected a floating dtype in "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}")
    try:
        H, W = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"bicubic_pad: expected size (H, W) of two ints, got {size!r}") from None
    if H < 1 or W < 1:
        raise ValueError(f"bicubic_pad: expected an output size of at least 1x1, got {H}x{W}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"bicubic_pad: expected a source of at least 1x1 pixels, got input of "
                         f"shape {_shape(x)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"bicubic_pad: expected an int padding r >= 0, got {r!r}")
    return H, W


def bicubic_pad(x: Tensor, size: Sequence[int], r: int) -> Tensor:
    """Bicubic resize to ``size``, then reflect-pad by ``r``. Differentiable in ``x``.

    Args:
        x: ``Tensor[B, C, h, w]``, float32/float64/float16/bfloat16 (half computed in float32).
        size: the output size ``(H, W)`` before padding.
        r: padding on each side (reflect; replicate when ``min(H, W) <= r``).

    Returns:
        ``Tensor[B, C, H + 2r, W + 2r]`` in the dtype of ``x`` (autocast does not change it).

    Example:
        >>> x = torch.randn(1, 4, 7, 9)
        >>> bicubic_pad(x, (14, 18), 3).shape
        torch.Size([1, 4, 20, 24])
    """
    H, W = check_bicubic_pad_args(x, size, r)
    if x.device.type in _OP_DEVICES and extension_loaded():
        return torch.ops.featup_adapters.bicubic_pad(x, [H, W], r)
    return bicubic_pad_reference(x, (H, W), r)
