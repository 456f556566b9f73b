"""The adaptive convolution, the op behind joint bilateral upsampling.

``adaptive_conv(input, filters)`` applies one k x k filter per output pixel::

    out[b, c, y, x] = sum_{i, j < k} filters[b, y, x, i, j] * input[b, c, y + i, x + j]

Backends per device, in priority order: the compiled CUDA kernel, the compiled CPU kernel
(OpenMP, vectorized, ISA chosen at run time), the pure PyTorch reference.  ``backend()`` says
which one serves each device and why the others do not; a fallback to the reference warns once.

The compiled CPU kernels (these ops and ``bicubic_pad``) read and write subnormal numbers
(below 1.2e-38 in float32) as zero while they run: x86 cores are many times slower on them, and
the JBU's softmax kernels and their gradients are full of them.  The caller's floating-point mode,
and PyTorch's, are left as they were (``csrc/cpu/denormals.h``).

``bicubic_pad(x, (H, W), r)`` (``resize.py``) is the bicubic resize + reflect pad JBU feeds the
convolution with: a compiled CPU kernel, torch's own kernels on CUDA, ``F.interpolate`` + ``F.pad``
as the reference.
"""
from __future__ import annotations

import contextlib

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _registration  # noqa: F401  (fake kernels + autograd for the C++ ops)
from ._checks import check_adaptive_conv_args
from ._loader import NATIVE, BackendChoice, backend, cpu_isa, extension_loaded, has_kernel, warn_fallback
from .resize import bicubic_pad, bicubic_pad_conv_available, bicubic_pad_reference, check_bicubic_pad_args
from .reference import (adaptive_conv_grad_filters_reference, adaptive_conv_grad_input_reference,
                        adaptive_conv_reference, copy_with_bias)

__all__ = ["adaptive_conv", "adaptive_conv_into", "empty_output", "cpu_cache_bytes", "empty_cpu_cache", "set_torch_cpu_cache", "torch_cpu_cache_enabled", "torch_cpu_cache", "adaptive_conv_reference", "backend", "BackendChoice", "cpu_isa",
           "extension_loaded", "has_kernel", "adaptive_conv_grad_input_reference",
           "adaptive_conv_grad_filters_reference", "bicubic_pad", "bicubic_pad_conv", "bicubic_pad_conv_available", "jbu_stage_filters_available",
           "bicubic_pad_reference"]


def adaptive_conv(input: Tensor, filters: Tensor) -> Tensor:
    """Per-pixel k x k convolution (differentiable in both arguments).

    Args:
        input: ``Tensor[B, C, H + k - 1, W + k - 1]`` (pad it yourself, e.g. reflect by k // 2).
        filters: ``Tensor[B, H, W, k, k]`` with odd k; same dtype and device as ``input``.

    Returns:
        ``Tensor[B, C, H, W]``.

    Example:
        >>> x = torch.randn(2, 8, 20, 22)
        >>> f = torch.softmax(torch.randn(2, 14, 16, 49), -1).view(2, 14, 16, 7, 7)
        >>> adaptive_conv(x, f).shape
        torch.Size([2, 8, 14, 16])
    """
    check_adaptive_conv_args(input, filters)
    if NATIVE.get(input.device.type, False):
        return torch.ops.featup_adapters.adaptive_conv(input, filters)
    warn_fallback(input.device.type)
    return adaptive_conv_reference(input, filters)


def empty_output(like: Tensor, shape, *, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized ``Tensor[shape]`` on ``like``'s device (``like``'s dtype unless ``dtype``)
    for a result that a kernel writes in full, e.g. :func:`adaptive_conv_into`'s ``out``.

    On CPU with the compiled extension it comes, like the ops' own results, from the buffer
    cache of :func:`cpu_cache_bytes` (or with 2 MB pages asked for): torch hands out fresh
    memory for every large tensor, and first-touch faults cost a 77 MB result (C=384 at
    224x224) about half as much time as the convolution that writes it.  Elsewhere (CUDA, fake tensors,
    ``torch.compile`` traces, no extension) it is ``like.new_empty(shape, dtype=dtype)``.
    """
    from torch._subclasses.fake_tensor import is_fake

    dtype = like.dtype if dtype is None else dtype
    if (like.device.type == "cpu" and extension_loaded() and not torch.compiler.is_compiling()
            and not is_fake(like)):
        return torch.ops.featup_adapters._empty_large([int(n) for n in shape], dtype)
    return like.new_empty(tuple(shape), dtype=dtype)


@torch.compiler.disable
def cpu_cache_bytes() -> int:
    """Bytes the CPU ops' buffer cache holds now: large results (4 MiB and up) of this library's
    ops, freed and kept for the next op that asks for about that size, so that their pages are
    not faulted in afresh on every call (about 12 ms per 77 MB map on the development machine).
    At most ``FEATUP_CPU_CACHE_MB`` MiB (read at first use; default 1/16 of the physical memory,
    at most 1 GiB; ``0`` turns the cache off).  0 without the compiled extension."""
    return int(torch.ops.featup_adapters._cpu_cache_bytes()) if extension_loaded() else 0


@torch.compiler.disable
def empty_cpu_cache() -> None:
    """Free the buffers the CPU ops' cache holds (see :func:`cpu_cache_bytes`); the cache stays
    on.  Like ``torch.cuda.empty_cache``: tensors still in use are not affected.  Eager only (a
    ``torch.compile`` graph calls it outside the graph; a ``make_fx`` trace runs it once)."""
    if extension_loaded():
        torch.ops.featup_adapters._empty_cpu_cache()


@torch.compiler.disable
def set_torch_cpu_cache(enabled: bool = True) -> bool:
    """Serve torch's own large CPU tensors (4 MiB and up) from the buffer cache of
    :func:`cpu_cache_bytes` too, or stop; returns whether it was on before.

    Off by default: it replaces torch's CPU allocator for the whole process (smaller requests
    still go to the allocator it replaced, and switching off restores that allocator; tensors
    keep the deleter they were made with, so either way nothing is stranded).  Training wants
    it: a step makes the same large temporaries every time (autograd's zero-filled gradients of
    slices and grid samples, the kernel construction's products, the gradients themselves), and
    from torch's allocator each is fresh memory whose pages are faulted in again on every step.
    ``featup-adapters`` commands and :func:`featup_adapters.training.train_upsampler` turn it on
    for their own run.  The cache's limit (``FEATUP_CPU_CACHE_MB``) bounds only the idle buffers
    it keeps.  Without the compiled extension this does nothing and returns False.
    """
    if not extension_loaded():
        return False
    return bool(torch.ops.featup_adapters._set_torch_cpu_cache(bool(enabled)))


@torch.compiler.disable
def torch_cpu_cache_enabled() -> bool:
    """Whether torch's large CPU tensors come from the buffer cache (:func:`set_torch_cpu_cache`)."""
    return bool(torch.ops.featup_adapters._torch_cpu_cache_enabled()) if extension_loaded() else False


@contextlib.contextmanager
def torch_cpu_cache(enabled: bool = True):
    """``with torch_cpu_cache(): ...``: :func:`set_torch_cpu_cache` for the block, then back to
    what it was."""
    was = set_torch_cpu_cache(enabled)
    try:
        yield
    finally:
        set_torch_cpu_cache(was)


def adaptive_conv_into(input: Tensor, filters: Tensor, out: Tensor, bias: Tensor | None = None) -> Tensor:
    """``out[...] = adaptive_conv(input, filters) + bias.view(1, C, 1, 1)``, in place; returns ``out``.

    For inference (nothing here is differentiable): the row-band path of ``JBUStack`` writes each
    band straight into its rows of the full result.  On CPU an ``out`` whose rows are contiguous
    (``out.stride(-1) == 1``, ``out.stride(-2) == W``, planes at least ``H * W`` apart: e.g.
    ``full[:, :, a:b]`` of a contiguous ``full``) in float32 (float64 for float64 inputs) is
    written by the kernel itself, the bias added as it stores; any other ``out`` (another dtype
    or layout) gets the result copied in.

    Args:
        input, filters: as for :func:`adaptive_conv`.
        out: ``Tensor[B, C, H, W]``, any floating dtype, on the input's device.
        bias: ``Tensor[C]`` or None.
    """
    check_adaptive_conv_args(input, filters)
    B, H, W = filters.shape[:3]
    C = input.shape[1]
    if not isinstance(out, Tensor) or tuple(out.shape) != (B, C, H, W):
        got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"adaptive_conv_into: expected out of shape {[B, C, H, W]}, got {got}")
    if not out.dtype.is_floating_point or out.device != input.device:
        raise TypeError(f"adaptive_conv_into: expected a floating out on {input.device}, got "
                        f"{out.dtype} on {out.device}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != C or bias.device != input.device):
        raise ValueError(f"adaptive_conv_into: expected bias of shape [{C}] on {input.device}, got "
                         f"{list(bias.shape)} on {bias.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (input, filters, bias, out)):
        raise RuntimeError("adaptive_conv_into is not differentiable (it writes in place); use "
                           "adaptive_conv for autograd, or run it under torch.no_grad()")
    if NATIVE.get(input.device.type, False):
        torch.ops.featup_adapters.adaptive_conv_into(input, filters, bias, out)
        return out
    warn_fallback(input.device.type)
    copy_with_bias(out, adaptive_conv_reference(input, filters), bias)
    return out


def jbu_stage_filters_available() -> bool:
    """True where ``torch.ops.featup_adapters.jbu_stage_keys`` and ``jbu_stage_filters`` (one JBU
    stage's padded keys and filters in eval mode, each in one pass,
    ``csrc/cpu/stage_filters_cpu.cpp``) can serve CPU tensors: the compiled extension is loaded
    with their CPU kernels and the CPU backend is the native one.  ``upsamplers._kernel`` calls
    them when no gradient is needed."""
    return (NATIVE.get("cpu", False) and extension_loaded()
            and torch._C._dispatch_has_kernel_for_dispatch_key(
                "featup_adapters::jbu_stage_filters", "CPU"))


def bicubic_pad_conv(x: Tensor, filters: Tensor, size: Sequence[int], r: int,
                     bias: Tensor | None = None) -> Tensor:
    """``adaptive_conv(bicubic_pad(x, size, r), filters) + bias.view(1, C, 1, 1)`` for inference,
    in one op that never makes the padded map: on CPU the output is computed in bands of rows,
    each band's padded rows resized into a per-thread buffer and convolved from there
    (``csrc/cpu/resize_conv_cpu.cpp``).  Equal to the two ops up to float rounding.  Not
    differentiable (autograd refuses it where a gradient is needed); where
    :func:`bicubic_pad_conv_available` is False, the two ops are called, the bias added as the
    convolution stores its result (:func:`adaptive_conv_into`).

    Args:
        x: ``Tensor[B, C, h, w]``.
        filters: ``Tensor[B, H, W, k, k]`` with ``k = 2r + 1``, the dtype and device of ``x``.
        size: ``(H, W)``; r: the padding (reflect, replicate when ``min(H, W) <= r``).
        bias: ``Tensor[C]`` or None.
    """
    H, W = check_bicubic_pad_args(x, size, r)
    if bicubic_pad_conv_available(x):
        return torch.ops.featup_adapters.bicubic_pad_conv(x, filters, [H, W], r, bias)
    hr_pad = bicubic_pad(x, (H, W), r)
    if bias is None:
        return adaptive_conv(hr_pad, filters)
    out = empty_output(hr_pad, (x.shape[0], x.shape[1], H, W))
    return adaptive_conv_into(hr_pad, filters, out, bias.to(hr_pad.dtype))
