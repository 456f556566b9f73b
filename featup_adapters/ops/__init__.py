"""The adaptive convolution, the op behind joint bilateral upsampling.

``adaptive_conv(input, filters)`` applies one k x k filter per output pixel::

    out[b, c, y, x] = sum_{i, j < k} filters[b, y, x, i, j] * input[b, c, y + i, x + j]

Backends per device, in priority order: the compiled CUDA kernel, the compiled CPU kernel
(OpenMP, vectorized, ISA chosen at run time), the pure PyTorch reference.  ``backend()`` says
which one serves each device and why the others do not; a fallback to the reference warns once.

``bicubic_pad(x, (H, W), r)`` (``resize.py``) is the bicubic resize + reflect pad JBU feeds the
convolution with: a compiled CPU kernel, torch's own kernels on CUDA, ``F.interpolate`` + ``F.pad``
as the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _registration  # noqa: F401  (fake kernels + autograd for the C++ ops)
from ._checks import check_adaptive_conv_args
from ._loader import NATIVE, BackendChoice, backend, cpu_isa, extension_loaded, has_kernel, warn_fallback
from .resize import bicubic_pad, bicubic_pad_reference
from .reference import (adaptive_conv_grad_filters_reference, adaptive_conv_grad_input_reference,
                        adaptive_conv_reference)

__all__ = ["adaptive_conv", "adaptive_conv_reference", "backend", "BackendChoice", "cpu_isa",
           "extension_loaded", "has_kernel", "adaptive_conv_grad_input_reference",
           "adaptive_conv_grad_filters_reference", "bicubic_pad", "bicubic_pad_reference"]


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
