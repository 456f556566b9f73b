"""Joint bilateral upsampling: FeatUp's learned JBU stage and its stack, at any output size.

One stage (FeatUp's ``JBULearnedRange``; ``shared/featup-spec.md`` section 2)::

    q      = range_proj(guidance)                                   # [B, K, H, W]
    range  = softmax_n(clamp(exp(range_temp), 1e-4, 1e4) * <q_pad[p + n], q[p]>)
    kernel = range * exp(-|n|^2 / (2 sigma_spatial^2));  kernel /= max(sum_n kernel, 1e-7)
    kernel = kernel + 0.1 * fixup_proj(cat([kernel, guidance]))
    out    = adaptive_conv(reflect_pad(bicubic(source, (H, W))), kernel)

The stack (FeatUp's ``JBUStack``; section 3) chains stages, each at most doubling the map, and ends
with ``out = x + 0.1 * fixup_proj(x)``.  Parameter and module names are FeatUp's, so a FeatUp
state dict loads as is (``featup_adapters.hub.load_featup_checkpoint``).

Differences from FeatUp; none changes a result at 16x beyond float rounding:

* Any output size.  See ``JBUStack.stage_plan`` for how sizes are scheduled across stages.
* Nothing is unfolded.  The range logits are one k*k-tap dot product per pixel
  (``_range.range_logits``: the compiled ``adaptive_conv_grad_filters`` op, or a loop over the
  taps), the kernel is built channels-last (the layout ``adaptive_conv`` takes), and the bicubic
  resize and the reflect padding are one op (``_resize.bicubic_pad``: on CPU one separable 4-tap
  pass that writes the padded map).
* The stack's final 1x1 fixup runs on the source map (14x14 at 224 output) instead of the output:
  ``x + 0.1 (W x + b)`` with ``x = A(s)`` equals ``A(s + 0.1 W s) + 0.1 b`` for the whole stack
  ``A``, which is linear in its source and acts on every channel alike (the kernels depend on the
  guidance only; so does Dropout2d's per-channel mask).  Hooks on ``fixup_proj`` (or a replaced
  ``fixup_proj``) keep FeatUp's order.
* The kernel is built without needless full-size temporaries (``_kernel``), and without autograd
  large outputs are computed in row bands under a memory budget (``_tiling``).
* Maps whose side is at most the radius are padded by replication (reflection is undefined).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import adaptive_conv, empty_output
import warnings

from . import _tiling
from ._base import (UpsamplerMixin, check_4d, check_channels, check_input_dtypes, check_radius,
                    check_upsampler_inputs, register_upsampler_class)
from ._kernel import (conv1x1_as_matmul, fixup_kernel, normalized_kernel, padded_keys, project_keys,
                      spatial_dist2, stage_kernel)
from ._resize import bicubic_pad, bicubic_pad_conv, pad2d

__all__ = ["jbu", "spatial_kernel", "JointBilateralUpsampler", "JBUStack", "stage_sizes"]


def spatial_kernel(sigma_spatial: Tensor | float, radius: int, *, device=None,
                   dtype=torch.float32) -> Tensor:
    """``Tensor[k*k]``: ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on a ``linspace(-1, 1, k)`` grid,
    row-major (dy indexes kernel rows, dx columns)."""
    sigma = torch.as_tensor(sigma_spatial, device=device)
    dist2 = spatial_dist2(radius, device=sigma.device, dtype=dtype)
    return torch.exp(-dist2 / (2 * sigma.to(dtype) ** 2))


def jbu(source: Tensor, guidance: Tensor, *, range_temp: Tensor | float, range_proj,
        fixup_proj, sigma_spatial: Tensor | float, radius: int = 3,
        bias: Tensor | None = None) -> Tensor:
    """One joint bilateral upsampling stage: ``source`` resized to the guidance's size.

    Args:
        source: ``Tensor[B, C, h, w]`` low-resolution features.
        guidance: ``Tensor[B, G, H, W]`` the image at the output size (``H >= h``, ``W >= w``).
        range_temp: scalar; the range softmax temperature is ``clamp(exp(range_temp), 1e-4, 1e4)``.
        range_proj: callable ``[B, G, H, W] -> [B, K, H, W]`` (keys).
        fixup_proj: callable ``[B, k*k + G, H, W] -> [B, k*k, H, W]`` (kernel correction).
        sigma_spatial: scalar width of the spatial Gaussian on the ``[-1, 1]`` window grid.
        radius: window radius r; the window is ``k x k`` with ``k = 2r + 1``.
        bias: optional ``Tensor[C]`` added to every output pixel (without autograd it is added
            as the convolution stores its result: no extra pass over the output).

    Returns:
        ``Tensor[B, C, H, W]`` in the dtype of ``source`` (the kernel is built in float32 and cast).

    Example:
        >>> up = JointBilateralUpsampler()
        >>> out = jbu(torch.randn(1, 8, 7, 9), torch.randn(1, 3, 14, 18), range_temp=up.range_temp,
        ...           range_proj=up.range_proj, fixup_proj=up.fixup_proj,
        ...           sigma_spatial=up.sigma_spatial)
        >>> out.shape
        torch.Size([1, 8, 14, 18])
    """
    H, W = check_upsampler_inputs(source, guidance, None, who="jbu")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"jbu: expected an integer radius >= 0, got {radius!r}")
    k = 2 * radius + 1
    B = guidance.shape[0]

    acc = torch.float64 if guidance.dtype == torch.float64 else torch.float32
    q_pad = padded_keys(range_proj, guidance, radius, acc)
    kernel = stage_kernel(q_pad, guidance, range_temp=range_temp,
                          fixup_proj=fixup_proj, sigma_spatial=sigma_spatial, radius=radius)
    filters = kernel.to(source.dtype).view(B, H, W, k, k)
    bias = None if bias is None else bias.to(source.dtype)
    if not (torch.is_grad_enabled() and (source.requires_grad or filters.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        # inference: resize + pad + convolution in bands, never the padded map (where the fused
        # kernel runs), the bias added as the convolution stores
        return bicubic_pad_conv(source, filters, (H, W), radius, bias)
    out = adaptive_conv(bicubic_pad(source, (H, W), radius), filters)   # padded: [B, C, H+2r, W+2r]
    return out if bias is None else out.add_(bias.view(1, -1, 1, 1))


@register_upsampler_class
class JointBilateralUpsampler(UpsamplerMixin, nn.Module):
    """One learned JBU stage with FeatUp's parameters (``JBULearnedRange``).

    ``forward(source: Tensor[B, C, h, w], guidance: Tensor[B, guidance_dim, H, W])`` returns
    ``Tensor[B, C, H, W]``: the guidance must already be at the output size.

    Args (as for :class:`JBUStack`):
        dim: feature channels C, checked at forward; None (default) = any C (a stage has no
            per-channel parameters).
        guidance_dim, key_dim, radius: keyword-only; ``radius`` in 0..7 (k = 2r + 1 <= 15).
        The old positional form ``JointBilateralUpsampler(guidance_dim, key_dim, radius)`` (two or
        three positional values) still works with a DeprecationWarning.

    Source and guidance must be in the weights' dtype (or run under ``torch.autocast``).

    Parameters: ``range_temp`` (scalar, init 0), ``range_proj`` (Conv 1x1 G->K, GELU,
    Dropout2d(0.1), Conv 1x1 K->K), ``fixup_proj`` (Conv 1x1 k*k+G -> k*k, GELU, Dropout2d(0.1),
    Conv 1x1 k*k -> k*k), ``sigma_spatial`` (scalar, init 1).
    """

    def __init__(self, dim: int | None = None, *legacy, guidance_dim: int = 3, key_dim: int = 32,
                 radius: int = 3):
        super().__init__()
        who = type(self).__name__
        if legacy:  # JointBilateralUpsampler(guidance_dim, key_dim[, radius]) before dim came first
            if len(legacy) > 2:
                raise TypeError(f"{who}: expected at most 3 positional arguments, got {1 + len(legacy)}")
            warnings.warn(f"{who}(guidance_dim, key_dim, radius) with positional values is deprecated; "
                          f"the first argument is now dim (feature channels, as in JBUStack): pass "
                          f"guidance_dim=, key_dim=, radius= as keywords", DeprecationWarning, stacklevel=2)
            guidance_dim, key_dim, radius, dim = dim, legacy[0], legacy[1] if len(legacy) > 1 else radius, None
        if dim is not None:
            check_channels("dim", dim, who)
        check_channels("guidance_dim", guidance_dim, who)
        check_channels("key_dim", key_dim, who)
        check_radius(radius, who)
        k2 = (2 * radius + 1) ** 2
        self.dim = dim
        self.guidance_dim, self.key_dim, self.radius = guidance_dim, key_dim, radius
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1, 1), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(key_dim, key_dim, 1, 1))
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + k2, k2, 1, 1), nn.GELU(), nn.Dropout2d(0.1),
            nn.Conv2d(k2, k2, 1, 1))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
        self.config = {}

    def init_kwargs(self) -> dict:
        kwargs = {"guidance_dim": self.guidance_dim, "key_dim": self.key_dim, "radius": self.radius}
        return {"dim": self.dim, **kwargs} if self.dim is not None else kwargs

    def forward(self, source: Tensor, guidance: Tensor, *, bias: Tensor | None = None) -> Tensor:
        """``bias``: optional ``Tensor[C]`` added to every output pixel (see :func:`jbu`)."""
        check_upsampler_inputs(source, guidance, None, guidance_dim=self.guidance_dim, dim=self.dim,
                               who=type(self).__name__)
        check_input_dtypes(source, guidance, self.range_temp, type(self).__name__)
        if bias is not None and tuple(bias.shape) != (source.shape[1],):
            raise ValueError(f"{type(self).__name__}: expected bias of shape [{source.shape[1]}], "
                             f"got {list(bias.shape)}")
        return jbu(source, guidance, range_temp=self.range_temp, range_proj=self.range_proj,
                   fixup_proj=self.fixup_proj, sigma_spatial=self.sigma_spatial,
                   radius=self.radius, bias=bias)

    def extra_repr(self) -> str:
        dim = f"dim={self.dim}, " if self.dim is not None else ""
        return f"{dim}guidance_dim={self.guidance_dim}, key_dim={self.key_dim}, radius={self.radius}"


def stage_sizes(source_hw: tuple[int, int], output_hw: tuple[int, int], *,
                min_stages: int = 1) -> list[tuple[int, int]]:
    """Sizes after each stage to go from ``source_hw`` to ``output_hw``, each step at most 2x.

    The number of steps is the least ``n >= min_stages`` with ``2**n >= max(H/h, W/w)``.  Sizes
    follow a geometric schedule per axis (``round(h * (H/h) ** (i/n))``), nudged so that no step
    exceeds 2x and the last step lands on the target; at exactly 16x with 4 steps this gives
    FeatUp's 2x, 4x, 8x, 16x.
    """
    (h, w), (H, W) = source_hw, output_hw
    if H < h or W < w:
        raise ValueError(f"output size {H}x{W} is smaller than the source {h}x{w}")
    n = max(min_stages, 0)
    while h * 2 ** n < H or w * 2 ** n < W:
        n += 1
    if n == 0:
        return []

    def axis(a: int, A: int) -> list[int]:
        sizes, prev = [], a
        for i in range(1, n):
            s = round(a * (A / a) ** (i / n))
            lo = max(prev, -(-A // 2 ** (n - i)))          # the rest must still reach A at 2x/step
            s = min(max(s, lo), 2 * prev)
            sizes.append(s)
            prev = s
        return sizes + [A]

    return list(zip(axis(h, H), axis(w, W)))


def _pooled(guidance: Tensor, size: tuple[int, int]) -> Tensor:
    """The guidance average-pooled to ``size`` (itself when it already has that size: pooling
    to the same size is the identity)."""
    if tuple(guidance.shape[-2:]) == tuple(size):
        return guidance
    return F.adaptive_avg_pool2d(guidance, size)


def _is_linear_fixup(fixup: nn.Module) -> bool:
    """True for FeatUp's ``Sequential(Dropout2d, Conv2d 1x1)`` (the fused fast path applies)."""
    if not isinstance(fixup, nn.Sequential) or len(fixup) != 2:
        return False
    drop, conv = fixup[0], fixup[1]
    return (type(drop) in (nn.Dropout2d, nn.Identity) and type(conv) is nn.Conv2d
            and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1)
            and not fixup._forward_hooks and not fixup._forward_pre_hooks
            and not conv._forward_hooks and not conv._forward_pre_hooks)


@register_upsampler_class
class JBUStack(UpsamplerMixin, nn.Module):
    """FeatUp's stack of learned JBU stages plus a residual 1x1 fixup, at any output size.

    Args:
        dim: feature channels C.
        guidance_dim: guidance (image) channels.
        key_dim: channels of the range projection.
        radius: window radius of every stage (7x7 windows at 3), an int in 0..7 (the window
            k = 2r + 1 is at most 15, the adaptive-conv kernels' limit; checked here).
        num_stages: number of learned stages ``up1 .. up{num_stages}`` (FeatUp: 4, i.e. 16x).
        max_memory: default memory budget of ``forward`` (bytes or ``"8GB"``; None: a fraction of
            the memory available at each call).  Not saved with the weights.
        out_dtype: default dtype of the result (None: the source's).

    ``forward(source: Tensor[B, C, h, w], guidance: Tensor[B, guidance_dim, H, W],
    output_size=None) -> Tensor[B, C, H', W']`` with ``(H', W') = output_size`` or the guidance
    size; source and guidance in the stack's dtype (float32 unless converted; any float dtype
    under ``torch.autocast``), other dtypes are refused with a message saying so.  Like any
    ``nn.Module`` a new stack is in training mode (dropout on): call ``.eval()`` for inference.
    The guidance is the normalized image the backbone saw, at any size; each stage gets it
    pooled (``adaptive_avg_pool2d``) to that stage's output size.

    Size schedule (``stage_plan``): ``n`` steps, the fewest (at least 1) that reach the target
    with at most 2x each, on a geometric schedule per axis.  Steps use ``up1, up2, ...`` in order.
    For factors above ``2**num_stages`` (e.g. 32x with 4 stages) there are more steps than
    learned stages: the extra steps reuse the last stage, so every step stays edge-aware
    (the range kernel depends only on pixel colours, so it applies at any resolution).  The
    default layout at exactly 16x is FeatUp's: ``up1..up4`` at 2x, 4x, 8x, 16x.

    Example:
        >>> stack = JBUStack(16).eval()
        >>> stack(torch.randn(1, 16, 14, 20), torch.randn(1, 3, 224, 320)).shape
        torch.Size([1, 16, 224, 320])
        >>> stack(torch.randn(1, 16, 14, 14), torch.randn(1, 3, 224, 224), (42, 42)).shape
        torch.Size([1, 16, 42, 42])
    """

    def __init__(self, dim: int, *, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3,
                 num_stages: int = 4, max_memory=None, out_dtype: torch.dtype | None = None):
        super().__init__()
        dim = self._check_dim(dim)
        if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"JBUStack: expected num_stages >= 1, got {num_stages!r}")
        check_channels("guidance_dim", guidance_dim, "JBUStack")
        check_channels("key_dim", key_dim, "JBUStack")
        check_radius(radius, "JBUStack")
        self.dim, self.guidance_dim, self.key_dim = dim, guidance_dim, key_dim
        self.radius, self.num_stages = radius, num_stages
        for i in range(1, num_stages + 1):
            self.add_module(f"up{i}", JointBilateralUpsampler(guidance_dim=guidance_dim, key_dim=key_dim,
                                                              radius=radius))
        self.fixup_proj = self._make_fixup(dim)
        self.config = {}
        _tiling.parse_max_memory(max_memory)            # refused here if malformed
        self.max_memory, self.out_dtype = max_memory, out_dtype

    def _check_dim(self, dim):
        """The channel count the stack is built for (subclasses without a per-channel fixup
        override this and ``_make_fixup``)."""
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"JBUStack: expected a positive channel count dim, got {dim!r}")
        return dim

    def _make_fixup(self, dim) -> nn.Module | None:
        """FeatUp's final ``Sequential(Dropout2d(0.2), Conv2d(dim, dim, 1))``; None = no fixup
        (``out = A(source)``, fused and tiled like the linear fixup)."""
        return nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, kernel_size=1))

    def init_kwargs(self) -> dict:
        return {"dim": self.dim, "guidance_dim": self.guidance_dim, "key_dim": self.key_dim,
                "radius": self.radius, "num_stages": self.num_stages}

    @property
    def stages(self) -> list[JointBilateralUpsampler]:
        return [getattr(self, f"up{i}") for i in range(1, self.num_stages + 1)]

    def stage_plan(self, source_hw, output_hw) -> list[tuple[str, tuple[int, int]]]:
        """``[(stage name, size after it), ...]`` for this source and output size."""
        sizes = stage_sizes(tuple(source_hw), tuple(output_hw))
        return [(f"up{min(i + 1, self.num_stages)}", s) for i, s in enumerate(sizes)]

    def forward(self, source: Tensor, guidance: Tensor, output_size=None, *, max_memory=None,
                out_dtype: torch.dtype | None = None) -> Tensor:
        """``Tensor[B, C, h, w]``, ``Tensor[B, G, H, W]`` -> ``Tensor[B, C, H', W']``.

        ``max_memory`` (bytes, or a string like ``"8GB"``; default the constructor's, else
        ``_tiling.DEFAULT_FRACTION`` of the memory available now) bounds what the forward
        allocates; ``out_dtype`` (default the constructor's, else the source's dtype) is the
        result's dtype (the stages compute in the source's dtype).  Without autograd, large outputs
        (or outputs that would not fit the budget whole) are computed in row bands
        (``_tiling``); when even that cannot fit, a ``MemoryBudgetError`` (a ``MemoryError``)
        names the estimate and the budget before anything large is allocated.
        """
        who = type(self).__name__
        check_4d("guidance", guidance, f"[B, {self.guidance_dim}, H, W]")
        H, W = check_upsampler_inputs(source, guidance, output_size,
                                      guidance_dim=self.guidance_dim, dim=self.dim, who=who)
        check_input_dtypes(source, guidance, self.up1.range_temp, who)
        out_dtype = out_dtype if out_dtype is not None else self.out_dtype
        if out_dtype is not None and (not isinstance(out_dtype, torch.dtype)
                                      or not out_dtype.is_floating_point):
            raise TypeError(f"{who}: expected out_dtype as a floating torch.dtype, got "
                            f"{out_dtype!r}")
        out_dtype = out_dtype or source.dtype
        budget = _tiling.parse_max_memory(max_memory if max_memory is not None
                                          else self.max_memory)
        plan = self.stage_plan(source.shape[-2:], (H, W))
        fixup = self.fixup_proj                 # None: no final fixup (e.g. UniversalJBUStack)
        fused = fixup is None or _is_linear_fixup(fixup)
        bias = fixup[1].bias if fixup is not None and fused else None
        grad = torch.is_grad_enabled() and (
            source.requires_grad or guidance.requires_grad
            or any(p.requires_grad for p in self.parameters()))
        est = _tiling.estimate_bytes(
            source.shape[0], source.shape[1], [s for _, s in plan], tuple(source.shape[-2:]),
            radius=self.radius, key_dim=self.key_dim, guidance_dim=self.guidance_dim,
            elem=source.element_size(), out_elem=out_dtype.itemsize,
            grad=grad)
        if budget is None:
            budget = _tiling.default_max_memory(source.device)
            told = f"the budget ({_tiling.DEFAULT_FRACTION:.0%} of the memory available now)"
        else:
            told = "max_memory"
        tile = fused and not grad and len(plan) > 0 and (
            est.untiled > budget or est.output >= _tiling.TILE_MIN_OUTPUT_BYTES)
        need = est.tiled_min if tile else est.untiled
        if need > budget:
            how = ("with autograd (training keeps every stage's maps)" if grad else
                   "even in row bands" if tile else "(this fixup_proj cannot be tiled)")
            raise _tiling.MemoryBudgetError(
                f"{who}: upsampling {list(source.shape)} to {H}x{W} needs about "
                f"{_tiling.gb(need)} {how} (the output alone is {_tiling.gb(est.output)}), but "
                f"{told} is {_tiling.gb(budget)}; ask for a smaller output size, a 16-bit "
                f"out_dtype, or a larger max_memory")
        x = self._fixup_at_source(source) if fused and fixup is not None else source
        if tile:
            sizes = [s for _, s in plan]
            guides = [_pooled(guidance, s) for s in sizes]
            out = empty_output(source, (source.shape[0], source.shape[1], H, W), dtype=out_dtype)
            return _tiling.tiled_forward(
                [getattr(self, n) for n, _ in plan], x, guides, sizes, radius=self.radius,
                band_rows=est.band_rows(budget, H), out=out,
                bias=None if bias is None else 0.1 * bias)
        for i, (name, size) in enumerate(plan):
            stage = getattr(self, name)
            if (fused and bias is not None and i == len(plan) - 1
                    and type(stage) is JointBilateralUpsampler):
                # the bias added as the last convolution stores its result
                x, bias = stage(x, _pooled(guidance, size), bias=0.1 * bias), None
            else:
                x = stage(x, _pooled(guidance, size))
        if not fused:
            x = x + 0.1 * fixup(x)
        elif bias is not None:
            bias = (0.1 * bias).view(1, -1, 1, 1).to(x.dtype)
            # in place: no stage's backward needs its output
            x = x.add_(bias) if plan else x + bias
        return x.to(out_dtype)

    def _fixup_at_source(self, source: Tensor) -> Tensor:
        """The linear final fixup moved to the source: ``x + 0.1 (W x + b)`` with ``x = A(s)``
        equals ``A(s + 0.1 W s) + 0.1 b`` (module docstring); this returns ``s + 0.1 W s`` and the
        caller adds the bias after the stages."""
        drop, conv = self.fixup_proj[0], self.fixup_proj[1]
        return source + 0.1 * conv1x1_as_matmul(drop(source), conv.weight, None)

    def forward_projected(self, source: Tensor, guidance: Tensor, weight: Tensor,
                          bias: Tensor | None = None, output_size=None) -> Tensor:
        """``weight @ self(source, guidance, output_size) + bias`` per pixel, computed on the
        projected source: ``Tensor[B, C, h, w]``, ``weight: Tensor[n, C]``, ``bias: Tensor[n]``
        -> ``Tensor[B, n, H, W]``.

        The stack is linear in its source and mixes every channel alike, so projecting first and
        upsampling ``n`` channels gives the same result (to float rounding, with the same dropout
        draws in training mode) at ``n / C`` of the per-channel cost: training compares only ``n``
        random projections of the output, so it never needs all ``C`` channels at full size.
        A hooked or replaced ``fixup_proj`` runs the full forward and projects its result.
        """
        who = f"{type(self).__name__}.forward_projected"
        C = source.shape[1] if source.dim() == 4 else None
        if weight.dim() != 2 or (C is not None and weight.shape[1] != C):
            raise ValueError(f"{who}: expected weight of shape [n, {C}], got {list(weight.shape)}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{who}: expected bias of shape [{weight.shape[0]}], got "
                             f"{list(bias.shape)}")
        fixup = self.fixup_proj
        if fixup is not None and not _is_linear_fixup(fixup):
            out = self(source, guidance, output_size)
            y = torch.einsum("nc,bchw->bnhw", weight.to(out.dtype), out)
            return y if bias is None else y + bias.to(y.dtype).view(1, -1, 1, 1)
        check_4d("guidance", guidance, f"[B, {self.guidance_dim}, H, W]")
        H, W = check_upsampler_inputs(source, guidance, output_size,
                                      guidance_dim=self.guidance_dim, dim=self.dim, who=who)
        check_input_dtypes(source, guidance, self.up1.range_temp, who)
        x, const = source, bias
        if fixup is not None:
            x = self._fixup_at_source(source)
            conv_bias = fixup[1].bias
            if conv_bias is not None:
                fixed = 0.1 * (weight.to(conv_bias.dtype) @ conv_bias)
                const = fixed if const is None else const + fixed
        z = torch.einsum("nc,bchw->bnhw", weight.to(x.dtype), x)
        for name, size in self.stage_plan(source.shape[-2:], (H, W)):
            z = getattr(self, name)(z, _pooled(guidance, size))
        return z if const is None else z + const.to(z.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, guidance_dim={self.guidance_dim}, key_dim={self.key_dim}, "
                f"radius={self.radius}, num_stages={self.num_stages}")
