"""The per-pixel JBU kernel of one stage, built channels-last with few full-size temporaries.

Spec section 2, steps 1-4, for ``logits: Tensor[B, H, W, k*k]`` (``_range.range_logits``)::

    range  = softmax_n(t * logits),   t = clamp(exp(range_temp), 1e-4, 1e4)
    kernel = range * s / max(sum_n range * s, 1e-7),   s_n = exp(-|n|^2 / (2 sigma^2))
    kernel = kernel + 0.1 * fixup_proj(cat([kernel, guidance]))

How it is computed here (each equal to the formula up to float rounding):

* ``range * s / sum(range * s)`` is ``softmax_n(t * logits + log s)``: the softmax's own
  denominator cancels.  With ``log s_n = -|n|^2 / (2 sigma^2)`` and ``|n|^2 <= 2`` on the
  ``[-1, 1]`` grid, ``sum_n range * s >= min_n s_n = exp(-1 / sigma^2)``, so the 1e-7 clamp can only
  act when ``sigma < 0.25``; only then is the three-step form used.  One softmax replaces a softmax,
  a product, a sum and a division (four full-size tensors), and without autograd it runs in place
  on the logits.
* FeatUp's ``fixup_proj`` (``Conv2d(k*k + G, k*k, 1), GELU, Dropout2d, Conv2d(k*k, k*k, 1)``, no
  hooks) runs as matrix products on the channels-last kernel with the first weight split into its
  kernel part and guidance part, so ``cat([kernel, guidance])`` is never made; the ``0.1`` and the
  bias go into the last product and the kernel is added to its result in place.  Any other
  ``fixup_proj`` (hooked, replaced) is called as a module on the concatenation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._range import range_logits_padded
from ._resize import pad2d

SIGMA_MIN_FOR_SOFTMAX = 0.25   # exp(-1 / 0.25^2) = 1.1e-7 > 1e-7: the clamp cannot act above it


def spatial_dist2(radius: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``Tensor[k*k]``: ``dx^2 + dy^2`` on a ``linspace(-1, 1, k)`` grid, row-major (dy indexes kernel
    rows, dx columns)."""
    d = torch.linspace(-1, 1, 2 * radius + 1, device=device, dtype=dtype)
    return (d[:, None] ** 2 + d[None, :] ** 2).reshape(-1)


def range_temperature(range_temp, *, device, dtype) -> Tensor:
    """``clamp(exp(range_temp), 1e-4, 1e4)`` as a 0-d tensor of ``dtype``."""
    return torch.as_tensor(range_temp, device=device).to(dtype).exp().clamp(1e-4, 1e4)


def _readable(t: Tensor) -> bool:
    """False where a tensor's value cannot be read on the host: a fake tensor (``FakeTensorMode``,
    ``make_fx``, export) or a trace under ``torch.compile``."""
    from torch._subclasses.fake_tensor import is_fake

    return not (torch.compiler.is_compiling() or is_fake(t))


def _traced_kernel(logits: Tensor, temp: Tensor, sigma: Tensor, dist2: Tensor) -> Tensor:
    """``normalized_kernel`` without reading ``sigma`` on the host (no branch on its value)::

        range * s / max(S, 1e-7) = softmax_n(z + log s) * min(1, S / 1e-7),
        S = sum_n range * s = exp(logsumexp(z + log s) - logsumexp(z)),  z = t * logits

    (the factor is exactly 1 whenever ``sigma >= SIGMA_MIN_FOR_SOFTMAX``)."""
    z = logits * temp
    z2 = z + dist2 * (-0.5 / sigma ** 2)
    log_S = torch.logsumexp(z2, -1, keepdim=True) - torch.logsumexp(z, -1, keepdim=True)
    return torch.softmax(z2, dim=-1) * (log_S.exp() * 1e7).clamp(max=1.0)


def normalized_kernel(logits: Tensor, range_temp, sigma_spatial, radius: int) -> Tensor:
    """``Tensor[B, H, W, k*k]`` logits -> the normalized range x spatial kernel, same shape/dtype.

    Without autograd (or when nothing needs a gradient) the logits buffer is overwritten.
    """
    dtype, device = logits.dtype, logits.device
    temp = range_temperature(range_temp, device=device, dtype=dtype)
    sigma = torch.as_tensor(sigma_spatial, device=device).to(dtype)
    dist2 = spatial_dist2(radius, device=device, dtype=dtype)
    grad = torch.is_grad_enabled() and (logits.requires_grad or temp.requires_grad
                                        or sigma.requires_grad)
    if not _readable(sigma):
        return _traced_kernel(logits, temp, sigma, dist2)
    if float(sigma.detach().abs()) >= SIGMA_MIN_FOR_SOFTMAX:
        log_s = dist2 * (-0.5 / sigma ** 2)
        if not grad:
            z = logits.mul_(temp).add_(log_s)
            z.sub_(z.amax(-1, keepdim=True)).exp_()
            return z.div_(z.sum(-1, keepdim=True))
        z = logits * temp
        return torch.softmax(z.add_(log_s), dim=-1)       # z is not saved by the product
    # tiny sigma: the clamp may act, so follow the formula step by step
    rng = torch.softmax(temp * logits, dim=-1)
    kern = rng * torch.exp(-dist2 / (2 * sigma ** 2))
    return kern / kern.sum(-1, keepdim=True).clamp(min=1e-7)


def _no_hooks(*mods) -> bool:
    return not (any(m._forward_hooks or m._forward_pre_hooks for m in mods)
                or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def _conv1x1(c, cin: int, cout: int | None = None) -> bool:
    return (type(c) is nn.Conv2d and c.kernel_size == (1, 1) and c.stride == (1, 1)
            and c.groups == 1 and c.dilation == (1, 1) and c.padding in ((0, 0), "valid")
            and c.padding_mode == "zeros" and c.in_channels == cin
            and (cout is None or c.out_channels == cout))


def _is_featup_range_proj(proj, g: int) -> bool:
    """FeatUp's ``Sequential(Conv2d(G, K, 1), GELU, Dropout2d, Conv2d(K, K, 1))``, no hooks."""
    if type(proj) is not nn.Sequential or len(proj) != 4:
        return False
    c0, act, drop, c3 = proj
    return (_conv1x1(c0, g) and _conv1x1(c3, c0.out_channels, c0.out_channels)
            and type(act) is nn.GELU and act.approximate == "none"
            and type(drop) in (nn.Dropout2d, nn.Identity) and _no_hooks(proj, c0, act, drop, c3))


def conv1x1_as_matmul(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(x, weight, bias)`` for a 1x1 ``weight`` as one batched matrix product on the
    ``[B, C, H*W]`` view (no convolution primitive to build on the first call of each shape)."""
    B, C, H, W = x.shape
    # bmm with the weight expanded (a view): torch.matmul(2-D, 3-D) takes a transposed route
    # with a full-size copy of the result (about 3x slower at 32 x 224^2)
    w = weight[:, :, 0, 0].to(x.dtype) if weight.dtype != x.dtype else weight[:, :, 0, 0]
    out = torch.bmm(w.expand(B, -1, -1), x.reshape(B, C, H * W))
    if bias is not None:
        out = out.add_(bias[:, None]) if not torch.is_grad_enabled() else out + bias[:, None]
    return out.view(B, -1, H, W)


def _inference_cpu(guidance: Tensor, *params) -> bool:
    """The compiled one-pass stage ops can serve: CPU, the ops there, float32/float64 with every
    parameter in that dtype, no autocast, and no gradient needed."""
    from ..ops import jbu_stage_filters_available

    dtype = guidance.dtype
    if not (guidance.device.type == "cpu" and dtype in (torch.float32, torch.float64)
            and jbu_stage_filters_available() and not torch.is_autocast_enabled("cpu")):
        return False
    if any(t is not None and t.dtype != dtype for t in params):
        return False
    return not (torch.is_grad_enabled()
                and any(t is not None and t.requires_grad for t in (guidance, *params)))


def padded_keys(range_proj, guidance: Tensor, radius: int, acc: torch.dtype | None = None) -> Tensor:
    """``pad2d(range_proj(guidance).to(acc), radius)``: FeatUp's layout in eval mode and without
    autograd in one pass (the ``jbu_stage_keys`` op), anything else as ``project_keys`` then
    ``pad2d``.  ``acc``: the keys' dtype (default the guidance's)."""
    acc = acc or guidance.dtype
    if (acc == guidance.dtype and _is_featup_range_proj(range_proj, guidance.shape[1])
            and _dropout_off(range_proj[2])):
        c0, c3 = range_proj[0], range_proj[3]
        if _inference_cpu(guidance, c0.weight, c0.bias, c3.weight, c3.bias):
            return torch.ops.featup_adapters.jbu_stage_keys(
                guidance, c0.weight[:, :, 0, 0], c0.bias, c3.weight[:, :, 0, 0], c3.bias, radius)
    q = project_keys(range_proj, guidance)
    if q.dim() != 4 or q.shape[0] != guidance.shape[0] or q.shape[-2:] != guidance.shape[-2:]:
        raise ValueError(f"jbu: range_proj must map [B, G, H, W] to [B, K, H, W]; got "
                         f"{list(q.shape)} for guidance {list(guidance.shape)}")
    return pad2d(q.to(acc), radius)


def project_keys(range_proj, guidance: Tensor) -> Tensor:
    """``range_proj(guidance)``; FeatUp's layout runs as matrix products (same result up to float
    rounding, same dropout draws), anything else (hooked, replaced) as the module."""
    if not _is_featup_range_proj(range_proj, guidance.shape[1]):
        return range_proj(guidance)
    c0, act, drop, c3 = range_proj
    h = act(conv1x1_as_matmul(guidance, c0.weight, c0.bias))
    return conv1x1_as_matmul(drop(h), c3.weight, c3.bias)


def _is_featup_fixup(fixup, k2: int, g: int) -> bool:
    """FeatUp's ``Sequential(Conv2d(k2 + G, k2, 1), GELU, Dropout2d, Conv2d(k2, k2, 1))`` with no
    hooks anywhere (then the split-weight matrix products compute it)."""
    if type(fixup) is not nn.Sequential or len(fixup) != 4:
        return False
    c0, act, drop, c3 = fixup
    return (_conv1x1(c0, k2 + g, k2) and _conv1x1(c3, k2, k2)
            and type(act) is nn.GELU and act.approximate == "none"
            and type(drop) in (nn.Dropout2d, nn.Identity) and _no_hooks(fixup, c0, act, drop, c3))


def fixup_kernel(kernel: Tensor, guidance: Tensor, fixup_proj, *, inplace: bool = False) -> Tensor:
    """``kernel + 0.1 * fixup_proj(cat([kernel, guidance]))`` on channels-last tensors.

    Args:
        kernel: ``Tensor[B, H, W, k*k]`` (float32 or float64).
        guidance: ``Tensor[B, G, H, W]`` (any layout).
        fixup_proj: a callable ``[B, k*k + G, H, W] -> [B, k*k, H, W]``.
        inplace: the caller gives up ``kernel``: without autograd, FeatUp's layout then writes
            the result into its buffer.

    Returns:
        ``Tensor[B, H, W, k*k]`` in the dtype of ``kernel`` (``kernel`` itself when ``inplace``
        applied; otherwise a new tensor).
    """
    B, H, W, k2 = kernel.shape
    G = guidance.shape[1]
    acc = kernel.dtype
    g_last = guidance.permute(0, 2, 3, 1)                       # [B, H, W, G] (a view)
    if not _is_featup_fixup(fixup_proj, k2, G):
        fix_in = torch.cat([kernel.to(guidance.dtype), g_last], dim=-1)
        fix = fixup_proj(fix_in.permute(0, 3, 1, 2))           # a channels_last [B, k2+G, H, W]
        if tuple(fix.shape) != (B, k2, H, W):
            raise ValueError(f"jbu: fixup_proj must map [B, {k2} + G, H, W] to "
                             f"[B, {k2}, H, W]; got {list(fix.shape)}")
        return kernel + 0.1 * fix.permute(0, 2, 3, 1).to(acc)
    c0, _, drop, c3 = fixup_proj
    w0 = c0.weight[:, :, 0, 0]                                  # [k2, k2 + G]
    w3 = c3.weight[:, :, 0, 0]
    dt = w0.dtype
    n = B * H * W
    k_flat = kernel.reshape(n, k2).to(dt)
    g_flat = g_last.reshape(n, G).to(dt)
    # h = kernel @ w0[:, :k2]^T + guidance @ w0[:, k2:]^T + b0
    h = g_flat @ w0[:, k2:].t()
    if c0.bias is not None:
        h = h.add_(c0.bias) if not torch.is_grad_enabled() else h + c0.bias
    if h.dtype == k_flat.dtype:             # (autocast may have made h 16-bit)
        h = h.addmm_(k_flat, w0[:, :k2].t())    # in place: no copy of h (mm saves inputs only)
    else:
        h = torch.addmm(h, k_flat, w0[:, :k2].t())
    h = F.gelu(h)
    if drop.training and isinstance(drop, nn.Dropout2d) and drop.p > 0:
        h = drop(h.view(B, H, W, k2).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).reshape(n, k2)
    if (inplace and not torch.is_grad_enabled() and kernel.is_contiguous()
            and w3.dtype == acc and h.dtype == acc):
        # kernel + 0.1 (h w3^T + b3) into the kernel's buffer: no full-size broadcast copy of the
        # bias, no separate sum
        k_view = kernel.view(n, k2)
        if c3.bias is not None:
            k_view.add_(0.1 * c3.bias)
        return k_view.addmm_(h, w3.t(), alpha=0.1).view(B, H, W, k2)
    if c3.bias is not None:
        fix = torch.addmm(c3.bias.expand(n, k2), h, w3.t(), beta=0.1, alpha=0.1)
    else:
        fix = torch.mm(h, w3.t()).mul_(0.1)
    if fix.dtype != acc:
        return kernel + fix.view(B, H, W, k2).to(acc)
    # in place on addmm's own output (not saved for its backward) before it is viewed: an
    # in-place op on a view would make autograd replay the view in the backward (CopySlices +
    # AsStrided, about 14 ms at 224^2)
    return fix.add_(kernel.reshape(n, k2)).view(B, H, W, k2)


def _dropout_off(drop) -> bool:
    return type(drop) is nn.Identity or not drop.training or drop.p == 0


def _fused_stage_kernel(q_pad: Tensor, guidance: Tensor, range_temp, fixup_proj, sigma_spatial,
                        radius: int) -> Tensor | None:
    """The compiled one-pass ``jbu_stage_filters`` op where it gives this stage's result (up to
    float rounding): CPU, no gradient needed, FeatUp's fixup layout with its dropout off, weights
    in the keys' float32/float64 dtype, no autocast, the spatial width readable and at least
    ``SIGMA_MIN_FOR_SOFTMAX``.  None otherwise (the caller builds the kernel step by step)."""
    k2, G = (2 * radius + 1) ** 2, guidance.shape[1]
    if not (_is_featup_fixup(fixup_proj, k2, G) and _dropout_off(fixup_proj[2])):
        return None
    c0, c3 = fixup_proj[0], fixup_proj[3]
    temp, sigma = torch.as_tensor(range_temp), torch.as_tensor(sigma_spatial)
    if not _inference_cpu(q_pad, c0.weight, c0.bias, c3.weight, c3.bias):
        return None
    if torch.is_grad_enabled() and (guidance.requires_grad or temp.requires_grad
                                    or sigma.requires_grad):
        return None
    if not (_readable(sigma) and _readable(temp) and _readable(q_pad)):
        return None
    if float(sigma.detach().abs()) < SIGMA_MIN_FOR_SOFTMAX:
        return None
    dtype = q_pad.dtype
    t = float(range_temperature(temp.detach(), device=q_pad.device, dtype=dtype))
    log_s = spatial_dist2(radius, dtype=dtype) * (-0.5 / sigma.detach().to(dtype) ** 2)
    return torch.ops.featup_adapters.jbu_stage_filters(
        q_pad, guidance.to(dtype), t, log_s, c0.weight[:, :, 0, 0], c0.bias,
        c3.weight[:, :, 0, 0], c3.bias, radius)


def stage_kernel(q_pad: Tensor, guidance: Tensor, *, range_temp, fixup_proj, sigma_spatial,
                 radius: int) -> Tensor:
    """The filters of one stage (spec section 2, steps 1-4), channels-last.

    Args:
        q_pad: ``Tensor[B, K, H + 2r, W + 2r]`` the keys, reflect-padded (or, for a row band of a
            larger map, with the neighbouring rows as the row padding).
        guidance: ``Tensor[B, G, H, W]`` the guidance at the output pixels.

    Returns:
        ``Tensor[B, H, W, k*k]`` float32 (float64 stays float64).
    """
    fused = _fused_stage_kernel(q_pad, guidance, range_temp, fixup_proj, sigma_spatial, radius)
    if fused is not None:
        return fused
    logits = range_logits_padded(q_pad, radius)                 # the kernel's own buffer
    kernel = normalized_kernel(logits, range_temp, sigma_spatial, radius)
    return fixup_kernel(kernel, guidance, fixup_proj, inplace=True)    # kernel is our own buffer
