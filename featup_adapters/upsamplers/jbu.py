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
  taps), the kernel is built channels-last (the layout ``adaptive_conv`` takes), and on CPU the
  bicubic resize and the reflect padding are two matrix products (``_resize.bicubic_pad``).
* The stack's final 1x1 fixup runs before the last stage instead of after it:
  ``x + 0.1 (W x + b)`` with ``x = A(s)`` equals ``A(s + 0.1 W s) + 0.1 b`` for any operator ``A``
  that is linear and acts on every channel alike, as bicubic resizing, padding and the adaptive
  convolution do (so does Dropout2d's per-channel mask).  The C x C convolution then runs at a
  quarter of the pixels.  Hooks on ``fixup_proj`` (or a replaced ``fixup_proj``) disable this.
* Maps whose side is at most the radius are padded by replication (reflection is undefined).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import adaptive_conv
from ._base import UpsamplerMixin, check_4d, check_upsampler_inputs, register_upsampler_class
from ._range import range_logits
from ._resize import bicubic_pad

__all__ = ["jbu", "spatial_kernel", "JointBilateralUpsampler", "JBUStack", "stage_sizes"]


def spatial_kernel(sigma_spatial: Tensor | float, radius: int, *, device=None,
                   dtype=torch.float32) -> Tensor:
    """``Tensor[k*k]``: ``exp(-(dx^2 + dy^2) / (2 sigma^2))`` on a ``linspace(-1, 1, k)`` grid,
    row-major (dy indexes kernel rows, dx columns)."""
    sigma = torch.as_tensor(sigma_spatial, device=device)
    d = torch.linspace(-1, 1, 2 * radius + 1, device=sigma.device, dtype=dtype)
    dist2 = (d[:, None] ** 2 + d[None, :] ** 2).reshape(-1)
    return torch.exp(-dist2 / (2 * sigma.to(dtype) ** 2))


def jbu(source: Tensor, guidance: Tensor, *, range_temp: Tensor | float, range_proj,
        fixup_proj, sigma_spatial: Tensor | float, radius: int = 3) -> Tensor:
    """One joint bilateral upsampling stage: ``source`` resized to the guidance's size.

    Args:
        source: ``Tensor[B, C, h, w]`` low-resolution features.
        guidance: ``Tensor[B, G, H, W]`` the image at the output size (``H >= h``, ``W >= w``).
        range_temp: scalar; the range softmax temperature is ``clamp(exp(range_temp), 1e-4, 1e4)``.
        range_proj: callable ``[B, G, H, W] -> [B, K, H, W]`` (keys).
        fixup_proj: callable ``[B, k*k + G, H, W] -> [B, k*k, H, W]`` (kernel correction).
        sigma_spatial: scalar width of the spatial Gaussian on the ``[-1, 1]`` window grid.
        radius: window radius r; the window is ``k x k`` with ``k = 2r + 1``.

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

    q = range_proj(guidance)
    if q.dim() != 4 or q.shape[0] != B or q.shape[-2:] != guidance.shape[-2:]:
        raise ValueError(f"jbu: range_proj must map [B, G, H, W] to [B, K, H, W]; got "
                         f"{list(q.shape)} for guidance {list(guidance.shape)}")
    # the kernel is built channels-last, [B, H, W, k*k], the layout adaptive_conv takes
    logits = range_logits(q, radius)                          # float32 (float64 stays)
    acc = logits.dtype
    temp = torch.as_tensor(range_temp, device=logits.device).to(acc).exp().clamp(1e-4, 1e4)
    kernel = torch.softmax(temp * logits, dim=-1)
    kernel = kernel * spatial_kernel(sigma_spatial, radius, device=logits.device, dtype=acc)
    kernel = kernel / kernel.sum(-1, keepdim=True).clamp(min=1e-7)
    fix_in = torch.cat([kernel.to(guidance.dtype), guidance.permute(0, 2, 3, 1)], dim=-1)
    fix = fixup_proj(fix_in.permute(0, 3, 1, 2))              # a channels_last [B, k*k+G, H, W]
    if fix.shape != (B, k * k, H, W):
        raise ValueError(f"jbu: fixup_proj must map [B, {k * k} + G, H, W] to "
                         f"[B, {k * k}, H, W]; got {list(fix.shape)}")
    kernel = kernel + 0.1 * fix.permute(0, 2, 3, 1).to(acc)

    hr_pad = bicubic_pad(source, (H, W), radius)                # [B, C, H + 2r, W + 2r]
    filters = kernel.to(hr_pad.dtype).reshape(B, H, W, k, k)
    return adaptive_conv(hr_pad, filters)


@register_upsampler_class
class JointBilateralUpsampler(UpsamplerMixin, nn.Module):
    """One learned JBU stage with FeatUp's parameters (``JBULearnedRange``).

    ``forward(source: Tensor[B, C, h, w], guidance: Tensor[B, guidance_dim, H, W])`` returns
    ``Tensor[B, C, H, W]``: the guidance must already be at the output size.

    Parameters: ``range_temp`` (scalar, init 0), ``range_proj`` (Conv 1x1 G->K, GELU,
    Dropout2d(0.1), Conv 1x1 K->K), ``fixup_proj`` (Conv 1x1 k*k+G -> k*k, GELU, Dropout2d(0.1),
    Conv 1x1 k*k -> k*k), ``sigma_spatial`` (scalar, init 1).
    """

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3):
        super().__init__()
        k2 = (2 * radius + 1) ** 2
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
        return {"guidance_dim": self.guidance_dim, "key_dim": self.key_dim, "radius": self.radius}

    def forward(self, source: Tensor, guidance: Tensor) -> Tensor:
        check_upsampler_inputs(source, guidance, None, guidance_dim=self.guidance_dim,
                               who=type(self).__name__)
        return jbu(source, guidance, range_temp=self.range_temp, range_proj=self.range_proj,
                   fixup_proj=self.fixup_proj, sigma_spatial=self.sigma_spatial,
                   radius=self.radius)

    def extra_repr(self) -> str:
        return f"guidance_dim={self.guidance_dim}, key_dim={self.key_dim}, radius={self.radius}"


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
        radius: window radius of every stage (7x7 windows at 3).
        num_stages: number of learned stages ``up1 .. up{num_stages}`` (FeatUp: 4, i.e. 16x).

    ``forward(source: Tensor[B, C, h, w], guidance: Tensor[B, guidance_dim, H, W],
    output_size=None) -> Tensor[B, C, H', W']`` with ``(H', W') = output_size`` or the guidance
    size.  The guidance is the normalized image the backbone saw, at any size; each stage gets it
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
                 num_stages: int = 4):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"JBUStack: expected a positive channel count dim, got {dim!r}")
        if not isinstance(num_stages, int) or num_stages < 1:
            raise ValueError(f"JBUStack: expected num_stages >= 1, got {num_stages!r}")
        self.dim, self.guidance_dim, self.key_dim = dim, guidance_dim, key_dim
        self.radius, self.num_stages = radius, num_stages
        for i in range(1, num_stages + 1):
            self.add_module(f"up{i}", JointBilateralUpsampler(guidance_dim, key_dim, radius))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(dim, dim, kernel_size=1))
        self.config = {}

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

    def forward(self, source: Tensor, guidance: Tensor, output_size=None) -> Tensor:
        check_4d("guidance", guidance, f"[B, {self.guidance_dim}, H, W]")
        H, W = check_upsampler_inputs(source, guidance, output_size,
                                      guidance_dim=self.guidance_dim, dim=self.dim,
                                      who="JBUStack")
        plan = self.stage_plan(source.shape[-2:], (H, W))
        fused = _is_linear_fixup(self.fixup_proj)
        x = source
        for n, (name, size) in enumerate(plan):
            stage = getattr(self, name)
            g = F.adaptive_avg_pool2d(guidance, size)
            if fused and n == len(plan) - 1:
                return self._last_stage_with_fixup(stage, x, g)
            x = stage(x, g)
        return x + 0.1 * self.fixup_proj(x)

    def _last_stage_with_fixup(self, stage: nn.Module, x: Tensor, g: Tensor) -> Tensor:
        # stage(x) + 0.1 * fixup(stage(x)) == stage(x + 0.1 * (fixup(x) - b)) + 0.1 * b, because
        # the stage is linear in its source and acts on every channel alike (module docstring).
        drop, conv = self.fixup_proj[0], self.fixup_proj[1]
        fix = F.conv2d(drop(x), conv.weight)                                  # without the bias
        out = stage(x + 0.1 * fix, g)
        if conv.bias is not None:
            # in place: the stage's output is not needed by its backward, and on CPU a fresh
            # full-resolution tensor costs more than the addition itself
            out = out.add_((0.1 * conv.bias).view(1, -1, 1, 1).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, guidance_dim={self.guidance_dim}, key_dim={self.key_dim}, "
                f"radius={self.radius}, num_stages={self.num_stages}")
