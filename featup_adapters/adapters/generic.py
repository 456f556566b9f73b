"""torchvision and any other ``nn.Module``: the user names the layer and, for tokens, the layout.

    wrap(torchvision.models.resnet50(), "bilinear", layer="layer4")            # Tensor[B, C, h, w]
    wrap(torchvision.models.vit_b_16(), "bilinear",
         layer=Layer("encoder.ln", layout="tokens", num_prefix_tokens=1, patch_size=16))

The backbone is called as ``backbone(images)``; its mean/std default to ImageNet's (register the
backbone with :func:`~featup_adapters.register_backbone` to declare others).
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from . import register_adapter
from .base import Adapter, FeatureSpec, Layer


@register_adapter("generic")
def build_generic_adapter(model: nn.Module, layer: Optional[Layer]) -> Adapter:
    if layer is None:
        from . import _unsupported

        raise _unsupported(model)
    spec = FeatureSpec(layer.name, layer.layout, layer.channels, layer.patch_size,
                       layer.num_prefix_tokens if layer.num_prefix_tokens is not None else 0, layer.select)
    return Adapter(spec)
