"""The frozen feature source a trainer learns to upsample: a backbone behind ``wrap``.

``feature_source(backbone_or_name, layer)`` accepts what ``featup_adapters.wrap`` accepts (a spec
string like ``"timm:resnet18"``, a registered name, a model) or an already wrapped neck, and returns
an object with ``features(x) -> Tensor[B, C, h, w]`` (``x`` normalized with ``mean``/``std``),
``feature_dim``, ``stride``, ``mean``, ``std``, ``backbone_id`` and ``layer``.  Failures to find
features are raised here, before any training starts.
"""
from __future__ import annotations

from torch import nn

_REQUIRED = ("features", "feature_dim", "stride", "mean", "std")


def is_feature_source(obj) -> bool:
    return all(hasattr(obj, a) for a in _REQUIRED)


def feature_source(backbone, layer: str | None = None, *, pretrained: bool | None = None):
    """Resolve ``backbone`` (spec string, registered name, model, or neck) to a frozen neck.

    ``pretrained`` applies to spec strings (see ``featup_adapters.wrap``)."""
    if is_feature_source(backbone) and not isinstance(backbone, str):
        src = backbone
    else:
        from .. import neck as _neck
        from ..adapters.registry import PretrainedWeightsError

        try:
            src = _neck.wrap(backbone, upsampler=nn.Identity(), layer=layer,
                             pretrained=pretrained if isinstance(backbone, str) else None)
        except (PretrainedWeightsError, ImportError):
            raise
        except (ValueError, KeyError, LookupError, RuntimeError, TypeError, AttributeError) as e:
            what = backbone if isinstance(backbone, str) else type(backbone).__name__
            raise ValueError(f"cannot find features for backbone {what!r}"
                             + (f" (layer {layer!r})" if layer else "") + f": {e}") from e
        src._created_for_training = True
    if isinstance(src, nn.Module):
        src.eval()   # features are always computed under no_grad
    return src


def release(src) -> None:
    """Detach the hooks of a neck that :func:`feature_source` created (the user's model is left
    as it came); a neck the caller passed in is left alone."""
    if getattr(src, "_created_for_training", False) and hasattr(src, "remove"):
        src.remove()


def source_id(src) -> str:
    bid = getattr(src, "backbone_id", None)
    return str(bid) if bid else type(src).__name__


def source_layer(src, layer: str | None = None):
    return getattr(src, "layer", None) or layer
