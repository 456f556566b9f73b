"""The models behind ``hubconf.py``: FeatUp's torch.hub entries, built on featup_adapters.

    model = torch.hub.load("<this repo>", "dino16", use_norm=True)   # as with mhamilton723/FeatUp
    hr = model(image)             # Tensor[B, C, 16h, 16w]; image: Tensor[B, 3, H, W], normalized
    lr = model.model(image)       # Tensor[B, C, h, w], the backbone's features (+ channel norm)

Each FeatUp entry (``dino16``, ``dinov2``, ``clip``, ``maskclip``, ``vit``, ``resnet50``) builds the
backbone FeatUp used with pretrained weights (timm / open_clip), takes FeatUp's released JBU
upsampler (``featup/<name>`` or ``featup/<name>-no-norm`` in the registry, fetched into torch.hub's
cache) and returns an ``UpsampledBackbone`` in eval mode, with FeatUp's attributes: ``.model``
(``Sequential(featurizer, ChannelNorm or Identity)``, so FeatUp's ``model.1.norm.*`` keys fit) and
``.upsampler`` (the ``JBUStack``).  As in FeatUp the output is 16x the feature grid (4 stages of
2x); ``model(image, output_size=(H, W))`` gives any other size.  Images are normalized with the
backbone's own mean / std (``model.mean``, ``model.std``: ImageNet's for all but the CLIP ones).

``efficientnet_lite0`` is the embedded default backbone with its shipped upsampler (output at the
image size by default).  Backbone weights come from the usual caches (timm: the Hugging Face
cache; open_clip: its own); ``backbone_weights=<local file>`` loads them from a file instead.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters import default_backbone
from ..neck import wrap
from ..upsamplers import JBUStack
from .loading import load_upsampler
from .registry import FEATUP_MODELS

__all__ = ["UpsampledBackbone", "ChannelNorm", "Featurizer", "MaskCLIPFeaturizer", "featup_model",
           "default_model", "ENTRIES", "IMAGENET_MEAN", "IMAGENET_STD", "CLIP_MEAN", "CLIP_STD"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How to build the backbone of one FeatUp torch.hub entry."""
    library: str                   # "timm" or "open_clip"
    model: str                     # timm model name (with its pretrained tag) / open_clip config
    tag: str | None = None         # open_clip pretrained tag
    features: str = "default"      # "default" (the adapter's), "proj" (CLIP), "maskclip"


# FeatUp's featurizers, by the weights their upsamplers were trained on (see registry.FEATUP_MODELS)
ENTRIES: dict[str, Entry] = {
    "dino16": Entry("timm", "vit_small_patch16_224.dino"),
    "dinov2": Entry("timm", "vit_small_patch14_dinov2.lvd142m"),
    "vit": Entry("timm", "vit_small_patch16_224.augreg_in21k_ft_in1k"),
    "resnet50": Entry("timm", "resnet50.tv_in1k"),
    "clip": Entry("open_clip", "ViT-B-16", "openai", "proj"),
    "maskclip": Entry("open_clip", "ViT-B-16", "openai", "maskclip"),
}


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of ``Tensor[B, C, h, w]`` (FeatUp's ``ChannelNorm``: the
    parameters are ``norm.weight`` / ``norm.bias``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Featurizer(nn.Module):
    """``image[B, 3, H, W] -> features[B, C, h, w]`` of a wrapped backbone (no upsampling);
    ``.model`` is the backbone, as in FeatUp's featurizers."""

    def __init__(self, backbone: nn.Module, layer=None):
        super().__init__()
        self.neck = wrap(backbone, "bilinear", layer=layer, use_norm=False)
        self.dim = self.neck.feature_dim
        self.patch_size = self.neck.stride

    @property
    def model(self) -> nn.Module:
        return self.neck.backbone

    def forward(self, image: Tensor) -> Tensor:
        return self.neck.features(image)


class MaskCLIPFeaturizer(nn.Module):
    """MaskCLIP features of an open_clip ViT: the last block's value embeddings (its attention
    with each token attending only to itself: ``out_proj(v_proj(ln_1(x)))``, no residual, no MLP),
    class token dropped, then ``ln_post`` and ``proj``: ``Tensor[B, embed_dim, H/p, W/p]``."""

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.model = clip_model
        visual = clip_model.visual
        self.dim = int(visual.proj.shape[1])
        self.patch_size = int(visual.patch_size[0])

    def forward(self, image: Tensor) -> Tensor:
        visual = self.model.visual
        expected = tuple(visual.image_size)
        if tuple(image.shape[-2:]) != expected:
            raise ValueError(f"MaskCLIP on this open_clip tower takes {expected[0]}x{expected[1]} "
                             f"images (fixed positional embedding), got "
                             f"{image.shape[-2]}x{image.shape[-1]}")
        block = visual.transformer.resblocks[-1]
        seen = {}

        def grab(module, args):
            seen["x"] = args[0]
            raise _Stop

        handle = block.register_forward_pre_hook(grab)
        try:
            visual(image)
        except _Stop:
            pass
        finally:
            handle.remove()
        x = seen["x"]
        if not getattr(visual.transformer, "batch_first", True):
            x = x.transpose(0, 1)                          # [N, B, C] -> [B, N, C]
        attn = block.attn
        d = attn.embed_dim
        v = F.linear(block.ln_1(x), attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])
        tokens = block.ls_1(attn.out_proj(v))[:, 1:]       # drop the class token
        tokens = visual.ln_post(tokens) @ visual.proj      # [B, N, embed_dim]
        B, h, w = image.shape[0], image.shape[-2] // self.patch_size, image.shape[-1] // self.patch_size
        return tokens.reshape(B, h, w, -1).permute(0, 3, 1, 2)


class _Stop(Exception):
    """Ends the tower's forward once the last block's input is known."""


class UpsampledBackbone(nn.Module):
    """FeatUp's torch.hub model: ``forward(image) -> upsampler(model(image), image)``.

    Attributes: ``model`` (image -> ``Tensor[B, C, h, w]``), ``upsampler``, ``dim``,
    ``patch_size``, ``mean`` / ``std`` (how ``image`` is normalized), ``scale`` (16 for FeatUp's
    entries: output 16h x 16w; None: the image size), ``config`` (the upsampler's).
    """

    def __init__(self, model: nn.Module, upsampler: nn.Module, *, dim: int, patch_size: int,
                 mean, std, scale: int | None = 16):
        super().__init__()
        self.model = model
        self.upsampler = upsampler
        self.dim, self.patch_size, self.scale = dim, patch_size, scale
        self.mean, self.std = tuple(mean), tuple(std)

    @property
    def config(self) -> dict:
        return dict(getattr(self.upsampler, "config", None) or {})

    def forward(self, image: Tensor, output_size=None) -> Tensor:
        """``image``: ``Tensor[B, 3, H, W]`` normalized -> ``Tensor[B, C, H', W']``, with (H', W')
        = ``output_size``, else 16x the feature grid (FeatUp's), else the image size."""
        feats = self.model(image)
        if output_size is None:
            output_size = tuple(image.shape[-2:]) if self.scale is None else \
                (feats.shape[-2] * self.scale, feats.shape[-1] * self.scale)
        return self.upsampler(feats, image, output_size=output_size)


def _timm_backbone(name: str, weights):
    import timm
    kwargs = {"dynamic_img_size": True} if name.startswith("vit_") else {}
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    return timm.create_model(name, pretrained=True, **kwargs)


def _open_clip_backbone(name: str, tag: str, weights):
    import open_clip
    return open_clip.create_model(name, pretrained=str(weights) if weights is not None else tag)


def _build(entry: Entry, weights) -> tuple[nn.Module, tuple, tuple]:
    if entry.library == "timm":
        backbone = _timm_backbone(entry.model, weights).eval()
        return Featurizer(backbone), IMAGENET_MEAN, IMAGENET_STD
    backbone = _open_clip_backbone(entry.model, entry.tag, weights).eval()
    if entry.features == "maskclip":
        return MaskCLIPFeaturizer(backbone), CLIP_MEAN, CLIP_STD
    return Featurizer(backbone, layer="proj"), CLIP_MEAN, CLIP_STD


def _norm_for(upsampler: nn.Module, dim: int, use_norm: bool) -> nn.Module:
    if not use_norm:
        return nn.Identity()
    norm = ChannelNorm(dim)
    saved = (getattr(upsampler, "config", None) or {}).get("norm") or {}
    if "weight" in saved and "bias" in saved:
        with torch.no_grad():
            norm.norm.weight.copy_(torch.tensor(saved["weight"]))
            norm.norm.bias.copy_(torch.tensor(saved["bias"]))
    return norm


def featup_model(name: str, *, pretrained: bool = True, use_norm: bool = True,
                 backbone_weights=None, progress: bool = True) -> UpsampledBackbone:
    """FeatUp's torch.hub entry ``name`` (one of ``ENTRIES``), in eval mode.

    ``pretrained``: FeatUp's released upsampler (else a fresh ``JBUStack``); the backbone always
    has its pretrained weights, as in FeatUp.  ``use_norm``: the upsampler trained on
    channel-normed features (FeatUp's default) or the ``no_norm`` one.  ``backbone_weights``: a
    local weights file for the backbone instead of its download."""
    if name not in ENTRIES:
        raise ValueError(f"unknown FeatUp model {name!r}; expected one of {sorted(ENTRIES)}")
    if not isinstance(use_norm, bool) or not isinstance(pretrained, bool):
        raise TypeError(f"{name}: expected pretrained and use_norm as True/False, got "
                        f"pretrained={pretrained!r}, use_norm={use_norm!r}")
    featurizer, mean, std = _build(ENTRIES[name], backbone_weights)
    dim = FEATUP_MODELS[name][0]
    if featurizer.dim != dim:
        raise ValueError(f"{name}: the backbone gives {featurizer.dim}-channel features, FeatUp's "
                         f"upsampler expects {dim}")
    if pretrained:
        upsampler = load_upsampler(f"featup/{name}" + ("" if use_norm else "-no-norm"),
                                   progress=progress)
    else:
        upsampler = JBUStack(dim)
        upsampler.config = {"use_norm": use_norm}
    model = nn.Sequential(featurizer, _norm_for(upsampler, dim, use_norm))
    return UpsampledBackbone(model, upsampler, dim=dim, patch_size=featurizer.patch_size,
                             mean=mean, std=std, scale=16).eval()


def default_model(name: str = "efficientnet_lite0", *, pretrained: bool = True,
                  use_norm: bool | None = None) -> UpsampledBackbone:
    """The embedded default backbone with its shipped upsampler (registry name ``name``), in eval
    mode; the output is at the image size.  ``use_norm`` must match the shipped upsampler's
    (None: take it)."""
    upsampler = load_upsampler(name)
    saved = bool((upsampler.config or {}).get("use_norm"))
    if use_norm is not None and bool(use_norm) != saved:
        raise ValueError(f"{name}: the shipped upsampler was trained "
                         f"{'with' if saved else 'without'} the channel norm; use_norm={use_norm} "
                         f"has no upsampler (pass use_norm={saved} or leave it out)")
    backbone = default_backbone(pretrained=pretrained).eval()
    featurizer = Featurizer(backbone, layer=upsampler.config.get("layer"))
    model = nn.Sequential(featurizer, _norm_for(upsampler, featurizer.dim, saved))
    return UpsampledBackbone(model, upsampler, dim=featurizer.dim,
                             patch_size=featurizer.patch_size, mean=featurizer.neck.mean,
                             std=featurizer.neck.std, scale=None).eval()
