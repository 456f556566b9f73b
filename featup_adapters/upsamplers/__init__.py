"""Upsamplers: FeatUp's learned joint bilateral upsampler (stage, stack) and parameter-free baselines.

Every upsampler is an ``nn.Module`` called as ``up(source, guidance, output_size=None)`` (the single
JBU stage takes the guidance already at the output size) and has ``save_pretrained(dir)``; read
one back with ``featup_adapters.hub.load_upsampler``.
"""
from __future__ import annotations

from torch import nn

from ._base import UPSAMPLER_CLASSES, UpsamplerMixin, register_upsampler_class
from .baselines import BASELINES, InterpolateUpsampler
from .jbu import JBUStack, JointBilateralUpsampler, jbu, spatial_kernel, stage_sizes
from .universal import UniversalJBUStack

__all__ = ["jbu", "spatial_kernel", "stage_sizes", "JointBilateralUpsampler", "JBUStack",
           "UniversalJBUStack", "InterpolateUpsampler", "make_upsampler", "UpsamplerMixin", "register_upsampler_class",
           "UPSAMPLER_CLASSES", "KINDS"]

KINDS = ("jbu", *BASELINES)


def make_upsampler(kind: str, dim: int | None = None, **kwargs) -> nn.Module:
    """A fresh upsampler: ``"jbu"`` (a ``JBUStack(dim, **kwargs)``; needs ``dim``) or a baseline
    ``"bilinear"``, ``"bicubic"``, ``"nearest"`` (no parameters; ``dim`` is ignored)."""
    if not isinstance(kind, str):
        raise TypeError(f"make_upsampler: expected kind as a string in {list(KINDS)}, got "
                        f"{type(kind).__name__}")
    key = kind.lower()
    if key in ("jbu", "jbu_stack"):
        if dim is None:
            raise ValueError("make_upsampler('jbu') needs the feature channel count: "
                             "make_upsampler('jbu', dim=384)")
        return JBUStack(dim, **kwargs)
    if key in BASELINES:
        if kwargs:
            raise TypeError(f"make_upsampler({kind!r}) takes no options, got {sorted(kwargs)}")
        return InterpolateUpsampler(key)
    raise ValueError(f"make_upsampler: unknown kind {kind!r}; expected one of {list(KINDS)}")
