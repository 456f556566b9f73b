"""Parameter-free baselines with the JBU call signature: bilinear, bicubic, nearest.

``forward(source: Tensor[B, C, h, w], guidance: Tensor[B, *, H, W] | None = None,
output_size=None) -> Tensor[B, C, H', W']``; the guidance only gives the default output size.
Bilinear and bicubic use ``align_corners=False`` (FeatUp's and timm's convention); "nearest" is
``nearest-exact`` (pixel centres, no half-pixel shift).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import UpsamplerMixin, check_upsampler_inputs, register_upsampler_class

__all__ = ["InterpolateUpsampler", "BASELINES"]

# kind -> F.interpolate mode
BASELINES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact"}


@register_upsampler_class
class InterpolateUpsampler(UpsamplerMixin, nn.Module):
    """Resize the features to the output size with ``F.interpolate`` (no parameters).

    Example:
        >>> up = InterpolateUpsampler("bilinear")
        >>> up(torch.randn(2, 8, 14, 14), torch.randn(2, 3, 224, 224)).shape
        torch.Size([2, 8, 224, 224])
    """

    def __init__(self, kind: str = "bilinear"):
        super().__init__()
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline upsampler {kind!r}; expected one of "
                             f"{sorted(BASELINES)}")
        self.kind = kind
        self.dim = None            # works with any channel count
        self.config = {}

    def init_kwargs(self) -> dict:
        return {"kind": self.kind}

    def forward(self, source: Tensor, guidance: Tensor | None = None, output_size=None) -> Tensor:
        H, W = check_upsampler_inputs(source, guidance, output_size, who=f"{self.kind} upsampler")
        mode = BASELINES[self.kind]
        kwargs = {} if mode.startswith("nearest") else {"align_corners": False}
        return F.interpolate(source, (H, W), mode=mode, **kwargs)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"
