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

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import SUPPORTED_DTYPES, _shape
from ._loader import extension_loaded

__all__ = ["bicubic_pad", "bicubic_pad_conv_available", "bicubic_pad_reference",
           "bicubic_pad_rows", "bicubic_pad_rows_reference", "pad_mode", "pad2d"]

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


# ----------------------------------------------------------------- resize + pad + convolution
def bicubic_pad_conv_available(x: Tensor) -> bool:
    """True where :func:`bicubic_pad_conv` runs the fused kernel: a float32/float64 CPU tensor
    with the compiled extension (the op has no CUDA kernel and no derivative); the op itself is
    ``featup_adapters.ops.bicubic_pad_conv``."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
                "featup_adapters::bicubic_pad_conv", "CPU"))


# ------------------------------------------------------------------------------ rows of a band
def _unpad(P: Tensor, n: int, r: int, reflect: bool) -> Tensor:
    o = P - r
    if reflect:
        o = o.abs()
        return torch.where(o >= n, 2 * (n - 1) - o, o)
    return o.clamp(0, n - 1)


def bicubic_taps(n_in: int, n_out: int, r: int, reflect: bool, positions: Tensor):
    """Bicubic taps (torch's convention) of padded output ``positions`` of one axis:
    ``(index: Tensor[4, n] int64, weight: Tensor[4, n] float64)``, indices clamped to ``[0, n_in)``."""
    o = _unpad(positions, n_out, r, reflect).double()
    real = (o + 0.5) * (n_in / n_out) - 0.5
    i = torch.floor(real).clamp(max=n_in - 1)
    t = (real - i).clamp(0, 1)
    a = -0.75

    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    w = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)])
    idx = torch.stack([(i.long() - 1 + k).clamp(0, n_in - 1) for k in range(4)])
    return idx, w


def source_row_range(n_in: int, n_out: int, r: int, reflect: bool, row0: int, row1: int) -> tuple[int, int]:
    """``[lo, hi)``: the source rows that padded output rows ``[row0, row1)`` of one axis read
    (plain Python, so it also runs while tracing with fake tensors)."""
    lo, hi = n_in, 0
    scale = n_in / n_out
    for P in range(row0, row1):
        o = P - r
        if reflect:
            o = abs(o)
            o = 2 * (n_out - 1) - o if o >= n_out else o
        else:
            o = min(max(o, 0), n_out - 1)
        i = min(math.floor((o + 0.5) * scale - 0.5), n_in - 1)
        lo, hi = min(lo, max(i - 1, 0)), max(hi, min(i + 2, n_in - 1) + 1)
    return lo, hi


def check_bicubic_pad_rows_args(x: Tensor, size, r: int, src_rows: int, src_row0: int, row0: int,
                                row1: int) -> tuple[int, int]:
    H, W = check_bicubic_pad_args(x, size, r)
    for name, v in (("src_rows", src_rows), ("src_row0", src_row0), ("row0", row0), ("row1", row1)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"bicubic_pad_rows: expected an int {name}, got {v!r}")
    if src_row0 < 0 or src_row0 + x.shape[2] > src_rows:
        raise ValueError(f"bicubic_pad_rows: expected the band's {x.shape[2]} source rows starting "
                         f"at {src_row0} inside the source's {src_rows} rows")
    if not 0 <= row0 < row1 <= H + 2 * r:
        raise ValueError(f"bicubic_pad_rows: expected output rows 0 <= row0 < row1 <= {H + 2 * r}, "
                         f"got [{row0}, {row1})")
    lo, hi = source_row_range(src_rows, H, r, pad_mode(H, W, r) == "reflect", row0, row1)
    if lo < src_row0 or hi > src_row0 + x.shape[2]:
        raise ValueError(f"bicubic_pad_rows: output rows [{row0}, {row1}) read source rows "
                         f"[{lo}, {hi}), not all inside the band's rows "
                         f"[{src_row0}, {src_row0 + x.shape[2]})")
    return H, W


def bicubic_pad_rows_reference(x: Tensor, size: Sequence[int], r: int, src_rows: int,
                               src_row0: int, row0: int, row1: int) -> Tensor:
    """Rows ``[row0, row1)`` of ``bicubic_pad`` from a band of source rows, in PyTorch: 4 row
    taps then 4 column taps (gathers and multiply-adds); the CUDA kernel of the op."""
    H, W = int(size[0]), int(size[1])
    reflect = pad_mode(H, W, r) == "reflect"
    acc = _acc_dtype(x.dtype)
    xa = x.to(acc)
    dev = x.device
    ri, rw = bicubic_taps(src_rows, H, r, reflect, torch.arange(row0, row1))
    rows = None
    for k in range(4):
        term = xa.index_select(2, (ri[k] - src_row0).to(dev)) * rw[k].to(dev, acc).view(1, 1, -1, 1)
        rows = term if rows is None else rows.add_(term)
    ci, cw = bicubic_taps(x.shape[3], W, r, reflect, torch.arange(W + 2 * r))
    out = None
    for k in range(4):
        term = rows.index_select(3, ci[k].to(dev)) * cw[k].to(dev, acc)
        out = term if out is None else out.add_(term)
    return out.to(x.dtype)


def bicubic_pad_rows(x: Tensor, size: Sequence[int], r: int, *, src_rows: int, src_row0: int,
                     row0: int, row1: int) -> Tensor:
    """Rows ``[row0, row1)`` of ``bicubic_pad(source, size, r)``, computed from a band of the source.

    ``x: Tensor[B, C, n, w]`` holds source rows ``[src_row0, src_row0 + n)`` of a source with
    ``src_rows`` rows; the result ``Tensor[B, C, row1 - row0, W + 2r]`` equals
    ``bicubic_pad(source, size, r)[:, :, row0:row1]`` (the taps are the whole map's).  The band
    must hold every source row those output rows read.  Inference only (no autograd): the row-band
    path of ``JBUStack`` uses it.

    Example:
        >>> src = torch.randn(1, 2, 8, 8)
        >>> band = bicubic_pad_rows(src[:, :, 2:7], (16, 16), 3, src_rows=8, src_row0=2, row0=8, row1=14)
        >>> torch.allclose(band, bicubic_pad(src, (16, 16), 3)[:, :, 8:14], atol=1e-6)
        True
    """
    check_bicubic_pad_rows_args(x, size, r, src_rows, src_row0, row0, row1)
    H, W = int(size[0]), int(size[1])
    if x.device.type in _OP_DEVICES and extension_loaded():
        return torch.ops.featup_adapters.bicubic_pad_rows(x, [H, W], r, src_rows, src_row0, row0, row1)
    return bicubic_pad_rows_reference(x, (H, W), r, src_rows, src_row0, row0, row1)
