"""open_clip image towers (open_clip_torch >= 2.24).

Wrap either a full ``CLIP`` / ``CustomTextCLIP`` model (only its ``visual`` tower runs) or the
tower itself.

* ``VisionTransformer``: the tokens after ``ln_post`` and before ``proj`` (``Tensor[B, N, C]``,
  class token dropped), on the grid ``(H // patch, W // patch)``. Its positional embedding has a
  fixed size, so only ``visual.image_size`` inputs are accepted (build the tower with a non-square
  ``image_size`` for non-square inputs). Towers with ``final_ln_after_pool`` give the
  ``transformer`` output (their tokens are never normalized); attention-pool towers need ``layer=``.
* ``ModifiedResNet`` (RN50 ...): ``layer4`` (stride 32). The neck runs the stem and the four
  stages itself and skips ``attnpool``, so any input size works.
* ``TimmModel`` towers: read as timm reads the ``trunk``.

``layer="proj"`` gives the ViT tokens projected to the embedding space (``tokens @ visual.proj``,
e.g. 512 channels for ViT-B-16): the features FeatUp's released CLIP upsampler was trained on.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import Tensor, nn

from . import register_adapter
from .base import CLIP_MEAN, CLIP_STD, Adapter, FeatureSpec, Layer


def _visual(model: nn.Module) -> Tuple[nn.Module, str]:
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module):
        return visual, "visual."
    return model, ""


def _norm(visual: nn.Module):
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN
    std = cfg.get("std") or getattr(visual, "image_std", None) or CLIP_STD
    return tuple(mean), tuple(std)


class OpenClipAdapter(Adapter):
    ecosystem = "open_clip"

    def __init__(self, spec: FeatureSpec, visual_path: str, resnet_stages: bool = False,
                 inner: Optional[Adapter] = None, inner_path: str = "", project: bool = False):
        super().__init__(spec)
        self.project = project  # multiply the tokens by visual.proj
        self.visual_path = visual_path.rstrip(".")
        self.resnet_stages = resnet_stages
        self.inner = inner  # the timm adapter of a TimmModel trunk
        self.inner_path = inner_path

    def _tower(self, backbone: nn.Module) -> nn.Module:
        return backbone.get_submodule(self.visual_path) if self.visual_path else backbone

    def call(self, backbone: nn.Module, images: Tensor) -> Any:
        visual = self._tower(backbone)
        if self.resnet_stages:
            x = visual.stem(images)
            for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
                x = stage(x)
            return x
        return visual(images)

    def to_map(self, features: Tensor, backbone: nn.Module, image_size: Tuple[int, int]) -> Tensor:
        if self.project:
            features = features @ self._tower(backbone).proj  # [B, N, width] -> [B, N, embed_dim]
        return super().to_map(features, backbone, image_size)

    def grid_size(self, backbone: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
        if self.inner is not None:
            return self.inner.grid_size(backbone.get_submodule(self.inner_path), image_size)
        patch = getattr(self._tower(backbone), "patch_size", None)
        if patch is not None:
            return image_size[0] // patch[0], image_size[1] // patch[1]
        return super().grid_size(backbone, image_size)

    def check_input(self, backbone: nn.Module, images: Tensor) -> None:
        if self.inner is not None:
            return self.inner.check_input(backbone.get_submodule(self.inner_path), images)
        visual = self._tower(backbone)
        if self.resnet_stages or not hasattr(visual, "positional_embedding"):
            return
        expected = tuple(visual.image_size)
        got = tuple(images.shape[-2:])
        if got != expected:
            raise ValueError(f"this open_clip {type(visual).__name__} accepts only {expected[0]}x{expected[1]} "
                             f"images (its positional embedding has a fixed size), got {got[0]}x{got[1]}; resize "
                             "the images or build the tower with that image_size")


@register_adapter("open_clip")
def build_open_clip_adapter(model: nn.Module, layer: Optional[Layer]) -> Adapter:
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    visual, path = _visual(model)
    mean, std = _norm(visual)
    common = dict(mean=mean, std=std, input_module=path.rstrip("."),
                  backbone_id=f"open_clip/{type(visual).__name__}")
    is_vit = isinstance(visual, VisionTransformer)
    patch = int(visual.patch_size[0]) if is_vit else None
    width = int(visual.conv1.out_channels) if is_vit else None

    if layer is not None and layer.name in ("proj", f"{path}proj"):
        if not is_vit or getattr(visual, "proj", None) is None or getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"layer='proj' needs an open_clip VisionTransformer with a proj matrix, got "
                             f"{type(visual).__name__}")
        module = "transformer" if getattr(visual, "final_ln_after_pool", False) else "ln_post"
        spec = FeatureSpec(path + module, "tokens", int(visual.proj.shape[1]), patch, 1, **common)
        return OpenClipAdapter(spec, path, project=True)
    if layer is not None:
        prefix = layer.num_prefix_tokens if layer.num_prefix_tokens is not None else (1 if is_vit else None)
        spec = FeatureSpec(layer.name, layer.layout, layer.channels, layer.patch_size or patch, prefix,
                           layer.select, **common)
        return OpenClipAdapter(spec, path)

    if is_vit:
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("open_clip towers with attentional pooling mix tokens before ln_post; pass "
                             f"layer=Layer('{path}transformer', layout='tokens', num_prefix_tokens=1)")
        module = "transformer" if getattr(visual, "final_ln_after_pool", False) else "ln_post"
        spec = FeatureSpec(path + module, "tokens", width, patch, 1, **common)
        return OpenClipAdapter(spec, path)
    if isinstance(visual, ModifiedResNet):
        channels = int(visual.layer4[-1].bn3.num_features)
        spec = FeatureSpec(path + "layer4", "nchw", channels, 32, 0,
                           **{**common, "input_module": path + "conv1"})
        return OpenClipAdapter(spec, path, resnet_stages=True)
    if isinstance(visual, TimmModel):
        from .timm import build_timm_adapter

        inner = build_timm_adapter(visual.trunk, None)
        s = inner.spec
        spec = s.replace(module=f"{path}trunk.{s.module}" if s.module else f"{path}trunk",
                         input_module=path.rstrip("."), mean=mean, std=std, backbone_id=common["backbone_id"])
        return OpenClipAdapter(spec, path, inner=inner, inner_path=f"{path}trunk")
    raise ValueError(f"open_clip tower {type(visual).__name__} is not known to featup_adapters; pass "
                     "layer=<module name> (e.g. layer=Layer('visual.transformer', layout='tokens', ...))")
