"""Pure PyTorch adaptive convolution: the test oracle and the fallback when the extension is absent.

It loops over the k*k taps and never materializes a ``[B, C, k*k, H, W]`` tensor: peak extra memory
is one output-sized buffer.  Half-precision inputs are computed in float32 and cast back, like the
kernels do.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_adaptive_conv_args


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def adaptive_conv_reference(input: Tensor, filters: Tensor) -> Tensor:
    """``out[b, c, y, x] = sum_{i, j} filters[b, y, x, i, j] * input[b, c, y + i, x + j]``.

    Args:
        input: ``Tensor[B, C, H + k - 1, W + k - 1]``.
        filters: ``Tensor[B, H, W, k, k]``, one k x k filter per output pixel.

    Returns:
        ``Tensor[B, C, H, W]`` in the dtype of ``input``. Differentiable in both arguments.
    """
    check_adaptive_conv_args(input, filters)
    B, C = input.shape[:2]
    _, H, W, k, _ = filters.shape
    acc = _acc_dtype(input.dtype)
    x = input.to(acc)
    f = filters.to(acc)
    out = x.new_zeros((B, C, H, W))
    for i in range(k):
        for j in range(k):
            # in place: one output buffer for all taps (autograd saves the factors, not `out`)
            out.addcmul_(f[:, None, :, :, i, j], x[:, :, i:i + H, j:j + W])
    return out.to(input.dtype)


def adaptive_conv_grad_input_reference(grad_out: Tensor, filters: Tensor) -> Tensor:
    """``grad_input[b, c, y + i, x + j] += grad_out[b, c, y, x] * filters[b, y, x, i, j]``."""
    B, C, H, W = grad_out.shape
    k = filters.shape[-1]
    acc = _acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    f = filters.to(acc)
    grad_in = g.new_zeros((B, C, H + k - 1, W + k - 1))
    for i in range(k):
        for j in range(k):
            grad_in[:, :, i:i + H, j:j + W] += f[:, None, :, :, i, j] * g
    return grad_in.to(grad_out.dtype)


def adaptive_conv_grad_filters_reference(grad_out: Tensor, input: Tensor) -> Tensor:
    """``grad_filters[b, y, x, i, j] = sum_c grad_out[b, c, y, x] * input[b, c, y + i, x + j]``."""
    B, C, H, W = grad_out.shape
    k = input.shape[-2] - H + 1
    acc = _acc_dtype(grad_out.dtype)
    g = grad_out.to(acc)
    x = input.to(acc)
    grad_f = g.new_empty((B, H, W, k, k))
    for i in range(k):
        for j in range(k):
            grad_f[:, :, :, i, j] = (g * x[:, :, i:i + H, j:j + W]).sum(1)
    return grad_f.to(grad_out.dtype)


def copy_with_bias(out: Tensor, result: Tensor, bias: Tensor | None) -> None:
    """``out[...] = result + bias.view(1, C, 1, 1)``: ``adaptive_conv_into`` composed from a
    functional result (the reference, and the CUDA kernel, which has no in-place variant)."""
    out.copy_(result if bias is None else result + bias.to(result.dtype).view(1, -1, 1, 1))
