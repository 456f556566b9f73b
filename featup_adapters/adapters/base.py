"""The feature contract every adapter fulfils.

An adapter tells :class:`~featup_adapters.neck.FeatUpNeck` four things about a backbone:

* which module's output holds the features (``spec.module``, a dotted name, ``""`` = the root);
* which module receives the image (``spec.input_module``), whose input becomes the guidance;
* how that output becomes a map ``Tensor[B, C, h, w]`` (``spec.layout``, ``spec.select``,
  ``spec.num_prefix_tokens`` and the token grid for an image size);
* what the features are (``spec.channels``, ``spec.stride``) and how images are normalized
  (``spec.mean``, ``spec.std``).

Ecosystem adapters (``timm.py``, ``transformers.py``, ``open_clip.py``, ``generic.py``) subclass
:class:`Adapter` and override only what differs: how the backbone is called, how the token grid is
computed, and which input sizes the backbone accepts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

LAYOUTS = ("auto", "nchw", "nhwc", "tokens", "tokens_lnc")
"""How a hooked tensor is laid out.

``nchw``: ``Tensor[B, C, h, w]`` (CNNs). ``nhwc``: ``Tensor[B, h, w, C]`` (Swin).
``tokens``: ``Tensor[B, N, C]`` with ``N = prefix + h * w`` (ViTs, batch first).
``tokens_lnc``: ``Tensor[N, B, C]`` (sequence first). ``auto``: 4-D is ``nchw``, 3-D is ``tokens``.
"""

Select = Union[None, int, str]


@dataclass(frozen=True)
class Layer:
    """A user's choice of feature layer, with how to read it.

    Pass it as ``layer=`` to :func:`featup_adapters.wrap` when a module name alone is not enough,
    e.g. for a torchvision ViT: ``Layer("encoder.ln", layout="tokens", num_prefix_tokens=1,
    patch_size=16)``. ``None`` fields are filled in by the ecosystem adapter where it can.

    Args:
        name: dotted module name (``dict(model.named_modules())`` key); ``""`` is the model itself.
        layout: one of ``"auto"``, ``"nchw"``, ``"nhwc"``, ``"tokens"``, ``"tokens_lnc"``.
        num_prefix_tokens: class/register/distillation tokens before the patch tokens.
        patch_size: pixels per feature cell (the stride); needed to lay tokens on a grid.
        select: which part of the module output is the feature tensor: ``None`` (the output, or
            its first element for tuples), an index, or an attribute / key name such as
            ``"last_hidden_state"`` or ``"feature_maps"`` (the last entry of a list is taken).
        channels: feature channels, if known without running the model.
    """

    name: str
    layout: str = "auto"
    num_prefix_tokens: Optional[int] = None
    patch_size: Optional[int] = None
    select: Select = None
    channels: Optional[int] = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"expected layer name as str, got {type(self.name).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"expected layout in {LAYOUTS}, got {self.layout!r}")


@dataclass(frozen=True)
class FeatureSpec:
    """What an adapter knows about a backbone's features (see the module docstring)."""

    module: str
    layout: str = "nchw"
    channels: Optional[int] = None
    stride: Optional[int] = None
    num_prefix_tokens: Optional[int] = 0
    select: Select = None
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD
    input_module: str = ""
    backbone_id: Optional[str] = None

    def replace(self, **changes: Any) -> "FeatureSpec":
        return dataclasses.replace(self, **changes)


def _as_triple(values: Sequence[float], what: str) -> Tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"expected 3 {what} values (one per RGB channel), got {len(values)}: {values}")
    return values  # type: ignore[return-value]


def select_tensor(output: Any, select: Select, where: str) -> Tensor:
    """Pick the feature tensor out of a module's output (tensor, tuple, dict or ModelOutput)."""
    value = output
    if isinstance(select, str):
        if isinstance(value, dict) or hasattr(value, "keys"):
            try:
                value = value[select]
            except KeyError:
                value = getattr(value, select, None)
        else:
            value = getattr(value, select, None)
        if value is None:
            raise RuntimeError(f"the output of {where} has no {select!r} (got {type(output).__name__})")
    elif isinstance(select, int):
        value = value[select]
    if isinstance(value, (list, tuple)) and not torch.is_tensor(value):
        if not value:
            raise RuntimeError(f"the output of {where} is an empty {type(value).__name__}")
        value = value[-1] if isinstance(select, str) else value[0]
    elif not torch.is_tensor(value) and hasattr(value, "to_tuple"):  # a transformers ModelOutput
        value = value.to_tuple()[0]
    if not torch.is_tensor(value):
        raise RuntimeError(f"expected a tensor from {where}, got {type(value).__name__}; "
                           "pass layer=Layer(name, select=...) to say which part of the output to use")
    return value


class Adapter:
    """Reads one backbone's features through hooks (see the module docstring).

    Subclasses override :meth:`call`, :meth:`grid_size` and :meth:`check_input` where their
    ecosystem differs. An adapter holds no tensors and no hooks; the neck owns those.
    """

    ecosystem = "generic"

    def __init__(self, spec: FeatureSpec):
        if spec.layout not in LAYOUTS:
            raise ValueError(f"expected layout in {LAYOUTS}, got {spec.layout!r}")
        self.spec = spec.replace(mean=_as_triple(spec.mean, "mean"), std=_as_triple(spec.std, "std"))

    def __repr__(self) -> str:
        s = self.spec
        return (f"{type(self).__name__}(module={s.module!r}, layout={s.layout!r}, channels={s.channels}, "
                f"stride={s.stride}, num_prefix_tokens={s.num_prefix_tokens})")

    # -- overridable per ecosystem ----------------------------------------------------------
    def call(self, backbone: nn.Module, images: Tensor) -> Any:
        """Run the backbone on ``images`` (``Tensor[B, 3, H, W]``) the way its users do."""
        return backbone(images)

    def check_input(self, backbone: nn.Module, images: Tensor) -> None:
        """Raise a clear error for an image size the backbone rejects (default: accept all)."""

    def grid_size(self, backbone: nn.Module, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid ``(h, w)`` for an image of ``image_size = (H, W)`` (token layouts only)."""
        stride = self.spec.stride
        if stride is None:
            raise RuntimeError(
                f"cannot lay the tokens of {self.spec.module!r} on a grid without the patch size; "
                "pass layer=Layer(name, layout='tokens', patch_size=P)")
        return image_size[0] // stride, image_size[1] // stride

    # -- the contract -------------------------------------------------------------------------
    def module(self, backbone: nn.Module) -> nn.Module:
        return get_module(backbone, self.spec.module)

    def input_module(self, backbone: nn.Module) -> nn.Module:
        return get_module(backbone, self.spec.input_module)

    def select(self, output: Any) -> Tensor:
        return select_tensor(output, self.spec.select, f"module {self.spec.module or '<root>'!r}")

    def to_map(self, features: Tensor, backbone: nn.Module, image_size: Tuple[int, int]) -> Tensor:
        """Turn the hooked tensor into ``Tensor[B, C, h, w]`` without changing any value."""
        layout = self.spec.layout
        if layout == "auto":
            layout = {4: "nchw", 3: "tokens"}.get(features.dim(), "unknown")
        if layout == "nchw":
            _expect_dims(features, 4, "[B, C, h, w]", self.spec.module)
            return features
        if layout == "nhwc":
            _expect_dims(features, 4, "[B, h, w, C]", self.spec.module)
            return features.permute(0, 3, 1, 2)
        if layout in ("tokens", "tokens_lnc"):
            _expect_dims(features, 3, "[B, N, C]" if layout == "tokens" else "[N, B, C]", self.spec.module)
            if layout == "tokens_lnc":
                features = features.transpose(0, 1)
            h, w = self.grid_size(backbone, image_size)
            n = features.shape[1]
            prefix = self.spec.num_prefix_tokens
            if prefix is None:
                prefix = n - h * w
            if prefix < 0 or n - prefix != h * w:
                raise RuntimeError(
                    f"expected {prefix if prefix >= 0 else 0} prefix tokens + {h}x{w} patch tokens from "
                    f"{self.spec.module!r} for a {image_size[0]}x{image_size[1]} image, got {n} tokens")
            b, _, c = features.shape
            return features[:, prefix:].transpose(1, 2).reshape(b, c, h, w)
        raise RuntimeError(f"cannot tell the layout of the {features.dim()}-D output of {self.spec.module!r} "
                           f"(shape {list(features.shape)}); pass layer=Layer(name, layout=...) with one of "
                           f"{LAYOUTS[1:]}")


def _expect_dims(t: Tensor, dims: int, shape: str, where: str) -> None:
    if t.dim() != dims:
        raise RuntimeError(f"expected features of shape {shape} from {where!r}, got {list(t.shape)}")


def get_module(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists what exists."""
    if name == "":
        return model
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        near = [n for n in names if n.split(".")[-1] == name.split(".")[-1]][:8] or names[-8:]
        raise ValueError(f"{type(model).__name__} has no module {name!r}; some that exist: {near}") from None


def _declared_size(backbone: nn.Module) -> Tuple[int, int]:
    """The input size a model declares (``image_size`` / ``img_size`` attribute), else 224x224."""
    for attr in ("image_size", "img_size"):
        value = getattr(backbone, attr, None)
        if isinstance(value, int) and value > 0:
            return value, value
        if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return int(value[0]), int(value[1])
    return 224, 224


def probe(backbone: nn.Module, adapter: Adapter, size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Run a dummy forward to learn ``(channels, stride)``; used only when the adapter cannot tell.

    ``size`` defaults to the size the model declares (``image_size`` / ``img_size``), else 224x224.
    """
    size = size if size is not None else _declared_size(backbone)
    captured = {}

    def hook(_m, _a, out):
        captured["out"] = out

    handle = adapter.module(backbone).register_forward_hook(hook)
    param = next(backbone.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in backbone.modules()]   # each module's own mode, restored after
    try:
        backbone.eval()
        with torch.no_grad():
            adapter.call(backbone, torch.zeros(1, 3, *size, dtype=dtype, device=device))
    finally:
        handle.remove()
        for m, mode in modes:
            m.training = mode
    if "out" not in captured:
        raise RuntimeError(f"module {adapter.spec.module!r} did not run during the backbone's forward")
    fmap = adapter.to_map(adapter.select(captured["out"]), backbone, size)
    return fmap.shape[1], max(1, round(size[0] / fmap.shape[2]))

