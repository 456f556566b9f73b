"""Hugging Face transformers vision models (transformers >= 4.40).

The features are each model's ``last_hidden_state`` as the model computes it:

============================  =====================  ===================================
model type                    hooked module          prefix tokens
============================  =====================  ===================================
vit, deit                     ``layernorm``          1 (cls), deit 2 (cls + distillation)
dinov2                        ``layernorm``          1
dinov2_with_registers         ``layernorm``          1 + ``num_register_tokens``
siglip (vision)               ``post_layernorm``     0 (no cls token)
clip (vision)                 ``encoder``            1 (``last_hidden_state`` is BEFORE post_layernorm)
convnext, convnextv2          ``encoder``            ``Tensor[B, C, h, w]``
AutoBackbone models           the model itself       ``feature_maps[-1]``, ``Tensor[B, C, h, w]``
============================  =====================  ===================================

Token grids are ``(H // patch_size, W // patch_size)``; the backbone is called with
``interpolate_pos_encoding=True`` where its forward accepts it, so any input size works.
Full CLIP / SigLIP models (with a text tower) are read through their ``vision_model``.
Module names are found by their last component, as transformers versions nest them differently.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import Tensor, nn

from . import register_adapter
from .base import CLIP_MEAN, CLIP_STD, HALF, IMAGENET_MEAN, IMAGENET_STD, Adapter, FeatureSpec, Layer

# model_type -> (module name, layout, select, extra prefix tokens beyond the cls token or None = 0 total)
_KNOWN = {
    "vit": ("layernorm", "tokens", None, 1),
    "deit": ("layernorm", "tokens", None, 2),
    "dinov2": ("layernorm", "tokens", None, 1),
    "dinov2_with_registers": ("layernorm", "tokens", None, 1),  # + num_register_tokens
    "siglip_vision_model": ("post_layernorm", "tokens", None, 0),
    "siglip2_vision_model": ("post_layernorm", "tokens", None, 0),
    "clip_vision_model": ("encoder", "tokens", "last_hidden_state", 1),
    "convnext": ("encoder", "nchw", "last_hidden_state", 0),
    "convnextv2": ("encoder", "nchw", "last_hidden_state", 0),
}
# the defaults of each model's image processor
_NORM = {
    "vit": (HALF, HALF), "siglip_vision_model": (HALF, HALF), "siglip2_vision_model": (HALF, HALF),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD),
}


def _find_module(model: nn.Module, leaf: str, under: str) -> str:
    """Dotted name of the shallowest module called ``leaf`` inside ``under``."""
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] == leaf and n.startswith(under)]
    if not names:
        raise ValueError(f"found no module named {leaf!r} in {type(model).__name__}; pass layer=<module name>")
    return min(names, key=lambda n: n.count("."))


class TransformersAdapter(Adapter):
    ecosystem = "transformers"

    def __init__(self, spec: FeatureSpec, call_path: str = "", interpolate: bool = False):
        super().__init__(spec)
        self.call_path = call_path  # "" = the model, "vision_model" for CLIP/SigLIP with text towers
        self.interpolate = interpolate

    def call(self, backbone: nn.Module, images: Tensor) -> Any:
        target = backbone.get_submodule(self.call_path) if self.call_path else backbone
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        return target(pixel_values=images, **kwargs)


def _accepts_interpolate(module: nn.Module) -> bool:
    try:
        return "interpolate_pos_encoding" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_backbone(model: nn.Module) -> bool:
    return hasattr(model, "out_features") and hasattr(model, "channels") and hasattr(model, "stage_names")


@register_adapter("transformers")
def build_transformers_adapter(model: nn.Module, layer: Optional[Layer]) -> Adapter:
    config = getattr(model, "config", None)
    call_path = ""
    if config is not None and getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
        call_path, config = "vision_model", config.vision_config
    model_type = getattr(config, "model_type", None)
    if model_type in ("clip", "siglip", "siglip2"):
        model_type = f"{model_type}_vision_model"
    caller = model.get_submodule(call_path) if call_path else model
    interpolate = _accepts_interpolate(caller)
    patch = getattr(config, "patch_size", None)
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch) if patch is not None else None
    mean, std = _NORM.get(model_type, (IMAGENET_MEAN, IMAGENET_STD))
    # backbone ids follow hub repo ids ("facebook/dinov2-small", like "timm/vit_small_patch16_224.dino");
    # a model built from a bare config is "hf/<model_type>"
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "")
    common = dict(mean=mean, std=std, input_module=call_path, backbone_id=name_or_path or f"hf/{model_type}")
    hidden = getattr(config, "hidden_size", None)
    if hidden is None and getattr(config, "hidden_sizes", None):
        hidden = config.hidden_sizes[-1]

    if layer is None:
        if _is_backbone(model):
            stride = patch if model_type in ("dinov2", "dinov2_with_registers", "vit") else None
            spec = FeatureSpec("", "nchw", int(model.channels[-1]), stride, 0, "feature_maps", **common)
            return TransformersAdapter(spec, call_path, interpolate)
        if model_type not in _KNOWN:
            raise ValueError(
                f"transformers model type {model_type!r} ({type(model).__name__}) is not known to featup_adapters "
                f"(known: {sorted(_KNOWN)}, and AutoBackbone models); pass layer=<module name> or "
                "layer=Layer(name, layout='tokens', num_prefix_tokens=..., patch_size=..., select=...)")
        leaf, layout, select, prefix = _KNOWN[model_type]
        if model_type == "dinov2_with_registers":
            prefix += int(config.num_register_tokens)
        module = _find_module(model, leaf, call_path)
        stride = patch if layout == "tokens" else 32
        spec = FeatureSpec(module, layout, hidden, stride, prefix, select, **common)
        return TransformersAdapter(spec, call_path, interpolate)

    prefix = layer.num_prefix_tokens
    if prefix is None and model_type in _KNOWN and _KNOWN[model_type][1] == "tokens":
        prefix = _KNOWN[model_type][3] + int(getattr(config, "num_register_tokens", 0) or 0)
    select = layer.select
    spec = FeatureSpec(layer.name, layer.layout, layer.channels, layer.patch_size or patch, prefix,
                       select, **common)
    return TransformersAdapter(spec, call_path, interpolate)

