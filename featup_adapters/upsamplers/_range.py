"""The range-kernel logits of a JBU stage, without unfolding.

``logits[b, y, x, i * k + j] = <q_pad[b, :, y + i, x + j], q[b, :, y, x]>`` for a key map ``q`` of
shape ``[B, K, H, W]`` reflect-padded by ``r`` into ``q_pad`` (``k = 2r + 1``).  This is exactly the
adaptive-convolution filter gradient ``adaptive_conv_grad_filters(q, q_pad)``, so the compiled op
computes it when it is there.  Otherwise a loop over the ``k * k`` offsets does it on a
channels-last copy of ``q_pad`` flattened over (rows, padded columns): every offset is then one
contiguous slice, and the extra memory is one ``[B, H, W + 2r, K]`` product at a time instead of
FeatUp's ``[B, K, k * k, H, W]`` unfold.  Its backward is written out (two slice accumulations
per offset into one buffer) rather than left to autograd, which would allocate a full-size zero
gradient for every one of the 49 slices.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._resize import pad2d


def _offsets(k: int, wp: int) -> list[int]:
    return [i * wp + j for i in range(k) for j in range(k)]


class _RangeLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_pad: Tensor, radius: int, out_hw: tuple[int, int]) -> Tensor:
        B, K, hp, wp = q_pad.shape
        H, W = out_hw
        k = 2 * radius + 1
        L = (H - 1) * wp + W                    # span from the first to the last centre pixel
        flat = q_pad.permute(0, 2, 3, 1).reshape(B, hp * wp, K)   # one channels-last copy
        c0 = radius * wp + radius
        centre = flat[:, c0:c0 + L]
        out = flat.new_empty((B, k * k, H * wp))
        out[:, :, L:] = 0
        for t, off in enumerate(_offsets(k, wp)):
            torch.sum(flat[:, off:off + L] * centre, dim=-1, out=out[:, t, :L])
        ctx.save_for_backward(flat)
        ctx.geom = (radius, B, K, hp, wp, H, W)
        return out.view(B, k * k, H, wp)[..., :W]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (flat,) = ctx.saved_tensors
        radius, B, K, hp, wp, H, W = ctx.geom
        k = 2 * radius + 1
        L = (H - 1) * wp + W
        c0 = radius * wp + radius
        g = flat.new_zeros((B, k * k, H, wp))
        g[..., :W] = grad
        g = g.view(B, k * k, H * wp)[:, :, :L]
        centre = flat[:, c0:c0 + L]
        d_flat = torch.zeros_like(flat)
        d_centre = torch.zeros_like(centre)
        for t, off in enumerate(_offsets(k, wp)):
            gt = g[:, t, :, None]
            d_flat[:, off:off + L].addcmul_(gt, centre)      # d/d neighbour
            d_centre.addcmul_(gt, flat[:, off:off + L])       # d/d centre
        d_flat[:, c0:c0 + L] += d_centre
        return d_flat.view(B, hp, wp, K).permute(0, 3, 1, 2), None, None


def _native(device: torch.device) -> bool:
    from ..ops import _loader
    return bool(_loader.NATIVE.get(device.type, False))


def range_logits(q: Tensor, radius: int) -> Tensor:
    """``Tensor[B, K, H, W]`` keys -> ``Tensor[B, H, W, k*k]``: for each pixel, the dot products with
    its reflect-padded ``k x k`` neighbourhood (row offset first, like ``nn.Unfold``), computed in
    float32 (float64 stays float64)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return range_logits_padded(pad2d(q.to(acc), radius), radius)


def range_logits_padded(q_pad: Tensor, radius: int) -> Tensor:
    """``range_logits`` from keys that are already padded: ``Tensor[B, K, H + 2r, W + 2r]`` ->
    ``Tensor[B, H, W, k*k]``, the centre being ``q_pad[..., r:-r, r:-r]``.  A row band of a larger
    map passes its real neighbour rows as the padding (the tiled path)."""
    acc = torch.float64 if q_pad.dtype == torch.float64 else torch.float32
    q_pad = q_pad.to(acc)
    B, K, hp, wp = q_pad.shape
    H, W = hp - 2 * radius, wp - 2 * radius
    k = 2 * radius + 1
    if _native(q_pad.device):
        q = q_pad[:, :, radius:radius + H, radius:radius + W]
        out = torch.ops.featup_adapters.adaptive_conv_grad_filters(q.contiguous(),
                                                                   q_pad.contiguous())
        return out.reshape(B, H, W, k * k)
    return _RangeLogits.apply(q_pad, radius, (H, W)).permute(0, 2, 3, 1)
