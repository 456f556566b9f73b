"""``FeatUpBackbone``: a detectron2 Backbone that upsamples a bottom-up backbone's features with FeatUp.

The image detectron2 hands to ``forward(x)`` (already normalized with ``MODEL.PIXEL_MEAN/STD``) is the
guidance of the joint bilateral upsampler, converted to the normalization the upsampler expects
(``MODEL.FEATUP.GUIDANCE_PIXEL_MEAN/STD``). Use it in a config with
``MODEL.BACKBONE.NAME: "build_featup_backbone"`` after ``add_featup_config(cfg)``.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

__all__ = ["FeatUpBackbone", "GuidanceNorm", "build_featup_backbone"]

_BASELINES = ("bilinear", "bicubic", "nearest")


class GuidanceNorm(nn.Module):
    """Per-channel affine map from detectron2's normalized input to the upsampler's guidance.

    ``x`` was normalized as ``(img - src_mean) / src_std`` with channels in ``input_format`` order
    ("BGR" or "RGB", 0-255 scale); the output is ``(img_rgb - dst_mean) / dst_std`` (RGB order).
    Empty ``dst_mean``/``dst_std`` make it the identity.

    Shape: ``Tensor[B, 3, H, W] -> Tensor[B, 3, H, W]``.
    """

    def __init__(self, src_mean: Sequence[float], src_std: Sequence[float], input_format: str,
                 dst_mean: Sequence[float] = (), dst_std: Sequence[float] = ()):
        super().__init__()
        self.identity = len(dst_mean) == 0 and len(dst_std) == 0
        if self.identity:
            return
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"expected INPUT.FORMAT 'BGR' or 'RGB' for FeatUp guidance, got {input_format!r}")
        for name, v in (("MODEL.PIXEL_MEAN", src_mean), ("MODEL.PIXEL_STD", src_std),
                        ("MODEL.FEATUP.GUIDANCE_PIXEL_MEAN", dst_mean),
                        ("MODEL.FEATUP.GUIDANCE_PIXEL_STD", dst_std)):
            if len(v) != 3:
                raise ValueError(f"expected 3 values in {name}, got {list(v)}")
        perm = [2, 1, 0] if input_format == "BGR" else [0, 1, 2]
        s = torch.tensor([float(src_std[p]) for p in perm])
        m = torch.tensor([float(src_mean[p]) for p in perm])
        dm, ds = torch.tensor([float(v) for v in dst_mean]), torch.tensor([float(v) for v in dst_std])
        self.register_buffer("perm", torch.tensor(perm), persistent=False)
        self.register_buffer("scale", (s / ds).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((m - dm) / ds).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch of shape [B, 3, H, W], got {list(x.shape)}")
        if self.identity:
            return x
        return x[:, self.perm] * self.scale.to(x.dtype) + self.shift.to(x.dtype)


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of ``Tensor[B, C, h, w]`` (FeatUp's "use_norm")."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def make_feature_upsampler(kind: str, dim: int, *, stages: int = 4) -> nn.Module:
    """An upsampler module with ``forward(source, guidance, output_size)`` for ``dim`` channels.

    ``kind``: "jbu" (new FeatUp JBU stack), "bilinear" / "bicubic" / "nearest", or a directory /
    registered name understood by ``featup_adapters.hub.load_upsampler``.
    """
    from featup_adapters import upsamplers

    if kind == "jbu":
        return upsamplers.JBUStack(dim, num_stages=stages)
    if kind in _BASELINES:
        return upsamplers.make_upsampler(kind)
    from featup_adapters import hub

    up = hub.load_upsampler(kind)
    if hasattr(hub, "check_compatible"):
        hub.check_compatible(up, dim=dim, backbone_id=None)
    elif getattr(up, "dim", dim) != dim:
        raise ValueError(f"upsampler {kind!r} has {up.dim} channels, the feature has {dim}")
    return up


class FeatUpBackbone(Backbone):
    """Wrap a bottom-up detectron2 ``Backbone``; return its ``in_features`` upsampled by FeatUp.

    Args:
        bottom_up: any detectron2 Backbone (ResNet, FPN, the featup_adapters bottom-up wrapper, ...).
        in_features: names of bottom-up outputs to upsample; output ``"<name>_up"`` for each.
        upsamplers: one module per in-feature, ``forward(source, guidance, output_size=...)``.
        out_stride: stride of the upsampled features w.r.t. the (padded) input image.
        guidance: maps the backbone input to the upsampler's guidance normalization.
        keep_bottom_up_features: also return the bottom-up features unchanged.
        use_norm: LayerNorm over channels before upsampling.

    ``forward(x: Tensor[B, 3, H, W]) -> {"<name>_up": Tensor[B, C, ceil(H/s), ceil(W/s)], ...}``.
    """

    def __init__(self, bottom_up: Backbone, in_features: Sequence[str], upsamplers: Sequence[nn.Module],
                 *, out_stride: int = 4, guidance: Optional[nn.Module] = None,
                 keep_bottom_up_features: bool = False, use_norm: bool = False):
        super().__init__()
        shapes = bottom_up.output_shape()
        in_features = list(in_features)
        if not in_features:
            raise ValueError("expected at least one bottom-up feature in MODEL.FEATUP.IN_FEATURES, got []")
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"expected MODEL.FEATUP.IN_FEATURES among the bottom-up outputs "
                             f"{sorted(shapes)}, got {in_features}")
        if len(upsamplers) != len(in_features):
            raise ValueError(f"expected one upsampler per in-feature ({len(in_features)}), got {len(upsamplers)}")
        if int(out_stride) < 1:
            raise ValueError(f"expected MODEL.FEATUP.OUT_STRIDE >= 1, got {out_stride}")
        for f in in_features:
            if shapes[f].stride is not None and shapes[f].stride < out_stride:
                raise ValueError(f"expected MODEL.FEATUP.OUT_STRIDE <= stride of {f!r} ({shapes[f].stride}), "
                                 f"got {out_stride}")
        self.bottom_up = bottom_up
        self.in_features = in_features
        self.out_stride = int(out_stride)
        self.upsamplers = nn.ModuleDict({f: u for f, u in zip(in_features, upsamplers)})
        self.norms = nn.ModuleDict({f: _ChannelNorm(shapes[f].channels) for f in in_features}) if use_norm else None
        self.guidance = guidance if guidance is not None else nn.Identity()
        self.keep_bottom_up_features = keep_bottom_up_features

        self._out_features: List[str] = []
        self._out_feature_channels: Dict[str, int] = {}
        self._out_feature_strides: Dict[str, int] = {}
        if keep_bottom_up_features:
            for name in getattr(bottom_up, "_out_features", None) or list(shapes):
                self._out_features.append(name)
                self._out_feature_channels[name] = shapes[name].channels
                self._out_feature_strides[name] = shapes[name].stride
        for f in in_features:
            name = f + "_up"
            self._out_features.append(name)
            self._out_feature_channels[name] = shapes[f].channels
            self._out_feature_strides[name] = self.out_stride

    @property
    def size_divisibility(self) -> int:
        return max(self.bottom_up.size_divisibility, self.out_stride)

    @property
    def padding_constraints(self) -> Dict[str, int]:
        pc = dict(self.bottom_up.padding_constraints)
        pc["size_divisibility"] = max(pc.get("size_divisibility", 0), self.size_divisibility)
        return pc

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """``x: Tensor[B, 3, H, W]`` (normalized by detectron2) -> dict of feature maps."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch of shape [B, 3, H, W], got {list(x.shape)}")
        feats = self.bottom_up(x)
        guidance = self.guidance(x)
        size = (math.ceil(x.shape[-2] / self.out_stride), math.ceil(x.shape[-1] / self.out_stride))
        out: Dict[str, Tensor] = {}
        if self.keep_bottom_up_features:
            out.update({k: feats[k] for k in self._out_features if k in feats})
        for f in self.in_features:
            src = feats[f]
            if self.norms is not None:
                src = self.norms[f](src)
            out[f + "_up"] = self.upsamplers[f](src, guidance.to(src.dtype), output_size=size)
        return out


def register_once(fn):
    """``BACKBONE_REGISTRY.register()`` that tolerates a second import of this package under its
    other name (``integrations.detectron2`` from the clone's root, ``featup_adapters.integrations.
    detectron2`` when installed): the builder registered first is kept."""
    if fn.__name__ not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(fn)
    return fn


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


@register_once
def build_featup_backbone(cfg, input_shape: ShapeSpec) -> FeatUpBackbone:
    """Build ``FeatUpBackbone`` from ``cfg.MODEL.FEATUP`` (see ``add_featup_config``)."""
    if "FEATUP" not in cfg.MODEL:
        raise KeyError("cfg.MODEL.FEATUP is missing: call featup_adapters.integrations.detectron2.add_featup_config(cfg) "
                       "before merging a FeatUp config")
    fc = cfg.MODEL.FEATUP
    if fc.BOTTOM_UP == "build_featup_backbone":
        raise ValueError("expected MODEL.FEATUP.BOTTOM_UP to name a bottom-up backbone, got build_featup_backbone")
    if fc.BOTTOM_UP not in BACKBONE_REGISTRY:
        raise KeyError(f"expected MODEL.FEATUP.BOTTOM_UP in BACKBONE_REGISTRY "
                       f"({sorted(k for k, _ in BACKBONE_REGISTRY)}), got {fc.BOTTOM_UP!r}")
    bottom_up = BACKBONE_REGISTRY.get(fc.BOTTOM_UP)(cfg, input_shape)
    if fc.FREEZE_BOTTOM_UP:
        _freeze(bottom_up)
    shapes = bottom_up.output_shape()
    in_features = list(fc.IN_FEATURES)
    if fc.UPSAMPLER not in ("jbu", *_BASELINES) and len(in_features) != 1:
        raise ValueError(f"a loaded upsampler ({fc.UPSAMPLER!r}) serves one feature; "
                         f"expected one entry in MODEL.FEATUP.IN_FEATURES, got {in_features}")
    missing = [f for f in in_features if f not in shapes]
    if missing:
        raise ValueError(f"expected MODEL.FEATUP.IN_FEATURES among the bottom-up outputs {sorted(shapes)}, "
                         f"got {in_features}")
    ups = []
    for f in in_features:
        stages = fc.JBU_STAGES
        if stages <= 0:
            ratio = (shapes[f].stride or fc.OUT_STRIDE) / max(int(fc.OUT_STRIDE), 1)
            stages = max(1, math.ceil(math.log2(ratio) - 1e-9)) if ratio > 1 else 1
        ups.append(make_feature_upsampler(fc.UPSAMPLER, shapes[f].channels, stages=stages))
    if fc.FREEZE_UPSAMPLER:
        for u in ups:
            _freeze(u)
    guidance = GuidanceNorm(cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD, cfg.INPUT.FORMAT,
                            fc.GUIDANCE_PIXEL_MEAN, fc.GUIDANCE_PIXEL_STD)
    return FeatUpBackbone(bottom_up, in_features, ups, out_stride=fc.OUT_STRIDE, guidance=guidance,
                          keep_bottom_up_features=fc.KEEP_BOTTOM_UP_FEATURES, use_norm=fc.USE_NORM)
