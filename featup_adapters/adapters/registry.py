"""Backbones by name: ``register_backbone`` and ``create_backbone``.

``create_backbone(spec)`` understands

* ``"timm:NAME"`` (``timm.create_model``), e.g. ``"timm:vit_small_patch16_224.dino"``;
* ``"hf:ID"`` (transformers): a model type such as ``"hf:dinov2"`` builds a random-init model from
  that type's default config (kwargs override config fields); any other ID is a hub id or local
  directory read with ``AutoConfig.from_pretrained`` / ``AutoModel.from_pretrained``;
* ``"open_clip:NAME"`` (``open_clip.create_model``; the visual tower is returned);
* any name given to :func:`register_backbone` (the embedded default is ``"efficientnet_lite0"``).

Spec strings load pretrained weights by default, as ``torch.hub`` and the model hubs do
(``pretrained=None`` means "the default": True for ``timm:`` / ``hf:`` / ``open_clip:``, the
factory's own default for registered names).  Without the network a clear error names the
missing weights; ``pretrained=False`` (CLI ``--no-pretrained``) builds a random-init model and says
so in the model's origin.  Each created model is remembered (weakly) with its backbone id and registration, so that
``wrap(create_backbone("efficientnet_lite0"))`` knows what it wraps.
"""
from __future__ import annotations

import inspect
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
    pretrained: Optional[bool] = None   # True: pretrained weights loaded; False: random init; None: unknown


class PretrainedWeightsError(OSError):
    """Pretrained weights that could not be loaded (offline, not cached, or none published)."""


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

    ``pretrained=None`` means the default: pretrained weights for ``timm:`` / ``hf:`` /
    ``open_clip:`` specs (downloaded or from the cache; a :class:`PretrainedWeightsError` naming
    them when that fails) and the factory's own default for registered names (the embedded
    default loads its bundled weights). ``False`` builds a random-init model. For open_clip,
    ``pretrained`` is a tag such as ``"openai"`` (``True`` / ``None`` list the tags in the error).
    Extra kwargs go to the model factory (timm / registered factory) or override config fields
    (transformers).
    """
    model, _ = resolve_backbone(spec, pretrained=pretrained, **kwargs)
    return model


def resolve_backbone(spec: str, *, pretrained: Union[None, bool, str] = None,
                     **kwargs: Any) -> Tuple[nn.Module, BackboneOrigin]:
    """Like :func:`create_backbone`, also returning what is known about the model."""
    if not isinstance(spec, str):
        raise TypeError(f"expected a backbone spec string, got {type(spec).__name__}")
    prefix, sep, rest = spec.partition(":")
    if pretrained is not None and not isinstance(pretrained, (bool, str)):
        raise TypeError(f"expected pretrained as None, True, False or an open_clip tag, got {pretrained!r}")
    if sep and prefix in PREFIXES:
        if not rest:
            raise ValueError(f"expected '{prefix}:NAME', got {spec!r}")
        model, origin = _CREATORS[prefix](rest, True if pretrained is None else pretrained, kwargs)
    elif spec in _REGISTRY:
        entry = _REGISTRY[spec]
        if pretrained is not None:
            kwargs["pretrained"] = pretrained
        model = entry.factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the factory registered as {spec!r} returned {type(model).__name__}, "
                            "expected an nn.Module")
        used = pretrained if pretrained is not None else _default_pretrained(entry.factory)
        origin = BackboneOrigin(entry.backbone_id, entry, pretrained=None if used is None else bool(used))
    else:
        raise ValueError(f"unknown backbone {spec!r}: expected 'timm:NAME', 'hf:ID', 'open_clip:NAME' or a "
                         f"registered name {list_backbones()}")
    _ORIGINS[model] = origin
    return model, origin


def _default_pretrained(factory) -> Optional[bool]:
    """The default of a factory's ``pretrained`` parameter, if it has a bool one."""
    try:
        param = inspect.signature(factory).parameters.get("pretrained")
    except (TypeError, ValueError):
        return None
    if param is None or not isinstance(param.default, bool):
        return None
    return param.default


def _weights_error(spec: str, weights: str, exc: BaseException) -> PretrainedWeightsError:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    if len(reason) > 300:
        reason = reason[:300] + " ..."
    return PretrainedWeightsError(
        f"{spec}: cannot load the pretrained weights {weights} ({type(exc).__name__}: {reason}). Connect to "
        "the network or put them in the local cache (HF_HOME / TORCH_HOME), or pass pretrained=False "
        "(--no-pretrained) for a random-init backbone")


def _require(module: str, package: str, spec: str):
    """Import ``module`` or raise an ImportError that says which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{spec} needs {package}, which is not installed ({exc}): pip install {package}") from exc


def _create_timm(name: str, pretrained, kwargs):
    timm = _require("timm", "timm", f"timm:{name}")

    if not pretrained:
        model = timm.create_model(name, pretrained=False, **kwargs)
        return model, BackboneOrigin(None, pretrained=False)  # the timm adapter reads the id from pretrained_cfg
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # unknown name: timm.create_model below says so
        cfg = None
    if cfg is None:
        base = name.split(".")[0]
        if timm.is_model(base) and not timm.list_pretrained(base):
            raise PretrainedWeightsError(f"timm:{name}: timm publishes no pretrained weights for this model; "
                                         "pass pretrained=False (--no-pretrained) for a random-init backbone")
    weights = (f"{cfg.hf_hub_id} (Hugging Face Hub)" if cfg is not None and cfg.hf_hub_id
               else (cfg.url if cfg is not None and cfg.url else f"of timm {name}"))
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "unknown model" in str(exc).lower():
            raise
        raise _weights_error(f"timm:{name}", weights, exc) from None
    except (OSError, ValueError, ConnectionError, TimeoutError) as exc:
        raise _weights_error(f"timm:{name}", weights, exc) from None
    except Exception as exc:  # requests / huggingface_hub errors without a common base
        if type(exc).__module__.split(".")[0] in ("requests", "urllib3", "huggingface_hub", "httpx"):
            raise _weights_error(f"timm:{name}", weights, exc) from None
        raise
    return model, BackboneOrigin(None, pretrained=True)


def _create_hf(model_id: str, pretrained, kwargs):
    transformers = _require("transformers", "transformers", f"hf:{model_id}")

    if pretrained:
        if model_id in transformers.CONFIG_MAPPING and "/" not in model_id:
            raise PretrainedWeightsError(
                f"hf:{model_id} names a model type, which has no pretrained weights: pass a hub id such as "
                f"hf:facebook/dinov2-small, or pretrained=False (--no-pretrained) for a random-init model "
                "from the type's default config")
        try:
            model = transformers.AutoModel.from_pretrained(model_id, **kwargs)
        except (OSError, ValueError, ConnectionError, TimeoutError) as exc:
            raise _weights_error(f"hf:{model_id}", f"{model_id} (Hugging Face Hub)", exc) from None
        return model, BackboneOrigin(model_id, pretrained=True)
    if model_id in transformers.CONFIG_MAPPING:  # a model type: random init from its default config
        config = transformers.AutoConfig.for_model(model_id, **kwargs)
        bid = f"hf/{model_id}"
    else:  # a hub id or local directory: its config (a small download for hub ids), random weights
        config = transformers.AutoConfig.from_pretrained(model_id, **kwargs)
        bid = model_id
    if getattr(config, "vision_config", None) is not None and model_id in ("clip", "siglip"):
        config = config.vision_config
    model = transformers.AutoModel.from_config(config)
    return model, BackboneOrigin(bid, pretrained=False)


def _create_open_clip(name: str, pretrained, kwargs):
    open_clip = _require("open_clip", "open_clip_torch", f"open_clip:{name}")

    if pretrained is True:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ValueError(f"open_clip needs a pretrained tag for {name!r}: pass pretrained=<tag>, one of {tags} "
                         "(or pretrained=False / --no-pretrained for a random-init model)")
    if pretrained is False:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(name, pretrained=None, **kwargs)
        return model.visual, BackboneOrigin(f"open_clip/{name}", pretrained=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = open_clip.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "not found" in str(exc).lower() and "pretrained" in str(exc).lower():
            raise
        raise _weights_error(f"open_clip:{name}", f"tag {pretrained!r}", exc) from None
    except (OSError, ConnectionError, TimeoutError) as exc:
        raise _weights_error(f"open_clip:{name}", f"tag {pretrained!r}", exc) from None
    return model.visual, BackboneOrigin(f"open_clip/{name}", extra={"pretrained_tag": pretrained}, pretrained=True)


_CREATORS = {"timm": _create_timm, "hf": _create_hf, "open_clip": _create_open_clip}
