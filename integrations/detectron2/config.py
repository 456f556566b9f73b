"""Config keys of the FeatUp neck for detectron2: ``add_featup_config(cfg)``.

    from detectron2.config import get_cfg
    from featup_adapters.integrations.detectron2 import add_featup_config, config_file
    cfg = get_cfg(); add_featup_config(cfg); cfg.merge_from_file(config_file("semantic_R_50_FeatUp_JBU_1x.yaml"))

(from the clone, ``integrations.detectron2`` is the same package and the configs are also in
``integrations/detectron2/configs/``.)
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN

# ImageNet mean/std on a 0-255 scale, RGB order: what FeatUp's upsamplers were trained with.
IMAGENET_PIXEL_MEAN = [123.675, 116.28, 103.53]
IMAGENET_PIXEL_STD = [58.395, 57.12, 57.375]


def add_featup_config(cfg: CN) -> CN:
    """Add ``cfg.MODEL.FEATUP.*`` (the FeatUp neck) to a detectron2 config, in place; returns cfg."""
    _C = cfg
    _C.MODEL.FEATUP = CN()
    # Name in BACKBONE_REGISTRY of the bottom-up backbone whose features get upsampled:
    # "build_resnet_backbone", "build_resnet_fpn_backbone", or "build_featup_adapter_backbone"
    # (a timm / HF transformers / open_clip model through featup_adapters' adapters, see ADAPTER).
    _C.MODEL.FEATUP.BOTTOM_UP = "build_resnet_backbone"
    # Bottom-up features to upsample; each one is returned as "<name>_up".
    _C.MODEL.FEATUP.IN_FEATURES = ["res5"]
    # Stride (relative to the padded input image) of the upsampled features; 1 = full resolution.
    _C.MODEL.FEATUP.OUT_STRIDE = 4
    # Also return the bottom-up features themselves (unchanged, at their own stride).
    _C.MODEL.FEATUP.KEEP_BOTTOM_UP_FEATURES = False
    # The upsampler: "jbu" (a new FeatUp JBU stack, trained with the model), "bilinear" / "bicubic"
    # (parameter-free baselines), or a directory / registered name for featup_adapters.load_upsampler
    # (only with a single IN_FEATURES entry).
    _C.MODEL.FEATUP.UPSAMPLER = "jbu"
    # Number of (at most 2x) JBU stages of a new "jbu" stack; 0 = ceil(log2(feature stride / OUT_STRIDE)),
    # so that every stage is used (unused parameters break DistributedDataParallel). FeatUp: 4 (16x).
    _C.MODEL.FEATUP.JBU_STAGES = 0
    # LayerNorm over channels before upsampling (FeatUp's "norm" checkpoints were trained with one).
    _C.MODEL.FEATUP.USE_NORM = False
    # Guidance image normalization (0-255 scale, RGB order) the upsampler expects; the input of the
    # backbone (normalized with MODEL.PIXEL_MEAN/STD in INPUT.FORMAT order) is converted to it.
    # Empty lists: use the backbone's input as it is.
    _C.MODEL.FEATUP.GUIDANCE_PIXEL_MEAN = list(IMAGENET_PIXEL_MEAN)
    # See GUIDANCE_PIXEL_MEAN.
    _C.MODEL.FEATUP.GUIDANCE_PIXEL_STD = list(IMAGENET_PIXEL_STD)
    # Freeze the bottom-up backbone (requires_grad False, eval-mode BatchNorm is up to the backbone).
    _C.MODEL.FEATUP.FREEZE_BOTTOM_UP = False
    # Freeze the upsampler (e.g. a pretrained JBU stack used as a fixed feature upsampler).
    _C.MODEL.FEATUP.FREEZE_UPSAMPLER = False

    # Bottom-up backbone built through featup_adapters (BOTTOM_UP = "build_featup_adapter_backbone").
    _C.MODEL.FEATUP.ADAPTER = CN()
    # Backbone spec for featup_adapters.adapters.create_backbone: "timm:NAME", "hf:ID",
    # "open_clip:NAME" or a registered name such as "efficientnet_lite0".
    _C.MODEL.FEATUP.ADAPTER.SPEC = "efficientnet_lite0"
    # Load the backbone's pretrained weights (timm / HF / open_clip download or cache; the embedded
    # "efficientnet_lite0" its bundled ones); False = random init.
    _C.MODEL.FEATUP.ADAPTER.PRETRAINED = True
    # Extra keyword arguments for the model factory, e.g. {dynamic_img_size: True} for a timm ViT
    # (detectron2 feeds images of any size).
    _C.MODEL.FEATUP.ADAPTER.KWARGS = CN(new_allowed=True)
    # Module whose output is the feature map; "" = the adapter's default (last spatial features).
    _C.MODEL.FEATUP.ADAPTER.LAYER = ""
    # Name of the single feature map this bottom-up backbone returns.
    _C.MODEL.FEATUP.ADAPTER.OUT_FEATURE = "last"
    return cfg


def config_file(name: str) -> str:
    """Path of a shipped config (``configs/NAME``), from the clone or the installed package."""
    import os

    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"expected one of {sorted(os.listdir(folder))} in {folder}, got {name!r}")
    return path
