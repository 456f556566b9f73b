"""Fake (meta) kernels and autograd for the C++-declared ops.

The schemas are declared once in ``csrc/ops.cpp`` with TORCH_LIBRARY; the C++ side points here
with ``set_python_module`` so the fake kernels are found even if this module was not imported.

Forward:      out    = adaptive_conv(input, filters)
              adaptive_conv_into(input, filters, bias, out)  the same (+ bias[c]) written into
                       ``out`` (inference only: no autograd), e.g. a band of a larger result
Backward:     g_in   = adaptive_conv_grad_input(grad_out, filters)
              g_filt = adaptive_conv_grad_filters(grad_out, input)
All three are bilinear, so each backward is again made of these three ops (double backward works).

Resize:       out    = bicubic_pad(x, (H, W), r)            [B, C, h, w] -> [B, C, H+2r, W+2r]
              g_x    = bicubic_pad_backward(g, (h, w), r)   its transpose, again linear; the
                       transpose of the backward is the forward, so double backward works. On
                       CUDA both run torch's own kernels (``_resize_cuda``).

JBU stage:    q_pad  = jbu_stage_keys(guidance, w1, b1, w2, b2, r)
                       [B, G, H, W] -> [B, K, H+2r, W+2r]: range_proj, padded as ``pad2d``;
              filt   = jbu_stage_filters(q_pad, guidance, temp, log_s, w0, b0, w3, b3, r)
                       [B, K, H+2r, W+2r], [B, G, H, W] -> [B, H, W, (2r+1)^2]: one stage's
                       filters in eval mode (CPU only, inference only: no derivative).
"""
from __future__ import annotations

import torch

from ._checks import check_adaptive_conv_args
from . import _resize_cuda
from ._loader import extension_loaded
from ._resize_cuda import padded_sizes
from .reference import copy_with_bias

ops = torch.ops.featup_adapters if extension_loaded() else None


def _register() -> None:
    lib = "featup_adapters::"

    @torch.library.register_fake(lib + "adaptive_conv")
    def _fake_forward(input, filters):
        check_adaptive_conv_args(input, filters)
        B, H, W = filters.shape[:3]
        return input.new_empty((B, input.shape[1], H, W))

    @torch.library.register_fake(lib + "adaptive_conv_grad_input")
    def _fake_grad_input(grad_out, filters):
        B, C, H, W = grad_out.shape
        k = filters.shape[-1]
        return grad_out.new_empty((B, C, H + k - 1, W + k - 1))

    @torch.library.register_fake(lib + "adaptive_conv_grad_filters")
    def _fake_grad_filters(grad_out, input):
        B, C, H, W = grad_out.shape
        k = input.shape[-2] - H + 1
        return grad_out.new_empty((B, H, W, k, k))

    @torch.library.register_fake(lib + "adaptive_conv_into")
    def _fake_forward_into(input, filters, bias, out):
        check_adaptive_conv_args(input, filters)
        return None

    def _cuda_forward_into(input, filters, bias, out):
        copy_with_bias(out, ops.adaptive_conv(input, filters), bias)

    torch.library.register_kernel(lib + "adaptive_conv_into", "cuda", _cuda_forward_into)

    # d out = conv(d input, f) + conv(input, d f)
    def _setup_fwd(ctx, inputs, output):
        input, filters = inputs
        ctx.save_for_backward(input, filters)

    def _bwd_fwd(ctx, grad):
        input, filters = ctx.saved_tensors
        grad = grad.contiguous()
        g_in = ops.adaptive_conv_grad_input(grad, filters) if ctx.needs_input_grad[0] else None
        g_f = ops.adaptive_conv_grad_filters(grad, input) if ctx.needs_input_grad[1] else None
        return g_in, g_f

    torch.library.register_autograd(lib + "adaptive_conv", _bwd_fwd, setup_context=_setup_fwd)

    # grad_input(g, f) is linear in g (adjoint: conv(., f)) and in f (adjoint: grad_filters(g, .)).
    def _setup_gi(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _bwd_gi(ctx, grad):
        g, f = ctx.saved_tensors
        d_g = ops.adaptive_conv(grad, f) if ctx.needs_input_grad[0] else None
        d_f = ops.adaptive_conv_grad_filters(g, grad) if ctx.needs_input_grad[1] else None
        return d_g, d_f

    torch.library.register_autograd(lib + "adaptive_conv_grad_input", _bwd_gi,
                                    setup_context=_setup_gi)

    # grad_filters(g, x): adjoint in g is conv(x, .), adjoint in x is grad_input(g, .).
    def _bwd_gf(ctx, grad):
        g, x = ctx.saved_tensors
        d_g = ops.adaptive_conv(x, grad) if ctx.needs_input_grad[0] else None
        d_x = ops.adaptive_conv_grad_input(g, grad) if ctx.needs_input_grad[1] else None
        return d_g, d_x

    torch.library.register_autograd(lib + "adaptive_conv_grad_filters", _bwd_gf,
                                    setup_context=_setup_gi)


def _register_resize() -> None:
    lib = "featup_adapters::"

    @torch.library.register_fake(lib + "bicubic_pad")
    def _fake(x, size, pad):
        torch._check(x.dim() == 4, lambda: f"bicubic_pad: expected a 4-D input, got {x.dim()}-D")
        return x.new_empty((x.shape[0], x.shape[1], size[0] + 2 * pad, size[1] + 2 * pad))

    @torch.library.register_fake(lib + "bicubic_pad_backward")
    def _fake_backward(grad_out, input_size, pad):
        return grad_out.new_empty((grad_out.shape[0], grad_out.shape[1], *input_size))

    torch.library.register_kernel(lib + "bicubic_pad", "cuda", _resize_cuda.cuda_bicubic_pad)
    torch.library.register_kernel(lib + "bicubic_pad_backward", "cuda", _resize_cuda.cuda_bicubic_pad_backward)

    def _setup(ctx, inputs, output):
        x, _, pad = inputs
        ctx.input_size = list(x.shape[-2:])
        ctx.pad = pad

    def _backward(ctx, grad):
        return ops.bicubic_pad_backward(grad.contiguous(), ctx.input_size, ctx.pad), None, None

    torch.library.register_autograd(lib + "bicubic_pad", _backward, setup_context=_setup)

    def _setup_bwd(ctx, inputs, output):
        grad_out, _, pad = inputs
        ctx.size = list(padded_sizes(grad_out, pad))
        ctx.pad = pad

    def _backward_bwd(ctx, grad):
        return ops.bicubic_pad(grad.contiguous(), ctx.size, ctx.pad), None, None

    torch.library.register_autograd(lib + "bicubic_pad_backward", _backward_bwd,
                                    setup_context=_setup_bwd)

    @torch.library.register_fake(lib + "bicubic_pad_rows")
    def _fake_rows(x, size, pad, src_rows, src_row0, row0, row1):
        torch._check(x.dim() == 4, lambda: f"bicubic_pad_rows: expected a 4-D input, got {x.dim()}-D")
        return x.new_empty((x.shape[0], x.shape[1], row1 - row0, size[1] + 2 * pad))

    torch.library.register_kernel(lib + "bicubic_pad_rows", "cuda", _resize_cuda.cuda_bicubic_pad_rows)

    def _setup_rows(ctx, inputs, output):
        pass

    def _backward_rows(ctx, grad):
        raise RuntimeError("bicubic_pad_rows has no backward (it serves JBUStack's row-band inference "
                           "path); use bicubic_pad for a differentiable resize")

    torch.library.register_autograd(lib + "bicubic_pad_rows", _backward_rows, setup_context=_setup_rows)

    @torch.library.register_fake(lib + "bicubic_pad_conv")
    def _fake_pad_conv(source, filters, size, pad, bias):
        torch._check(source.dim() == 4, lambda: f"bicubic_pad_conv: expected a 4-D source, got {source.dim()}-D")
        return source.new_empty((source.shape[0], source.shape[1], size[0], size[1]))

    def _cuda_pad_conv(source, filters, size, pad, bias):   # the two ops, each a CUDA kernel
        out = ops.adaptive_conv(ops.bicubic_pad(source, size, pad), filters)
        return out if bias is None else out.add_(bias.to(out.dtype).view(1, -1, 1, 1))

    torch.library.register_kernel(lib + "bicubic_pad_conv", "cuda", _cuda_pad_conv)

    @torch.library.register_fake(lib + "jbu_stage_keys")
    def _fake_stage_keys(guidance, w1, b1, w2, b2, radius):
        torch._check(guidance.dim() == 4, lambda: f"jbu_stage_keys: expected a 4-D guidance, got {guidance.dim()}-D")
        B, _, H, W = guidance.shape
        return guidance.new_empty((B, w1.shape[0], H + 2 * radius, W + 2 * radius))

    @torch.library.register_fake(lib + "jbu_stage_filters")
    def _fake_stage_filters(q_pad, guidance, temp, log_s, w0, b0, w3, b3, radius):
        torch._check(q_pad.dim() == 4, lambda: f"jbu_stage_filters: expected a 4-D q_pad, got {q_pad.dim()}-D")
        B, _, hp, wp = q_pad.shape
        k = 2 * radius + 1
        return q_pad.new_empty((B, hp - 2 * radius, wp - 2 * radius, k * k))

    torch.library.register_kernel(lib + "jbu_stage_keys", "cuda", _cuda_stage_keys)
    torch.library.register_kernel(lib + "jbu_stage_filters", "cuda", _cuda_stage_filters)


# CUDA: the same steps as torch ops (and our adaptive_conv_grad_filters kernel for the logits)
def _cuda_stage_keys(guidance, w1, b1, w2, b2, radius):
    import torch.nn.functional as F
    from .resize import pad2d

    h = F.gelu(F.conv2d(guidance, w1[:, :, None, None], b1))
    return pad2d(F.conv2d(h, w2[:, :, None, None], b2), radius).contiguous()


def _cuda_stage_filters(q_pad, guidance, temp, log_s, w0, b0, w3, b3, radius):
    import torch.nn.functional as F

    B, _, hp, wp = q_pad.shape
    H, W, k2 = hp - 2 * radius, wp - 2 * radius, (2 * radius + 1) ** 2
    q = q_pad[:, :, radius:radius + H, radius:radius + W].contiguous()
    logits = ops.adaptive_conv_grad_filters(q, q_pad.contiguous()).reshape(B, H, W, k2)
    kern = torch.softmax(logits * temp + log_s, dim=-1)
    h = F.gelu(F.linear(torch.cat([kern, guidance.permute(0, 2, 3, 1)], -1), w0, b0))
    return (kern + 0.1 * F.linear(h, w3, b3)).contiguous()


if extension_loaded():
    _register()
    _register_resize()
