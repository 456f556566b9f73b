"""Random views for multi-view training: reflect pad, zoom, crop back, horizontal flip.

A :class:`Jitter` is sampled once and then applied, identically, to the image and to the upsampled
features (any channel count, same spatial size), so ``jitter(upsample(x))`` can be compared with
``features(jitter(x))``.  Works for any image size and aspect ratio.

    t = sample_jitter((H, W), max_pad=20, max_zoom=2.0, generator=g)
    view = t(images)              # Tensor[B, 3, H, W]
    feats_view = t(hr_features)   # Tensor[B, C, H, W], the same transform
    t.scaled(2)                   # the same transform for inputs twice as large
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Jitter:
    """One view transform for inputs of spatial size ``size = (H, W)``.

    ``pad`` pixels of reflect padding on every side, then a bilinear resize of the padded image to
    ``zoomed`` (= padded size when there is no zoom), a crop of ``size`` at ``(top, left)``, and a
    horizontal flip when ``flip``.
    """

    size: tuple[int, int]
    pad: int
    zoomed: tuple[int, int]
    top: int
    left: int
    flip: bool

    def __call__(self, x: Tensor) -> Tensor:
        return apply_jitter(x, self)

    def scaled(self, factor: int) -> "Jitter":
        """The same geometric transform for inputs ``factor`` times larger (e.g. the image when
        this jitter was sampled at the resolution of half-size features)."""
        f = int(factor)
        if f < 1:
            raise ValueError(f"expected an integer factor >= 1, got {factor}")
        return Jitter((self.size[0] * f, self.size[1] * f), self.pad * f,
                      (self.zoomed[0] * f, self.zoomed[1] * f), self.top * f, self.left * f,
                      self.flip)


def sample_jitter(size: tuple[int, int], max_pad: int = 20, max_zoom: float = 2.0,
                  zoom_prob: float = 0.5, flip_prob: float = 0.5,
                  generator: torch.Generator | None = None) -> Jitter:
    """Draw a random :class:`Jitter` for inputs of spatial ``size = (H, W)``.

    The pad is ``max_pad`` (reduced to ``min(H, W) - 1`` for tiny inputs, since reflect padding
    cannot exceed the input); with probability ``zoom_prob`` the padded image is zoomed by a factor
    drawn uniformly from ``[1, max_zoom]``; the crop position is uniform; the flip has probability
    ``flip_prob``.
    """
    H, W = int(size[0]), int(size[1])
    if H < 1 or W < 1:
        raise ValueError(f"expected a positive size (H, W), got {size}")
    if max_pad < 0 or max_zoom < 1:
        raise ValueError(f"expected max_pad >= 0 and max_zoom >= 1, got max_pad={max_pad}, "
                         f"max_zoom={max_zoom}")
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    pad = min(int(max_pad), H - 1, W - 1)
    ph, pw = H + 2 * pad, W + 2 * pad
    zoom = 1.0 + u[1] * (max_zoom - 1.0) if u[0] < zoom_prob else 1.0
    zh, zw = max(H, round(ph * zoom)), max(W, round(pw * zoom))
    top = min(int(u[2] * (zh - H + 1)), zh - H)
    left = min(int(u[3] * (zw - W + 1)), zw - W)
    return Jitter((H, W), pad, (zh, zw), top, left, u[4] < flip_prob)


def _source_coords(n_out: int, pad: int, n_in: int, zoomed: int, start: int, flip: bool) -> Tensor:
    """Along one axis: the (fractional) input coordinate each output pixel samples, float64.

    Output pixel ``j`` is zoomed pixel ``start + j``; bilinear resizing (``align_corners=False``)
    reads the padded map at ``(start + j + 0.5) * padded / zoomed - 0.5`` (clamped to the map);
    reflect padding mirrors about the first and last pixel centres, and linear interpolation
    commutes with that mirror, so the padded coordinate maps to ``|u - pad|`` mirrored again at
    ``n_in - 1``.
    """
    padded = n_in + 2 * pad
    u = torch.arange(start, start + n_out, dtype=torch.float64)
    if zoomed != padded:
        u = ((u + 0.5) * (padded / zoomed) - 0.5).clamp(0, padded - 1)
    u = (u - pad).abs()
    u = torch.where(u > n_in - 1, 2 * (n_in - 1) - u, u)
    return u.flip(0) if flip else u


def _take_columns(x: Tensor, idx: Tensor) -> Tensor:
    """``x.index_select(-1, idx)`` for the column indices of a crop of a reflect-padded map
    (runs of consecutive columns, each ascending or descending: at most three, two mirrored at
    the edges), as one ``cat`` of slices, flipped where descending: an element-wise gather along
    the last dimension (and its ``index_add_`` backward) is several times slower on CPU.
    Any other index vector falls back to ``index_select``."""
    i = idx.tolist()
    runs, s = [], 0
    while s < len(i):
        e = s + 1
        step = i[e] - i[s] if e < len(i) and abs(i[e] - i[s]) == 1 else 1
        while e < len(i) and i[e] - i[e - 1] == step:
            e += 1
        runs.append((i[s], e - s, step))
        s = e
    if len(runs) > 4:
        return x.index_select(-1, idx.to(x.device))
    return torch.cat([x.narrow(-1, a, n) if step == 1 else x.narrow(-1, a - n + 1, n).flip(-1)
                      for a, n, step in runs], dim=-1)


def apply_jitter(x: Tensor, t: Jitter) -> Tensor:
    """Apply ``t`` to ``Tensor[B, C, H, W]`` (``(H, W)`` must be ``t.size``); differentiable.

    The result equals reflect padding, a bilinear resize of the whole padded map and a crop, but
    only the crop is computed: pad, resize, crop and flip become one input coordinate per output
    row and column, read by ``grid_sample`` (bilinear) when zoomed, and by indexing (exact)
    otherwise.  Zoomed maps are up to ``(2 * max_zoom)^2`` times the crop, so this is several
    times faster, forward and backward.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a tensor of shape [B, C, H, W], got {list(x.shape)}")
    if tuple(x.shape[-2:]) != tuple(t.size):
        raise ValueError(f"this jitter was sampled for spatial size {list(t.size)}, got a tensor "
                         f"of shape {list(x.shape)}")
    H, W = t.size
    uy = _source_coords(H, t.pad, H, t.zoomed[0], t.top, False)
    ux = _source_coords(W, t.pad, W, t.zoomed[1], t.left, t.flip)
    if tuple(t.zoomed) == (H + 2 * t.pad, W + 2 * t.pad):      # integer coordinates: indexing
        # the crop starting at the pad is the unpadded map: rows (and unflipped columns) stay
        y = x if t.top == t.pad else x.index_select(-2, uy.long().to(x.device))
        if t.left == t.pad and not t.flip:
            return y
        return _take_columns(y, ux.long())
    gy = ((2 * uy + 1) / H - 1).to(device=x.device, dtype=x.dtype)
    gx = ((2 * ux + 1) / W - 1).to(device=x.device, dtype=x.dtype)
    grid = torch.stack([gx[None, :].expand(H, W), gy[:, None].expand(H, W)], dim=-1)
    return F.grid_sample(x, grid[None].expand(x.shape[0], -1, -1, -1), mode="bilinear",
                         padding_mode="border", align_corners=False)
