"""Adapters: where a backbone's features are and how they become ``Tensor[B, C, h, w]``.

One file per ecosystem (``timm.py``, ``transformers.py``, ``open_clip.py``, ``generic.py``), each
registering a builder with :func:`register_adapter`. A file is imported only when a model of its
ecosystem is wrapped, so importing this package imports neither timm, transformers nor open_clip.

    adapter = adapter_for(model)                      # picks the ecosystem from the model's class
    adapter = adapter_for(model, layer="layer3")      # an intermediate layer
    adapter = adapter_for(tv_vit, layer=Layer("encoder.ln", layout="tokens", num_prefix_tokens=1,
                                              patch_size=16))
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Dict, Optional, Union

from torch import nn

from .base import Adapter, FeatureSpec, Layer, get_module
from .registry import (backbone_origin, create_backbone, list_backbones, register_backbone,
                       resolve_backbone)

__all__ = ["Adapter", "FeatureSpec", "Layer", "adapter_for", "register_adapter", "register_backbone",
           "create_backbone", "default_backbone", "list_backbones", "ecosystem_of",
           "UnsupportedBackboneError", "SUPPORTED_ECOSYSTEMS"]

# ecosystem -> file defining its builder (imported on first use)
_ECOSYSTEM_FILES: Dict[str, str] = {
    "timm": ".timm",
    "transformers": ".transformers",
    "open_clip": ".open_clip",
    "generic": ".generic",
}
SUPPORTED_ECOSYSTEMS = ("timm", "transformers", "open_clip")

Builder = Callable[[nn.Module, Optional[Layer]], Adapter]
_BUILDERS: Dict[str, Builder] = {}


class UnsupportedBackboneError(ValueError):
    """The model comes from no supported ecosystem and no ``layer=`` says where its features are."""


def register_adapter(ecosystem: str) -> Callable[[Builder], Builder]:
    """Decorator: ``builder(model, layer: Layer | None) -> Adapter`` serves models of ``ecosystem``."""

    def decorate(builder: Builder) -> Builder:
        if ecosystem in _BUILDERS and _BUILDERS[ecosystem] is not builder:
            warnings.warn(f"overwriting the adapter registered for {ecosystem!r}", stacklevel=2)
        _BUILDERS[ecosystem] = builder
        return builder

    return decorate


def _builder(ecosystem: str) -> Builder:
    if ecosystem not in _BUILDERS and ecosystem in _ECOSYSTEM_FILES:
        importlib.import_module(_ECOSYSTEM_FILES[ecosystem], __name__)
    return _BUILDERS[ecosystem]


def ecosystem_of(model: nn.Module) -> Optional[str]:
    """``"timm"``, ``"transformers"``, ``"open_clip"``, or None, from the package of the model's class.

    Looks at the class and its bases, so a user subclass of a timm model counts as timm.
    """
    for cls in type(model).__mro__:
        package = cls.__module__.split(".")[0]
        if package in SUPPORTED_ECOSYSTEMS or (package in _BUILDERS and package != "generic"):
            return package
    return None


def _unsupported(model: nn.Module) -> UnsupportedBackboneError:
    children = [n for n, _ in model.named_children()][:10]
    cls = type(model)
    return UnsupportedBackboneError(
        f"featup_adapters does not know where the features of {cls.__module__}.{cls.__qualname__} are. "
        f"Supported ecosystems: {', '.join(SUPPORTED_ECOSYSTEMS)} (models found automatically). For "
        f"torchvision or any other nn.Module, name the module whose output to upsample with layer=, e.g. "
        f"wrap(model, 'bilinear', layer='layer4') for a CNN, or for tokens "
        f"layer=featup_adapters.adapters.Layer('encoder.ln', layout='tokens', num_prefix_tokens=1, "
        f"patch_size=16). Top-level modules of this model: {children}")


def adapter_for(model: nn.Module, layer: Union[None, str, Layer] = None) -> Adapter:
    """The adapter for ``model``'s default features, or for the module ``layer`` names.

    Raises:
        UnsupportedBackboneError: the model is from no supported ecosystem and ``layer`` is None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module backbone, got {type(model).__name__}")
    origin = backbone_origin(model)
    entry = origin.entry if origin is not None else None
    # The registered patch size describes the registered layer only; another layer has its own.
    registered_layer = layer is None or (entry is not None and _layer_name(layer) == _layer_name(entry.layer))
    if layer is None and entry is not None:
        layer = entry.layer
    if isinstance(layer, str):
        layer = Layer(layer)
    elif layer is not None and not isinstance(layer, Layer):
        raise TypeError(f"expected layer as a module name (str) or Layer, got {type(layer).__name__}")
    ecosystem = ecosystem_of(model)
    if ecosystem is None:
        if layer is None:
            raise _unsupported(model)
        ecosystem = "generic"
    adapter = _builder(ecosystem)(model, layer)
    get_module(model, adapter.spec.module)  # fail early, listing modules that exist
    changes = {}
    if origin is not None and origin.backbone_id is not None:
        changes["backbone_id"] = origin.backbone_id
    if entry is not None:
        if entry.mean is not None:
            changes["mean"] = entry.mean
        if entry.std is not None:
            changes["std"] = entry.std
        if entry.patch_size is not None and registered_layer:
            changes["stride"] = entry.patch_size
    if changes:
        adapter.spec = adapter.spec.replace(**changes)
    return adapter


def _layer_name(layer) -> Optional[str]:
    return layer.name if isinstance(layer, Layer) else layer


def default_backbone(*args, **kwargs):
    """The embedded default backbone (timm tf_efficientnet_lite0, ImageNet weights); see ``default.py``."""
    from .default import default_backbone as _default_backbone

    return _default_backbone(*args, **kwargs)


# the embedded default, by name (its factory imports nothing until called)
from . import default as _default  # noqa: E402,F401
