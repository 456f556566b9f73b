"""The CUDA kernels of the C++-declared ``bicubic_pad`` ops: torch's own ``upsample_bicubic2d``
and padding, forward and backward (registered for the CUDA key in ``_registration``).
"""
from __future__ import annotations

import torch

from .resize import bicubic_pad_reference, bicubic_pad_rows_reference, pad_mode


def padded_sizes(grad_out, r):
    """(H, W) of the output before padding, from ``grad_out: Tensor[B, C, H + 2r, W + 2r]``."""
    return grad_out.shape[-2] - 2 * r, grad_out.shape[-1] - 2 * r


def cuda_bicubic_pad(x, size, pad):
    """The CUDA kernel of ``bicubic_pad``: ``F.interpolate`` + ``F.pad`` (any device works)."""
    return bicubic_pad_reference(x, size, pad)


def cuda_bicubic_pad_backward(grad_out, input_size, pad):
    """The CUDA kernel of ``bicubic_pad_backward``: torch's backward kernels of the two steps."""
    B, C = grad_out.shape[:2]
    H, W = padded_sizes(grad_out, pad)
    acc = torch.float32 if grad_out.dtype in (torch.float16, torch.bfloat16) else grad_out.dtype
    g = grad_out.to(acc)
    if pad > 0:
        like = g.new_empty((B, C, H, W))
        backward = (torch.ops.aten.reflection_pad2d_backward if pad_mode(H, W, pad) == "reflect"
                    else torch.ops.aten.replication_pad2d_backward)
        g = backward(g, like, [pad, pad, pad, pad])
    g = torch.ops.aten.upsample_bicubic2d_backward(g, [H, W], [B, C, *input_size], False)
    return g.to(grad_out.dtype)


def cuda_bicubic_pad_rows(x, size, pad, src_rows, src_row0, row0, row1):
    """The CUDA kernel of ``bicubic_pad_rows``: the PyTorch gathers of the reference."""
    return bicubic_pad_rows_reference(x, size, pad, src_rows, src_row0, row0, row1)
