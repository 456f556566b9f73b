"""Backbones by name: ``register_backbone`` and ``create_backbone``.

``create_backbone(spec)`` understands

* ``"timm:NAME"`` (``timm.create_model``), e.g. ``"timm:vit_small_patch16_224.dino"``;
* ``"hf:ID"`` (transformers): a model type such as ``"hf:dinov2"`` builds a random-init model from
  that type's default config (kwargs override config fields); any other ID is a hub id or local
  directory read with ``AutoConfig.from_pretrained`` / ``AutoModel.from_pretrained``;
* ``"open_clip:NAME"`` (``open_clip.create_model``; the visual tower is returned);
* any name given to :func:`register_backbone` (the embedded default is ``"efficientnet_lite0"``).

Weights are downloaded only when ``pretrained`` is set; tests build every model at random init.
Each created model is remembered (weakly) with its backbone id and registration, so that
``wrap(create_backbone("efficientnet_lite0"))`` knows what it wraps.
"""
from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from .base import Layer

PREFIXES = ("timm", "hf", "open_clip")


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: how to build it and what its features are."""

    name: str
    factory: Callable[..., nn.Module]
    layer: Union[None, str, Layer] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    patch_size: Optional[int] = None
    backbone_id: Optional[str] = None


@dataclass(frozen=True)
class BackboneOrigin:
    """What :func:`create_backbone` knew about a model it made."""

    backbone_id: Optional[str]
    entry: Optional[BackboneEntry] = None
    extra: Dict[str, Any] = field(default_factory=dict)


_REGISTRY: Dict[str, BackboneEntry] = {}
_ORIGINS: "weakref.WeakKeyDictionary[nn.Module, BackboneOrigin]" = weakref.WeakKeyDictionary()


def register_backbone(name: str, factory: Optional[Callable[..., nn.Module]] = None, *,
                      layer: Union[None, str, Layer] = None, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None, patch_size: Optional[int] = None,
                      backbone_id: Optional[str] = None, overwrite: bool = False):
    """Make ``factory()`` available as ``name`` to ``wrap``, ``create_backbone`` and the trainer.

    Args:
        name: the name users pass, e.g. ``wrap("my_net")`` or ``featup-adapters train --backbone my_net``.
        factory: ``factory(**kwargs) -> nn.Module``; omit it to use ``register_backbone`` as a decorator.
        layer: module whose output is upsampled (a name or :class:`Layer`); None = the adapter's default,
            which requires a timm / transformers / open_clip model.
        mean, std: the normalization the backbone expects (3 values each); None = the adapter's.
        patch_size: pixels per feature cell (for token layouts and the trainer's downsampler).
        backbone_id: id used to find pretrained upsamplers and stored in saved ones (default ``name``).
        overwrite: replace an existing registration without a warning.
    """
    if factory is None:
        return lambda f: register_backbone(name, f, layer=layer, mean=mean, std=std, patch_size=patch_size,
                                           backbone_id=backbone_id, overwrite=overwrite)
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"expected a backbone name without ':' (those are prefixes {PREFIXES}), got {name!r}")
    if not callable(factory):
        raise TypeError(f"expected a callable factory returning an nn.Module, got {type(factory).__name__}")
    for what, values in (("mean", mean), ("std", std)):
        if values is not None and len(tuple(values)) != 3:
            raise ValueError(f"expected 3 {what} values (one per RGB channel), got {tuple(values)}")
    if name in _REGISTRY and not overwrite:
        warnings.warn(f"overwriting the backbone registered as {name!r}", stacklevel=2)
    _REGISTRY[name] = BackboneEntry(name, factory, layer,
                                    tuple(map(float, mean)) if mean is not None else None,
                                    tuple(map(float, std)) if std is not None else None,
                                    patch_size, backbone_id or name)
    return factory


def list_backbones() -> Sequence[str]:
    """Names registered with :func:`register_backbone`."""
    return sorted(_REGISTRY)


def backbone_origin(model: nn.Module) -> Optional[BackboneOrigin]:
    """The origin recorded by :func:`create_backbone` for ``model``, or None."""
    try:
        return _ORIGINS.get(model)
    except TypeError:
        return None


def create_backbone(spec: str, *, pretrained: Union[None, bool, str] = None, **kwargs: Any) -> nn.Module:
    """Build the backbone ``spec`` names (see the module docstring).

    ``pretrained=None`` means random init for ``timm:`` / ``hf:`` / ``open_clip:`` specs and the
    factory's own default for registered names (the embedded default loads its bundled weights);
    ``True`` downloads weights. For open_clip, ``pretrained`` may be a tag such as ``"openai"``. Extra kwargs go to the model
    factory (timm / registered factory) or override config fields (transformers).
    """
    model, _ = resolve_backbone(spec, pretrained=pretrained, **kwargs)
    return model


def resolve_backbone(spec: str, *, pretrained: Union[None, bool, str] = None,
                     **kwargs: Any) -> Tuple[nn.Module, BackboneOrigin]:
    """Like :func:`create_backbone`, also returning what is known about the model."""
    if not isinstance(spec, str):
        raise TypeError(f"expected a backbone spec string, got {type(spec).__name__}")
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ValueError(f"expected '{prefix}:NAME', got {spec!r}")
        model, origin = _CREATORS[prefix](rest, pretrained, kwargs)
    elif spec in _REGISTRY:
        entry = _REGISTRY[spec]
        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        model = entry.factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory registered as {spec!r} returned {type(model).__name__}, "
                            "expected an nn.Module")
        origin = BackboneOrigin(entry.backbone_id, entry)
    else:
        raise ValueError(f"unknown backbone {spec!r}: expected 'timm:NAME', 'hf:ID', 'open_clip:NAME' or a "
                         f"registered name {list_backbones()}")
    _ORIGINS[model] = origin
    return model, origin


def _create_timm(name: str, pretrained, kwargs):
    import timm

    model = timm.create_model(name, pretrained=bool(pretrained), **kwargs)
    return model, BackboneOrigin(None)  # the timm adapter reads the id from pretrained_cfg


def _create_hf(model_id: str, pretrained, kwargs):
    import transformers

    if pretrained:
        model = transformers.AutoModel.from_pretrained(model_id, **kwargs)
        return model, BackboneOrigin(model_id)
    if model_id in transformers.CONFIG_MAPPING:  # a model type: random init from its default config
        config = transformers.AutoConfig.for_model(model_id, **kwargs)
        bid = f"hf/{model_id}"
    else:  # a hub id or local directory: its config (a small download for hub ids), random weights
        config = transformers.AutoConfig.from_pretrained(model_id, **kwargs)
        bid = model_id
    if getattr(config, "vision_config", None) is not None and model_id in ("clip", "siglip"):
        config = config.vision_config
    model = transformers.AutoModel.from_config(config)
    return model, BackboneOrigin(bid)


def _create_open_clip(name: str, pretrained, kwargs):
    import open_clip

    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip needs a pretrained tag for {name!r}: pass pretrained=<tag>, one of {tags}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = open_clip.create_model(name, pretrained=pretrained or None, **kwargs)
    return model.visual, BackboneOrigin(f"open_clip/{name}")


_CREATORS = {"timm": _create_timm, "hf": _create_hf, "open_clip": _create_open_clip}
