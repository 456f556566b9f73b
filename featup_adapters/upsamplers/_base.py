"""What every upsampler shares: input checks, output-size parsing, ``save_pretrained`` and the class
registry that lets ``featup_adapters.hub.load_upsampler`` rebuild a saved module from its config.

Saving and loading (``save_pretrained``, ``from_pretrained``, ``push_to_hub``) and the class registry
live in ``_pretrained``; the file format in ``featup_adapters._format`` (below this package and ``hub``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._pretrained import (UPSAMPLER_CLASSES, PretrainedMixin, check_registered,
                          register_upsampler_class)


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_radius(radius, who: str) -> int:
    """A window radius r: an int >= 0 whose window k = 2r + 1 the adaptive-conv kernels take."""
    from ..ops._checks import MAX_KERNEL_SIZE

    if isinstance(radius, bool) or not isinstance(radius, int):
        raise TypeError(f"{who}: expected an integer radius (window k = 2 * radius + 1), got {radius!r}")
    max_radius = (MAX_KERNEL_SIZE - 1) // 2
    if not 0 <= radius <= max_radius:
        raise ValueError(f"{who}: expected radius in 0..{max_radius} (window k = 2 * radius + 1 <= "
                         f"{MAX_KERNEL_SIZE}, the adaptive-conv limit), got {radius} (k = {2 * radius + 1})")
    return radius


def check_channels(name: str, value, who: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{who}: expected a positive channel count {name}, got {value!r}")
    return value


def check_input_dtypes(source: Tensor, guidance: Tensor | None, weight: Tensor, who: str) -> None:
    """Source and guidance must be floating point and, outside autocast, in the weights' dtype.

    Under ``torch.autocast`` any floating dtype is accepted (autocast casts per op).
    """
    for name, t in (("source", source), ("guidance", guidance)):
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point {name} (float32, float64, float16, bfloat16), "
                            f"got {t.dtype}; convert it, e.g. {name}.float()")
    if torch.is_autocast_enabled(source.device.type):
        return
    for name, t in (("source", source), ("guidance", guidance)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{who}: {name} is {t.dtype} but the weights are {weight.dtype}; pass "
                            f"{name}.to({weight.dtype}), convert the module with .to({t.dtype}), or run "
                            f"under torch.autocast")


def check_4d(name: str, t, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"expected {name} to be a Tensor{layout}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"expected {name} of shape {layout} (4-D), got a {t.dim()}-D tensor of "
                         f"shape {_shape(t)}")


def parse_output_size(output_size, guidance: Tensor | None) -> tuple[int, int]:
    """``None`` -> the guidance's (H, W); an int n -> (n, n); a pair -> itself (ints >= 1)."""
    if output_size is None:
        if guidance is None:
            raise ValueError("output_size is required when no guidance image is given")
        return int(guidance.shape[-2]), int(guidance.shape[-1])
    if isinstance(output_size, torch.Size):
        output_size = tuple(output_size)
    if isinstance(output_size, bool) or isinstance(output_size, float):
        raise TypeError(f"expected output_size as an int or an (H, W) pair of ints, got "
                        f"{output_size!r} (for a scale factor pass (round(h * s), round(w * s)))")
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    if (not isinstance(output_size, Sequence) or len(output_size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in output_size)):
        raise TypeError(f"expected output_size as an int or an (H, W) pair of ints, got "
                        f"{output_size!r}")
    H, W = output_size
    if H < 1 or W < 1:
        raise ValueError(f"expected a positive output_size, got {output_size!r}")
    return int(H), int(W)


def check_upsampler_inputs(source: Tensor, guidance: Tensor | None, output_size, *,
                           guidance_dim: int | None = None, dim: int | None = None,
                           who: str = "upsampler") -> tuple[int, int]:
    """Boundary checks shared by every upsampler; returns the output (H, W).

    Each error says what was expected and what came.
    """
    check_4d("source", source, "[B, C, h, w]")
    if guidance is not None:
        check_4d("guidance", guidance,
                 f"[B, {guidance_dim if guidance_dim is not None else 'C_g'}, H, W]")
        if guidance.shape[0] != source.shape[0]:
            raise ValueError(f"{who}: batch mismatch, source has B={source.shape[0]} (shape "
                             f"{_shape(source)}) but guidance has B={guidance.shape[0]} (shape "
                             f"{_shape(guidance)})")
        if guidance_dim is not None and guidance.shape[1] != guidance_dim:
            raise ValueError(f"{who}: expected guidance of shape [B, {guidance_dim}, H, W], got "
                             f"{_shape(guidance)} ({guidance.shape[1]} channels instead of "
                             f"{guidance_dim})")
        if guidance.device != source.device:
            raise ValueError(f"{who}: source and guidance must be on the same device, got source on "
                             f"{source.device} and guidance on {guidance.device}")
    if dim is not None and source.shape[1] != dim:
        raise ValueError(f"{who}: expected source of shape [B, {dim}, h, w] ({dim} channels), got "
                         f"{_shape(source)}")
    if source.shape[-2] < 1 or source.shape[-1] < 1:
        raise ValueError(f"{who}: expected a source with h, w >= 1, got shape {_shape(source)}")
    H, W = parse_output_size(output_size, guidance)
    h, w = source.shape[-2:]
    if H < h or W < w:
        raise ValueError(f"{who}: output size {H}x{W} is smaller than the source {h}x{w} "
                         f"(source shape {_shape(source)}); upsamplers only enlarge")
    return H, W


class UpsamplerMixin(PretrainedMixin):
    """Adds ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (see ``_pretrained``) and a
    ``config`` dict (metadata of the saved/loaded weights).

    Subclasses implement ``init_kwargs()``: the constructor arguments that rebuild them.
    """

    config: dict

    def init_kwargs(self) -> dict:  # pragma: no cover - every concrete class overrides it
        raise NotImplementedError
