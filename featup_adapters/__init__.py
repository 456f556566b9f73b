"""featup_adapters: FeatUp joint bilateral upsampling of any backbone's features.

    model = featup_adapters.wrap(timm.create_model("vit_small_patch16_224.dino", pretrained=True))
    feats = model(images)            # [B, C, H, W] at image resolution

Importing this package is cheap: every public name below is imported on first use, and nothing
optional (timm, transformers, open_clip, detectron2, matplotlib) is imported until asked for.
"""
from __future__ import annotations

import importlib

from ._version import __version__

# public name -> module that defines it (relative to this package)
_LAZY = {
    "adaptive_conv": ".ops",
    "jbu": ".upsamplers",
    "JointBilateralUpsampler": ".upsamplers",
    "JBUStack": ".upsamplers",
    "UniversalJBUStack": ".upsamplers",
    "load_featup_checkpoint": ".hub",
    "load_upsampler": ".hub",
    "wrap": ".neck",
    "FeatUpNeck": ".neck",
    "register_backbone": ".adapters",
    "default_backbone": ".adapters",
    "create_backbone": ".adapters",
    "Layer": ".adapters",
    "train_upsampler": ".training",
    "train_universal": ".training",
    "fit_implicit": ".training",
}
_SUBMODULES = {"ops", "upsamplers", "adapters", "hub", "neck", "training", "viz", "tasks", "cli",
               "data", "images"}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module("." + name, __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'featup_adapters' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
