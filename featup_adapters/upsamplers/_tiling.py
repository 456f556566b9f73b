"""Memory budget and the row-band (tiled) inference path of ``JBUStack``.

Every stage output row depends on a few rows around it only: the ``k x k`` window (``r`` rows each
side, reflected at the map's top and bottom), the bicubic taps of those rows in the stage's source
(two rows each side) and the guidance pooled at the stage's size (computed whole: 3 channels).  So
the output is computed in bands of rows; each band asks the stage below for the source rows it
needs, which asks the stage below it, down to the source map.  Each level keeps the rows it last
made, so the rows shared by neighbouring bands (the halo) are computed once.  The peak memory is
the output plus one band of every level, whatever the size, and the result is the untiled one up
to float rounding (each band's resize is the ``bicubic_pad_rows`` op: the same taps as the whole
map's ``bicubic_pad``).

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
from ..ops import adaptive_conv_into
from ..ops.resize import bicubic_pad_rows, source_row_range
from ._kernel import project_keys, stage_kernel
from ._resize import pad_mode

DEFAULT_FRACTION = 0.85      # of the memory available when the forward starts
TILE_MIN_OUTPUT_BYTES = 128 * 2 ** 20   # below this, tiling is used only when the budget needs it
MIN_BAND_ROWS = 48          # bands below this pay more in per-operation overhead than they save
TILED_EXTRA_FRACTION = 0.4   # a band's working memory, as a fraction of the output's bytes
# At most this many output pixels (batch x rows x width) per band, but at least WIDE_BAND_ROWS
# rows.  A band's kernel maps take up to 49 floats a pixel each (16 MB at this size); larger ones
# get fresh pages from the OS in every band (glibc maps blocks over 32 MB afresh and returns freed
# memory at the heap's top above 64 MB), and the first-touch faults of those pages cost about a
# tenth of the forward at 2048x2048 (180-row bands: 1.1M faults a call; 40-row bands: 0.1M).
BAND_PIXELS = 80_000
WIDE_BAND_ROWS = 16


class MemoryBudgetError(MemoryError):
    """The upsampling would need more memory than the budget (raised before allocating)."""


# --------------------------------------------------------------------------------------- budget
def available_memory(device: torch.device | str | None = None) -> int:
    """Bytes that can be allocated now: on CUDA the free device memory plus what torch's caching
    allocator holds unused; on CPU ``MemAvailable`` of ``/proc/meminfo`` (else the free pages).
    What the CPU ops' buffer cache holds (``ops.cpu_cache_bytes``, at most ``FEATUP_CPU_CACHE_MB``)
    is not counted: it serves only the ops' own requests of about its buffers' sizes."""
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
    ``per_row`` (working memory per output row of a band), ``fixed`` (the guidance pyramid and
    the source-side maps the tiled path keeps whole) and ``row_pixels`` (batch x width: the
    pixels of one output row over the batch)."""
    untiled: int
    tiled_min: int
    output: int
    per_row: int
    fixed: int
    halo_rows: int
    row_pixels: int

    def tiled(self, rows: int) -> int:
        return self.output + self.fixed + self.per_row * (rows + self.halo_rows)

    def band_rows(self, budget: int, H: int) -> int:
        """The band height the tiled path uses for this budget: the rows whose working memory is
        ``TILED_EXTRA_FRACTION`` of the output, at least ``MIN_BAND_ROWS`` (fewer, larger
        operations), but no more than ``BAND_PIXELS`` output pixels (at least ``WIDE_BAND_ROWS``
        rows), and no more than the budget allows (at least 1)."""
        per = max(self.per_row, 1)
        target = int(TILED_EXTRA_FRACTION * self.output - self.fixed) // per - self.halo_rows
        wide = max(WIDE_BAND_ROWS, BAND_PIXELS // max(self.row_pixels, 1))
        fits = (budget - self.output - self.fixed) // per - self.halo_rows
        return int(max(1, min(H, fits, wide, max(target, MIN_BAND_ROWS))))


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
                    int(fixed), halo, B * W)


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


class _Level:
    """Rows of one stage's output, made on request from the level below; keeps the last rows.

    The rows live in one buffer (``[B, C, capacity, W]``); each stage writes its new rows straight
    into it (``adaptive_conv_into``) and the stage above reads slices of it (``bicubic_pad_rows``
    takes a band of a taller map as is), so moving from one band to the next copies only the
    rows both share."""

    def __init__(self, stage, below, guidance: Tensor, size: tuple[int, int], radius: int,
                 like: Tensor):
        self.stage, self.below, self.g, self.r = stage, below, guidance, radius
        self.like = like                                # the source map: batch, channels, dtype
        self.H, self.W = size
        self.h, self.w = below.H, below.W
        self.reflect = pad_mode(self.H, self.W, radius) == "reflect"
        self.buf, self.buf_lo, self.n = None, 0, 0      # rows buf_lo .. buf_lo + n - 1 in buf

    def source_rows(self, lo: int, hi: int) -> tuple[int, int]:
        """The rows of the level below that output rows ``[lo, hi)`` read (padded rows
        ``lo .. hi + 2r`` of the resize)."""
        return source_row_range(self.h, self.H, self.r, self.reflect, lo, hi + 2 * self.r)

    def rows(self, lo: int, hi: int) -> Tensor:
        """``Tensor[B, C, hi - lo, W]``, a view of the buffer (requests must not move backwards)."""
        c_hi = self.buf_lo + self.n
        if self.buf is not None and self.buf_lo <= lo and hi <= c_hi:
            return self.buf[:, :, lo - self.buf_lo:hi - self.buf_lo]
        keep = self.buf is not None and self.buf_lo <= lo < c_hi     # rows lo .. c_hi are made
        start = c_hi if keep else lo                                  # first row to compute
        n_keep = c_hi - lo if keep else 0
        need = hi - lo
        old = self.buf[:, :, lo - self.buf_lo:self.n] if keep else None
        if self.buf is None or need > self.buf.shape[2]:
            cap = min(self.H, need + need // 4)
            buf = self.like.new_empty((self.like.shape[0], self.like.shape[1], cap, self.W))
            if keep:
                buf[:, :, :n_keep].copy_(old)
            self.buf = buf
        elif keep and lo > self.buf_lo:                              # slide the shared rows down
            self.buf[:, :, :n_keep].copy_(old.clone())
        self.compute(start, hi, self.buf[:, :, n_keep:need])
        self.buf_lo, self.n = lo, need
        return self.buf[:, :, :self.n]

    def compute(self, a: int, b: int, out: Tensor, bias: Tensor | None = None) -> None:
        """Output rows ``[a, b)`` (+ ``bias``) written into ``out`` (``[B, C, b - a, W]``)."""
        r, st = self.r, self.stage
        pr = pad_rows(a - r, b + r, self.H, r, self.reflect)          # padded rows a-r .. b+r-1
        s_lo, s_hi = self.source_rows(a, b)
        src = self.below.rows(s_lo, s_hi)                              # [B, C, s_hi - s_lo, w]
        hr_pad = bicubic_pad_rows(src, (self.H, self.W), r, src_rows=self.h, src_row0=s_lo,
                                  row0=a, row1=b + 2 * r)             # [B, C, len(pr), W + 2r]
        del src
        # the kernel of these rows: keys at the padded rows, padded by columns
        gi = torch.tensor(pr, device=self.g.device)
        q = project_keys(st.range_proj, self.g.index_select(2, gi))
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_pad = F.pad(q.to(acc), [r, r, 0, 0], mode="reflect" if self.reflect else "replicate")
        kern = stage_kernel(q_pad, self.g[:, :, a:b], range_temp=st.range_temp,
                            fixup_proj=st.fixup_proj, sigma_spatial=st.sigma_spatial, radius=r)
        k = 2 * r + 1
        B = hr_pad.shape[0]
        adaptive_conv_into(hr_pad, kern.to(hr_pad.dtype).view(B, b - a, self.W, k, k), out,
                           None if bias is None else bias.to(hr_pad.dtype))


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
        level = _Level(st, level, g, size, radius, source)
    H = level.H
    band_rows = max(1, int(band_rows))
    for a in range(0, H, band_rows):
        b = min(H, a + band_rows)
        level.compute(a, b, out[:, :, a:b], bias)     # written in place, the bias added
    return out
