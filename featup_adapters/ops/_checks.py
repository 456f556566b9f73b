"""Argument checks shared by every adaptive-convolution backend (the C++ side mirrors them)."""
from __future__ import annotations

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# Largest filter size k (k x k taps) the compiled kernels take (csrc/checks.h: ``k <= 15``); the
# upsamplers check their radius against it when they are built.
MAX_KERNEL_SIZE = 15


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_adaptive_conv_args(input: Tensor, filters: Tensor) -> None:
    """Raise a ValueError/TypeError that names expected and received shapes, dtypes or devices."""
    if not isinstance(input, Tensor) or not isinstance(filters, Tensor):
        raise TypeError(f"adaptive_conv: expected tensors, got input={type(input).__name__}, "
                        f"filters={type(filters).__name__}")
    if input.dim() != 4:
        raise ValueError(f"adaptive_conv: expected input of shape [B, C, H+k-1, W+k-1] (4-D), "
                         f"got {input.dim()}-D tensor of shape {_shape(input)}")
    if filters.dim() != 5:
        raise ValueError(f"adaptive_conv: expected filters of shape [B, H, W, k, k] (5-D), "
                         f"got {filters.dim()}-D tensor of shape {_shape(filters)}")
    if input.device != filters.device:
        raise ValueError(f"adaptive_conv: input and filters must be on the same device, got "
                         f"input on {input.device} and filters on {filters.device}")
    if input.dtype != filters.dtype:
        raise TypeError(f"adaptive_conv: input and filters must have the same dtype, got "
                        f"input {input.dtype} and filters {filters.dtype}")
    if input.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"adaptive_conv: expected a floating dtype in "
                        f"{[str(d) for d in SUPPORTED_DTYPES]}, got {input.dtype}")
    B, H, W, kh, kw = filters.shape
    if kh != kw:
        raise ValueError(f"adaptive_conv: expected square filters [B, H, W, k, k], got "
                         f"{kh}x{kw} filters (shape {_shape(filters)})")
    if kh % 2 != 1:
        raise ValueError(f"adaptive_conv: expected an odd filter size k, got k={kh} "
                         f"(filters of shape {_shape(filters)})")
    if input.shape[0] != B:
        raise ValueError(f"adaptive_conv: batch mismatch, input has B={input.shape[0]} "
                         f"(shape {_shape(input)}) but filters have B={B} (shape {_shape(filters)})")
    exp_h, exp_w = H + kh - 1, W + kw - 1
    if input.shape[2] != exp_h or input.shape[3] != exp_w:
        raise ValueError(f"adaptive_conv: expected input of spatial size H+k-1 x W+k-1 = "
                         f"{exp_h}x{exp_w} for filters of shape {_shape(filters)} (H={H}, W={W}, "
                         f"k={kh}), got input of shape {_shape(input)}")
