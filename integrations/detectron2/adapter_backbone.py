"""A bottom-up detectron2 Backbone made from any featup_adapters backbone (timm, HF, open_clip, ...).

Registered as ``build_featup_adapter_backbone``; used as ``MODEL.FEATUP.BOTTOM_UP`` with
``MODEL.FEATUP.ADAPTER.SPEC`` naming the model (e.g. "timm:vit_small_patch16_224"). It returns one
feature map, ``{ADAPTER.OUT_FEATURE: Tensor[B, C, h, w]}``, the features featup_adapters hooks (the
ones a pretrained FeatUp upsampler for that backbone was trained on).
"""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone

from .backbone import GuidanceNorm, register_once

__all__ = ["AdapterBottomUp", "build_featup_adapter_backbone"]


class AdapterBottomUp(Backbone):
    """detectron2 view of a ``featup_adapters`` neck's low-resolution features.

    Args:
        neck: a ``featup_adapters.FeatUpNeck`` (only its ``.features`` / ``.feature_dim`` / ``.stride``
            are used here; the upsampling is ``FeatUpBackbone``'s job).
        input_norm: maps detectron2's normalized input to the backbone's own normalization.
        out_feature: name of the returned feature map.

    ``forward(x: Tensor[B, 3, H, W]) -> {out_feature: Tensor[B, C, h, w]}``.
    """

    def __init__(self, neck: nn.Module, input_norm: nn.Module, out_feature: str = "last"):
        super().__init__()
        self.neck = neck
        self.input_norm = input_norm
        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: int(neck.feature_dim)}
        self._out_feature_strides = {out_feature: int(neck.stride)}

    @property
    def size_divisibility(self) -> int:
        # pad to a multiple of the patch / stride so that every pixel lies in a whole patch
        return self._out_feature_strides[self._out_features[0]]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {self._out_features[0]: self.neck.features(self.input_norm(x))}


def _to_255(values):
    values = [float(v) for v in values]
    return [v * 255.0 for v in values] if max(abs(v) for v in values) <= 1.0 else values


@register_once
def build_featup_adapter_backbone(cfg, input_shape: ShapeSpec) -> AdapterBottomUp:
    """Build ``AdapterBottomUp`` from ``cfg.MODEL.FEATUP.ADAPTER`` (random init unless the spec says otherwise)."""
    import featup_adapters

    ac = cfg.MODEL.FEATUP.ADAPTER
    from featup_adapters.adapters import create_backbone

    kwargs = {k: v for k, v in dict(ac.KWARGS).items()}
    model = create_backbone(ac.SPEC, pretrained=bool(ac.PRETRAINED), **kwargs)
    neck = featup_adapters.wrap(model, upsampler="bilinear", layer=ac.LAYER or None)
    mean, std = _to_255(neck.mean), _to_255(neck.std)
    norm = GuidanceNorm(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT, mean, std)
    return AdapterBottomUp(neck, norm, ac.OUT_FEATURE)
