"""Memory budget and the row-band (tiled) inference path of ``JBUStack``.

Every stage output row depends on a few rows around it only: the ``k x k`` window (``r`` rows each
side, reflected at the map's top and bottom), the bicubic taps of those rows in the stage's source
(two rows each side) and the guidance pooled at the stage's size (computed whole: 3 channels).  So
the output is computed in bands of rows; each band asks the stage below for the source rows it
needs, which asks the stage below it, down to the source map.  Each level keeps the rows it last
made, so the rows shared by neighbouring bands (the halo) are computed once.  The peak memory is
the output plus one band of every level, whatever the size, and the result is the untiled one up
to float rounding (the bicubic resize runs as a row pass then a column pass, in another order of
summation than ``upsample_bicubic2d``).

The tiled path needs FeatUp's linear final fixup (applied at the source, see ``jbu.py``) and runs
only without autograd; training takes the untiled path.

``estimate_bytes`` gives both paths' memory estimate up front; ``JBUStack.forward`` refuses, before
allocating anything large, when even the tiled path would not fit the budget.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._validate import parse_memory_size
from ..ops import adaptive_conv
from ._kernel import stage_kernel
from ._resize import pad_mode

DEFAULT_FRACTION = 0.85      # of the memory available when the forward starts
TILE_MIN_OUTPUT_BYTES = 128 * 2 ** 20   # below this, tiling is used only when the budget needs it
MIN_BAND_ROWS = 48          # bands below this pay more in per-operation overhead than they save
TILED_EXTRA_FRACTION = 0.4   # a band's working memory, as a fraction of the output's bytes


class MemoryBudgetError(MemoryError):
    """The upsampling would need more memory than the budget (raised before allocating)."""


# --------------------------------------------------------------------------------------- budget
def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can be allocated now: on CUDA the free device memory plus what torch's caching
    allocator holds unused; on CPU ``MemAvailable`` of ``/proc/meminfo`` (else the free pages)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():    # e.g. fake CUDA tensors (tracing) on a CPU machine
            raise RuntimeError(f"cannot measure the memory available on {device}: no CUDA device "
                               f"is available (fake or traced CUDA tensors?); pass max_memory= "
                               f"(bytes or a string like '8GB') explicitly")
        free, _ = torch.cuda.mem_get_info(device)
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return int(free + torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2 ** 62      # unknown: do not refuse


def default_max_memory(device=None) -> int:
    """The default budget: ``DEFAULT_FRACTION`` of ``available_memory(device)``."""
    return int(DEFAULT_FRACTION * available_memory(device))


def parse_max_memory(value, who: str = "max_memory") -> int | None:
    """``None`` -> None (the default budget); an int of bytes; or a string ``"8GB"``, ``"512MiB"``,
    ``"2e9"`` -> bytes.  Anything else is refused."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"expected {who} as bytes (int) or a string like '8GB', got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expected a positive {who} in bytes, got {value!r}")
        return int(value)
    if isinstance(value, str):
        return parse_memory_size(value, who)
    raise TypeError(f"expected {who} as bytes (int) or a string like '8GB', got "
                    f"{type(value).__name__}")


def gb(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 28 else f"{n / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    """Bytes a forward would allocate: ``untiled`` (whole maps; with autograd, what is kept for
    backward too), ``tiled_min`` (the tiled path with the smallest bands), ``output`` (the result),
    ``per_row`` (working memory per output row of a band) and ``fixed`` (the guidance pyramid and
    the source-side maps the tiled path keeps whole)."""
    untiled: int
    tiled_min: int
    output: int
    per_row: int
    fixed: int
    halo_rows: int

    def tiled(self, rows: int) -> int:
        return self.output + self.fixed + self.per_row * (rows + self.halo_rows)

    def band_rows(self, budget: int, H: int) -> int:
        """The band height the tiled path uses for this budget: the rows whose working memory is
        ``TILED_EXTRA_FRACTION`` of the output, at least ``MIN_BAND_ROWS`` (fewer, larger
        operations) where the budget allows, at least 1."""
        per = max(self.per_row, 1)
        target = int(TILED_EXTRA_FRACTION * self.output - self.fixed) // per - self.halo_rows
        fits = (budget - self.output - self.fixed) // per - self.halo_rows
        return int(max(1, min(H, fits, max(target, MIN_BAND_ROWS))))


def estimate_bytes(B: int, C: int, sizes: list[tuple[int, int]], source_hw, *, radius: int,
                   key_dim: int, guidance_dim: int, elem: int, out_elem: int,
                   grad: bool) -> Estimate:
    """The memory estimate of a stack forward through ``sizes`` (the size after each stage)."""
    r, k2, K, G = radius, (2 * radius + 1) ** 2, key_dim, guidance_dim
    kern_px = 4 * (3 * k2 + 3 * K) + 8 * G      # kernel buffers per output pixel (float32)
    prev = source_hw
    untiled_peak, kept = 0, 0
    pyramid = 0
    for i, (H, W) in enumerate(sizes):
        last = i == len(sizes) - 1
        hr_pad = B * C * (H + 2 * r) * (W + 2 * r) * elem
        out = B * C * H * W * (out_elem if last else elem)
        src = B * C * prev[0] * prev[1] * elem
        kern = B * H * W * kern_px
        pyramid += B * G * H * W * 4
        untiled_peak = max(untiled_peak, kept + src + hr_pad + out + kern
                           + (B * C * H * W * elem if last and out_elem != elem else 0))
        if grad:                       # kept for backward: the padded input and the filters
            kept += hr_pad + B * H * W * k2 * 4 * 4 + B * H * W * (K + G) * 4 * 3
        prev = (H, W)
    H, W = sizes[-1] if sizes else source_hw
    output = B * C * H * W * out_elem
    # a band, per output row of the last stage: the row pass (half width), the padded rows, the
    # band's result (and its cast), the kernel; the level below holds about half as many rows
    per_row = B * W * (C * elem * (0.5 + 1 + 1 + (1 if out_elem != elem else 0) + 0.75)
                       + kern_px)
    halo = 4 * r + 8
    fixed = pyramid + (B * C * source_hw[0] * source_hw[1] * elem) * 2
    tiled_min = output + fixed + int(per_row) * (1 + halo)
    return Estimate(int(untiled_peak + pyramid), int(tiled_min), int(output), int(per_row),
                    int(fixed), halo)


# ------------------------------------------------------------------------------------ row maps
def pad_rows(lo: int, hi: int, n: int, r: int, reflect: bool) -> list[int]:
    """Rows ``lo .. hi-1`` of a map of ``n`` rows extended by ``r`` on both sides (reflected, or
    replicated), mapped back into ``[0, n)``."""
    out = []
    for i in range(lo, hi):
        if reflect:
            if i < 0:
                i = -i
            if i >= n:
                i = 2 * (n - 1) - i
        else:
            i = min(max(i, 0), n - 1)
        out.append(i)
    return out


_A = -0.75   # PyTorch's bicubic coefficient


def cubic_weights(t: float) -> tuple[float, float, float, float]:
    """The 4 bicubic tap weights (taps ``floor(x) - 1 .. floor(x) + 2``) at fraction ``t``."""
    def near(x):     # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):      # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return far(t + 1), near(t), near(1 - t), far(2 - t)


def _row_taps(rows: list[int], n_in: int, n_out: int):
    """Bicubic taps (align_corners=False) of output rows: (indices [4][len], weights [4][len])."""
    scale = n_in / n_out
    idx = [[0] * len(rows) for _ in range(4)]
    wts = [[0.0] * len(rows) for _ in range(4)]
    for j, o in enumerate(rows):
        x = (o + 0.5) * scale - 0.5
        f = math.floor(x)
        for t, w in enumerate(cubic_weights(x - f)):
            idx[t][j] = min(max(f - 1 + t, 0), n_in - 1)
            wts[t][j] = w
    return idx, wts


class _Level:
    """Rows of one stage's output, made on request from the level below; keeps the last rows."""

    def __init__(self, stage, below, guidance: Tensor, size: tuple[int, int], radius: int):
        self.stage, self.below, self.g, self.r = stage, below, guidance, radius
        self.H, self.W = size
        self.h, self.w = below.H, below.W
        self.reflect = pad_mode(self.H, self.W, radius) == "reflect"
        self.cache_lo, self.cache = 0, None

    def source_rows(self, lo: int, hi: int) -> tuple[int, int]:
        """The rows of the level below that output rows ``[lo, hi)`` read."""
        pr = pad_rows(lo - self.r, hi + self.r, self.H, self.r, self.reflect)
        idx, _ = _row_taps([min(pr), max(pr)], self.h, self.H)
        return max(0, min(idx[0]) - 1), min(self.h, max(idx[3]) + 2)   # one spare row each side

    def rows(self, lo: int, hi: int) -> Tensor:
        """``Tensor[B, C, hi - lo, W]`` (requests must not move backwards)."""
        if self.cache is not None:
            c_hi = self.cache_lo + self.cache.shape[2]
            if lo >= self.cache_lo and hi <= c_hi:
                return self.cache[:, :, lo - self.cache_lo:hi - self.cache_lo]
            if self.cache_lo <= lo < c_hi:
                new = self.compute(c_hi, hi)
                keep = self.cache[:, :, lo - self.cache_lo:]
                self.cache = torch.cat([keep, new], dim=2)
                self.cache_lo = lo
                return self.cache
        self.cache, self.cache_lo = None, lo
        self.cache = self.compute(lo, hi)
        return self.cache

    def compute(self, a: int, b: int) -> Tensor:
        r, st = self.r, self.stage
        pr = pad_rows(a - r, b + r, self.H, r, self.reflect)          # padded rows a-r .. b+r-1
        s_lo, s_hi = self.source_rows(a, b)
        src = self.below.rows(s_lo, s_hi)                              # [B, C, s_hi - s_lo, w]
        if self.H == 2 * self.h:
            rows = self._row_pass_2x(src, a, b, pr, s_lo)
        else:
            rows = self._row_pass(src, pr, s_lo)
        hr_pad = self._col_pass(rows)                                  # [B, C, len(pr), W + 2r]
        del rows
        # the kernel of these rows: keys at the padded rows, padded by columns
        gi = torch.tensor(pr, device=self.g.device)
        q = st.range_proj(self.g.index_select(2, gi))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_pad = F.pad(q.to(acc), [r, r, 0, 0], mode="reflect" if self.reflect else "replicate")
        kern = stage_kernel(q_pad, self.g[:, :, a:b], range_temp=st.range_temp,
                            fixup_proj=st.fixup_proj, sigma_spatial=st.sigma_spatial, radius=r)
        k = 2 * r + 1
        B = hr_pad.shape[0]
        return adaptive_conv(hr_pad, kern.to(hr_pad.dtype).view(B, b - a, self.W, k, k))


    def _row_pass(self, src: Tensor, rows: list[int], s_lo: int) -> Tensor:
        """Bicubic along rows: ``Tensor[B, C, len(rows), w]`` at the given output rows (one fused
        multiply-add per tap and row: no gathered copies)."""
        idx, wts = _row_taps(rows, self.h, self.H)
        B, C, _, w = src.shape
        out = src.new_empty((B, C, len(rows), w))
        for j in range(len(rows)):
            dst = out[:, :, j]
            torch.mul(src[:, :, idx[0][j] - s_lo], wts[0][j], out=dst)
            for t in range(1, 4):
                dst.add_(src[:, :, idx[t][j] - s_lo], alpha=wts[t][j])
        return out

    def _row_pass_2x(self, src: Tensor, a: int, b: int, pr: list[int], s_lo: int) -> Tensor:
        """``_row_pass`` for an exact 2x: even rows 2m read source rows m-2..m+1 with the weights at
        t = 0.75, odd rows m-1..m+2 at t = 0.25, as strided slices (8 operations a band); the
        reflected border rows are copied from the rows inside."""
        B, C, _, w = src.shape
        r, H = self.r, self.H
        lo, hi = max(a - r, 0), min(b + r, H)
        off = lo - (a - r)                       # where row lo sits in the padded band
        out = src.new_empty((B, C, len(pr), w))
        m0, m1 = lo // 2, (hi - 1) // 2
        ext = [min(max(i, 0), self.h - 1) - s_lo for i in range(m0 - 2, m1 + 3)]
        if ext == list(range(ext[0], ext[0] + len(ext))):
            sp = src[:, :, ext[0]:ext[0] + len(ext)]
        else:
            sp = src.index_select(2, torch.tensor(ext, device=src.device))
        for parity, t0, base in ((0, 0.75, 0), (1, 0.25, 1)):
            first = lo + (parity - lo) % 2
            if first >= hi:
                continue
            cnt = (hi - 1 - first) // 2 + 1
            j = off + first - lo
            dst = out[:, :, j:j + 2 * cnt - 1:2]
            m = first // 2 - m0 + base
            for t, wt in enumerate(cubic_weights(t0)):
                piece = sp[:, :, m + t:m + t + cnt]
                if t == 0:
                    torch.mul(piece, wt, out=dst)
                else:
                    dst.add_(piece, alpha=wt)
        border = [j for j in range(len(pr)) if j < off or j >= off + hi - lo]
        if border:
            dev = src.device
            out.index_copy_(2, torch.tensor(border, device=dev), out.index_select(
                2, torch.tensor([off + pr[j] - lo for j in border], device=dev)))
        return out

    def _col_pass(self, x: Tensor) -> Tensor:
        """Bicubic along columns to ``W`` and the column padding: ``Tensor[B, C, n, W + 2r]``."""
        B, C, n, w = x.shape
        W, r = self.W, self.r
        if W == 2 * w:
            # exactly 2x: even columns 2m read source columns m-2..m+1 with the weights at
            # t = 0.75, odd columns m-1..m+2 at t = 0.25; clamped taps read a replicated border
            xp = F.pad(x, [2, 2, 0, 0], mode="replicate")
            out = x.new_empty((B, C, n, W + 2 * r))
            for parity, t0, off in ((0, 0.75, 0), (1, 0.25, 1)):
                dst = out[..., r + parity:r + W:2]
                for t, wt in enumerate(cubic_weights(t0)):
                    piece = xp[..., off + t:off + t + w]
                    if t == 0:
                        torch.mul(piece, wt, out=dst)
                    else:
                        dst.add_(piece, alpha=wt)
            if r:
                cols = pad_rows(-r, 0, W, r, self.reflect) + pad_rows(W, W + r, W, r, self.reflect)
                src_cols = torch.tensor([r + c for c in cols], device=x.device)
                dst_cols = torch.tensor([*range(r), *range(W + r, W + 2 * r)], device=x.device)
                out.index_copy_(3, dst_cols, out.index_select(3, src_cols))
            return out
        cols = pad_rows(-r, W + r, W, r, self.reflect)
        idx, wts = _row_taps(cols, w, W)
        out = None
        for t in range(4):
            it = torch.tensor(idx[t], device=x.device)
            wt = torch.tensor(wts[t], dtype=torch.float64).to(device=x.device, dtype=x.dtype)
            term = x.index_select(3, it).mul_(wt)
            out = term if out is None else out.add_(term)
        return out


class _Source:
    def __init__(self, x: Tensor):
        self.x, self.H, self.W = x, x.shape[2], x.shape[3]

    def rows(self, lo: int, hi: int) -> Tensor:
        return self.x[:, :, lo:hi]


def tiled_forward(stages, source: Tensor, guidances: list[Tensor], sizes, *, radius: int,
                  band_rows: int, out: Tensor, bias: Tensor | None = None) -> Tensor:
    """Run ``stages`` (one per size) from ``source`` (already fixed up at the source) into ``out``
    (``Tensor[B, C, H, W]``, any float dtype), ``band_rows`` output rows at a time; ``bias`` (``[C]``)
    is added to every output pixel.  Returns ``out``."""
    level = _Source(source)
    for st, g, size in zip(stages, guidances, sizes):
        level = _Level(st, level, g, size, radius)
    H = level.H
    band_rows = max(1, int(band_rows))
    for a in range(0, H, band_rows):
        b = min(H, a + band_rows)
        band = level.compute(a, b)
        if bias is not None:
            band.add_(bias.view(1, -1, 1, 1).to(band.dtype))
        out[:, :, a:b].copy_(band)
        del band
    return out
