"""timm models (timm >= 1.0).

* ViT / DeiT / DINO / DINOv2 (with and without registers) / EVA: the ``norm`` output
  ``Tensor[B, N, C]`` (= ``forward_features``), minus ``num_prefix_tokens`` (class, registers,
  distillation), laid on the grid ``patch_embed.dynamic_feat_size((H, W))``.
* Swin and other NHWC models (``output_fmt == "NHWC"``): the ``norm`` output ``Tensor[B, h, w, C]``,
  permuted.
* ResNet, ConvNeXt, EfficientNet and any CNN: the module of the last ``feature_info`` entry
  (``layer4``, ``stages.3``, ``blocks.6``), already ``Tensor[B, C, h, w]``.

Input sizes: ViTs and Swin created without ``dynamic_img_size=True`` accept only their ``img_size``;
:meth:`TimmAdapter.check_input` says so before the forward.
"""
from __future__ import annotations

from typing import Optional, Tuple

from torch import Tensor, nn

from . import register_adapter
from .base import Adapter, FeatureSpec, Layer


def _is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and getattr(model, "output_fmt", "NCHW") != "NHWC" and (
        hasattr(model, "num_prefix_tokens") or hasattr(model, "cls_token"))


def _backbone_id(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        return None
    tag = cfg.get("tag")
    return f"timm/{arch}.{tag}" if tag else f"timm/{arch}"


def _feature_info(model: nn.Module):
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)):
        return list(info)
    if info is not None and hasattr(info, "get_dicts"):  # FeatureInfo of features_only models
        return info.get_dicts()
    return []


class TimmAdapter(Adapter):
    ecosystem = "timm"

    def grid_size(self, backbone: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
        patch_embed = getattr(backbone, "patch_embed", None)
        if patch_embed is not None and hasattr(patch_embed, "dynamic_feat_size"):
            return tuple(patch_embed.dynamic_feat_size(tuple(image_size)))
        return super().grid_size(backbone, image_size)

    def check_input(self, backbone: nn.Module, images: Tensor) -> None:
        patch_embed = getattr(backbone, "patch_embed", None)
        if patch_embed is None or getattr(patch_embed, "img_size", None) is None:
            return
        expected = tuple(patch_embed.img_size)
        got = tuple(images.shape[-2:])
        name = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", type(backbone).__name__)
        if getattr(patch_embed, "strict_img_size", False):
            if got != expected:
                raise ValueError(f"timm {name} was created for {expected[0]}x{expected[1]} images and got "
                                 f"{got[0]}x{got[1]}; create it with timm.create_model(..., dynamic_img_size=True) "
                                 "to accept other sizes, or resize the images")
        elif not getattr(patch_embed, "dynamic_img_pad", True) and hasattr(patch_embed, "patch_size"):
            p = tuple(patch_embed.patch_size)
            if got[0] % p[0] or got[1] % p[1]:
                raise ValueError(f"timm {name} accepts only sizes that are multiples of its {p[0]}x{p[1]} patch "
                                 f"and got {got[0]}x{got[1]}; create it with timm.create_model(..., "
                                 "dynamic_img_size=True, dynamic_img_pad=True) to pad other sizes")


@register_adapter("timm")
def build_timm_adapter(model: nn.Module, layer: Optional[Layer]) -> Adapter:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    common = dict(mean=cfg.get("mean", (0.485, 0.456, 0.406)), std=cfg.get("std", (0.229, 0.224, 0.225)),
                  backbone_id=_backbone_id(model))
    info = _feature_info(model)
    tokens = _is_token_model(model)
    nhwc = getattr(model, "output_fmt", "NCHW") == "NHWC"
    prefix = getattr(model, "num_prefix_tokens", None) if tokens else 0
    patch = None
    if hasattr(model, "patch_embed") and hasattr(model.patch_embed, "patch_size"):
        patch = int(model.patch_embed.patch_size[0])

    if layer is None:
        if tokens or nhwc:
            if not hasattr(model, "norm"):
                raise ValueError(f"timm {type(model).__name__} has no 'norm' module to read features from; "
                                 "pass layer=<module name>")
            stride = info[-1]["reduction"] if (nhwc and info) else patch
            spec = FeatureSpec("norm", "tokens" if tokens else "nhwc", int(model.num_features), stride,
                               prefix if tokens else 0, **common)
        elif info:
            last = info[-1]
            spec = FeatureSpec(last["module"], "nchw", int(last["num_chs"]), int(last["reduction"]), 0, **common)
        else:
            raise ValueError(f"timm {type(model).__name__} has no feature_info to find its last feature stage; "
                             "pass layer=<module name>")
        return TimmAdapter(spec)

    known = {d["module"]: d for d in info}.get(layer.name, {})
    layout = layer.layout
    if layout == "auto":
        layout = "nhwc" if nhwc else "auto"
    stride = layer.patch_size or known.get("reduction") or (patch if tokens else None)
    spec = FeatureSpec(layer.name, layout, layer.channels or known.get("num_chs"), stride,
                       layer.num_prefix_tokens if layer.num_prefix_tokens is not None else prefix,
                       layer.select, **common)
    return TimmAdapter(spec)
