"""Learned downsamplers: high-res features back to the backbone's grid (spec section 5).

Both take ``hr[B, C, H, W]`` and an output size ``(h, w)`` (the backbone's feature grid). The input is
first resized (bilinear) to ``(h * k, w * k)`` with ``k = kernel_size`` (normally the backbone's
stride) unless it already has that size, then every output cell pools one k x k patch. So any
aspect ratio and any stride work, also sizes that are not multiples of the stride.

- :class:`SimpleDownsampler`: one learned non-negative kernel (``|w| / sum |w|``) shared by all
  patches and channels.
- :class:`AttentionDownsampler`: per patch a softmax over the k x k taps of logits from a 1x1
  projection of the (optionally Gaussian-blurred) features, times a learned per-tap weight plus bias.

Training compares only random projections ``P @ D(t(F_hr))`` of the prediction, and both
downsamplers pool every channel with the same weights, so they also run on projected features
(``linear_inputs`` / ``forward_projected``): the values ``P @ F_hr`` and, for the attention
downsampler, the one-channel map its logits come from (its 1x1 projection commutes with the blur,
the resize and the jitter, which are all linear, channel-wise and keep constants).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _to_patches(hr: Tensor, out_size: tuple[int, int], k: int) -> Tensor:
    """``Tensor[B, C, H, W]`` -> ``Tensor[B, C, h, w, k*k]`` (non-overlapping k x k patches)."""
    if hr.dim() != 4:
        raise ValueError(f"expected features of shape [B, C, H, W], got {list(hr.shape)}")
    h, w = int(out_size[0]), int(out_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"expected a positive output size (h, w), got {out_size}")
    B, C = hr.shape[:2]
    if tuple(hr.shape[-2:]) != (h * k, w * k):
        hr = F.interpolate(hr, size=(h * k, w * k), mode="bilinear", align_corners=False)
    return hr.reshape(B, C, h, k, w, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, h, w, k * k)


class SimpleDownsampler(nn.Module):
    """Blur-and-subsample with one learned kernel.

    Args:
        kernel_size: patch size k (the backbone's stride / patch size).

    Shape:
        ``forward(hr: Tensor[B, C, H, W], out_size=(h, w)) -> Tensor[B, C, h, w]``
    """

    def __init__(self, kernel_size: int):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"expected kernel_size >= 1, got {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.kernel_params = nn.Parameter(torch.ones(self.kernel_size, self.kernel_size))

    def kernel(self) -> Tensor:
        """The normalized non-negative kernel, ``Tensor[k, k]`` summing to 1."""
        w = self.kernel_params.abs()
        return w / w.sum().clamp_min(1e-12)

    def forward(self, hr: Tensor, out_size: tuple[int, int], guidance: Tensor | None = None
                ) -> Tensor:
        patches = _to_patches(hr, out_size, self.kernel_size)
        return patches @ self.kernel().reshape(-1).to(patches.dtype)

    def linear_inputs(self):
        """The linear maps of the features besides the values that pooling needs: none (``()``;
        None would mean pooling needs the full features)."""
        return ()

    def forward_projected(self, values: Tensor, extra: Tensor | None, out_size) -> Tensor:
        """``forward`` on ``values = P @ hr`` (``Tensor[B, n, H, W]``): equals ``P @ forward(hr)``."""
        return self.forward(values, out_size)


class AttentionDownsampler(nn.Module):
    """Per-patch attention pooling.

    Args:
        dim: feature channels C.
        kernel_size: patch size k (the backbone's stride / patch size).
        blur_attn: compute the attention logits from Gaussian-blurred features (sigma = 1 px).
        dropout: dropout on the features the logits are projected from (FeatUp's code drops
            them; 0 turns it off, which lets training run on projected features).

    Shape:
        ``forward(hr: Tensor[B, C, H, W], out_size=(h, w)) -> Tensor[B, C, h, w]``
    """

    def __init__(self, dim: int, kernel_size: int, blur_attn: bool = True, dropout: float = 0.1):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"expected kernel_size >= 1, got {kernel_size}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        self.dim = int(dim)
        self.kernel_size = int(kernel_size)
        self.blur_attn = blur_attn
        self.attention_net = nn.Sequential(nn.Dropout(float(dropout)), nn.Conv2d(dim, 1, 1))
        self.w = nn.Parameter(torch.ones(kernel_size * kernel_size))
        self.b = nn.Parameter(torch.zeros(kernel_size * kernel_size))

    @staticmethod
    def _blur(x: Tensor, sigma: float = 1.0) -> Tensor:
        r = 2
        t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
        g = torch.exp(-t * t / (2 * sigma * sigma))
        g = g / g.sum()
        C = x.shape[1]
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
        return F.conv2d(x, g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)

    def forward(self, hr: Tensor, out_size: tuple[int, int], guidance: Tensor | None = None
                ) -> Tensor:
        if hr.dim() != 4 or hr.shape[1] != self.dim:
            raise ValueError(f"expected features of shape [B, {self.dim}, H, W], got {list(hr.shape)}")
        k = self.kernel_size
        h, w = int(out_size[0]), int(out_size[1])
        if tuple(hr.shape[-2:]) != (h * k, w * k):
            hr = F.interpolate(hr, size=(h * k, w * k), mode="bilinear", align_corners=False)
        src = self._blur(hr) if self.blur_attn else hr
        return self._attend(hr, self.attention_net(src), (h, w))

    def _attend(self, values: Tensor, logit_map: Tensor, out_size) -> Tensor:
        """Pool ``values[B, n, h*k, w*k]`` by the softmax over each patch of ``logit_map[B, 1, ...]``
        (times ``w``, plus ``b``)."""
        k = self.kernel_size
        logits = _to_patches(logit_map, out_size, k)[:, 0]                # [B, h, w, k*k]
        attn = torch.softmax(logits * self.w + self.b, dim=-1)
        patches = _to_patches(values, out_size, k)                        # [B, n, h, w, k*k]
        return torch.einsum("bchwn,bhwn->bchw", patches, attn)

    def linear_inputs(self):
        """``(weight: Tensor[1, C], bias: Tensor[1])`` of the logit projection, or None while
        dropout acts on its input (then only the full features give the same logits)."""
        drop, conv = self.attention_net[0], self.attention_net[1]
        if self.training and drop.p > 0:
            return None
        return conv.weight[:, :, 0, 0], conv.bias

    def forward_projected(self, values: Tensor, extra: Tensor, out_size) -> Tensor:
        """``forward`` from projections: ``values = P @ hr`` (``Tensor[B, n, H, W]``) and
        ``extra = w @ hr + b`` (``Tensor[B, 1, H, W]``, from :meth:`linear_inputs`); equals
        ``P @ forward(hr)`` (to float rounding) whenever :meth:`linear_inputs` is not None."""
        if values.dim() != 4 or extra is None or extra.dim() != 4 or extra.shape[1] != 1 \
                or extra.shape[0] != values.shape[0] or extra.shape[-2:] != values.shape[-2:]:
            raise ValueError(f"expected values [B, n, H, W] and logit inputs [B, 1, H, W], got "
                             f"{list(values.shape)} and "
                             f"{None if extra is None else list(extra.shape)}")
        k = self.kernel_size
        h, w = int(out_size[0]), int(out_size[1])
        both = torch.cat([values, extra.to(values.dtype)], dim=1)
        if tuple(both.shape[-2:]) != (h * k, w * k):
            both = F.interpolate(both, size=(h * k, w * k), mode="bilinear", align_corners=False)
        values, src = both[:, :-1], both[:, -1:]
        return self._attend(values, self._blur(src) if self.blur_attn else src, (h, w))


def make_downsampler(kind: str, dim: int, kernel_size: int, dropout: float = 0.1) -> nn.Module:
    """``"simple"`` or ``"attention"`` (``dropout``: the attention downsampler's)."""
    if kind == "simple":
        return SimpleDownsampler(kernel_size)
    if kind == "attention":
        return AttentionDownsampler(dim, kernel_size, dropout=dropout)
    raise ValueError(f"expected downsampler 'simple' or 'attention', got {kind!r}")
