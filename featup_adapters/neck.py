"""``FeatUpNeck`` and ``wrap``: a backbone whose output is its own features at image resolution.

    neck = featup_adapters.wrap(timm.create_model("vit_small_patch16_224.dino", pretrained=True))
    hr = neck(images)                           # Tensor[B, C, H, W]
    hr, lr = neck(images, return_lowres=True)   # lr: Tensor[B, C, H / 16, W / 16]

How it works: a forward pre-hook on the module that receives the image captures the guidance (the
very tensor the backbone got, so normalization matches training); a forward hook on the feature
module captures its output, which the adapter turns into ``Tensor[B, C, h, w]`` without changing a
value. Hooks only record while the neck's own forward runs, and they record per running forward:
the slot is keyed by the calling thread, since forward hooks run in the thread that calls the
model and ``DataParallel`` runs each device's replica (which shares the original's hooks) in its own
thread. So each device keeps its own outputs, a backbone that moves tensors across devices is
still read, and concurrent calls from several threads do not mix. What a forward stored is
dropped when it ends, exception or not. Calling
the backbone directly while wrapped returns its normal output; ``neck.remove()`` (or leaving a
``with`` block) detaches every hook.
"""
from __future__ import annotations

import inspect
import math
import threading
from numbers import Real
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapters import Adapter, Layer, adapter_for
from .adapters.base import probe
from .adapters.registry import backbone_origin, resolve_backbone

BASELINES = ("bilinear", "bicubic", "nearest", "jbu")
OutputSize = Union[None, Real, Sequence[int]]


class _Recorder:
    """Hook target: stores outputs in ``store[thread]`` while that thread's neck forward runs."""

    def __init__(self, store: Dict[Any, Dict[str, Any]], select):
        self.store = store
        self.select = select

    def features(self, module, args, output):
        if not self.store:  # not armed: a direct call of the backbone, leave it alone
            return
        slot = self.store.get(threading.get_ident())
        if slot is not None:
            slot["features"] = self.select(output)

    def guidance(self, module, args, kwargs):
        if not self.store:
            return
        slot = self.store.get(threading.get_ident())
        if slot is None or "guidance" in slot:
            return
        image = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        if torch.is_tensor(image):
            slot["guidance"] = image


class FeatUpNeck(nn.Module):
    """A backbone, an adapter that finds its features, and an upsampler for them.

    Use :func:`wrap` to build one. Attributes: ``backbone``, ``adapter``, ``upsampler``, ``norm``
    (``nn.LayerNorm`` over channels or None), ``feature_dim``, ``stride``, ``mean``, ``std``,
    ``backbone_id``, ``layer`` (the hooked module's name).

    Args:
        backbone: the model; left unchanged apart from the hooks.
        upsampler: ``upsampler(source[B, C, h, w], guidance[B, 3, H, W], output_size=(H', W'))
            -> Tensor[B, C, H', W']`` (``output_size`` may be absent from its signature; then its
            output is resized bilinearly).
        adapter: an :class:`~featup_adapters.adapters.Adapter` for ``backbone``.
        output_size: None (the input image size), an (H, W) pair, or a number (scale factor of the
            image size).
        use_norm: apply a LayerNorm over channels to the features before upsampling.
        backbone_id: id of the backbone (default: the adapter's).
        backbone_pretrained: whether the backbone holds pretrained weights (True / False), or None
            when unknown; an upsampler trained for the other kind is refused by :func:`wrap`.
        max_memory: memory budget of the upsampler's forward (bytes or a string like ``"8GB"``;
            None: the upsampler's default), for upsamplers whose ``forward`` takes ``max_memory``
            (``JBUStack``); given for any other upsampler it is refused.
        out_dtype: dtype of the upsampled features (None: the features' dtype), likewise passed
            to an upsampler whose ``forward`` takes ``out_dtype`` and refused for others.

    The neck starts in the backbone's mode (``backbone.training``): a backbone in eval mode gives a
    neck whose upsampler's dropout is off, so two calls on one image agree. The backbone's own
    modules keep their modes; ``neck.train()`` / ``neck.eval()`` then set everything, as usual.
    """

    def __init__(self, backbone: nn.Module, upsampler: nn.Module, adapter: Adapter, *,
                 output_size: OutputSize = None, use_norm: bool = False, backbone_id: Optional[str] = None,
                 backbone_pretrained: Optional[bool] = None, max_memory=None,
                 out_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.upsampler_options = _supported(upsampler, _upsampler_options(max_memory, out_dtype))
        self.backbone = backbone
        self.upsampler = upsampler
        self.adapter = adapter
        self.output_size = _check_output_size(output_size)
        self.backbone_id = backbone_id if backbone_id is not None else adapter.spec.backbone_id
        self.backbone_pretrained = backbone_pretrained
        self._dims: Optional[Tuple[int, int]] = None
        self.norm = nn.LayerNorm(self.feature_dim) if use_norm else None
        self._store: Dict[Any, Dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._takes_size = _accepts(upsampler, "output_size")
        recorder = _Recorder(self._store, adapter.select)
        self._handles = [
            adapter.module(backbone).register_forward_hook(recorder.features),
            adapter.input_module(backbone).register_forward_pre_hook(recorder.guidance, with_kwargs=True),
        ]
        self.follow_backbone_mode()

    def follow_backbone_mode(self) -> "FeatUpNeck":
        """Put the upsampler and the norm in the backbone's mode without touching the backbone's
        modules (a backbone in train mode may hold frozen, eval-mode parts). Returns ``self``."""
        mode = bool(self.backbone.training)
        self.training = mode
        for name, child in self.named_children():
            if name != "backbone":
                child.train(mode)
        return self

    # -- what the features are ----------------------------------------------------------------
    def _channels_stride(self) -> Tuple[int, int]:
        if self._dims is None:
            spec = self.adapter.spec
            if spec.channels is not None and spec.stride is not None:
                self._dims = (int(spec.channels), int(spec.stride))
            else:
                channels, stride = probe(self.backbone, self.adapter)
                self._dims = (int(spec.channels or channels), int(spec.stride or stride))
        return self._dims

    @property
    def feature_dim(self) -> int:
        """Channels C of the features."""
        return self._channels_stride()[0]

    @property
    def stride(self) -> int:
        """Image pixels per feature cell (the patch size of a ViT, the reduction of a CNN stage)."""
        return self._channels_stride()[1]

    @property
    def mean(self) -> Tuple[float, float, float]:
        return self.adapter.spec.mean

    @property
    def std(self) -> Tuple[float, float, float]:
        return self.adapter.spec.std

    @property
    def layer(self) -> str:
        return self.adapter.spec.module

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- running ------------------------------------------------------------------------------
    def _run(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        if not self._handles:
            raise RuntimeError("this FeatUpNeck was removed (its hooks are detached); wrap the backbone again")
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            got = list(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected images of shape [B, 3, H, W], got {got}")
        self._check_images(images)
        self.adapter.check_input(self.backbone, images)
        key = threading.get_ident()
        with self._lock:
            if key in self._store:
                raise RuntimeError("FeatUpNeck.forward is not re-entrant: the backbone called the neck again")
            self._store[key] = {}
        try:
            self.adapter.call(self.backbone, images)
            slot = self._store[key]
        except Exception as err:
            err.add_note(f"featup_adapters: raised by the wrapped {type(self.backbone).__name__} on images of shape "
                         f"{list(images.shape)}; if it rejects this size, resize the images or build the backbone "
                         "for it")
            raise
        finally:
            with self._lock:
                self._store.pop(key, None)
        if "features" not in slot:
            raise RuntimeError(f"module {self.layer!r} did not run during the backbone's forward; "
                               "pass layer= to choose one that does")
        guidance = slot.get("guidance", images)
        lowres = self.adapter.to_map(slot["features"], self.backbone, tuple(images.shape[-2:]))
        if self.norm is not None:
            lowres = F.layer_norm(lowres.permute(0, 2, 3, 1), (lowres.shape[1],), self.norm.weight,
                                  self.norm.bias, self.norm.eps).permute(0, 3, 1, 2)
        return lowres, guidance

    def _check_images(self, images: Tensor) -> None:
        if not images.is_floating_point():
            raise TypeError(f"expected float images normalized with the backbone's mean/std, got dtype "
                            f"{images.dtype}; for 0..255 pixels use featup_adapters.images.to_tensor(rgb, "
                            "neck.mean, neck.std) or ((x.float() / 255) - mean) / std")
        weight = next((p for p in self.backbone.parameters() if p.is_floating_point()), None)
        if (weight is not None and images.dtype != weight.dtype
                and not torch.is_autocast_enabled(images.device.type)):
            raise TypeError(f"images are {images.dtype} but the backbone's weights are {weight.dtype}: pass "
                            f"images.to({weight.dtype}), convert the model (neck.to({images.dtype})), or run "
                            f"under torch.autocast")
        H, W = images.shape[-2:]
        stride = self.stride
        if H < stride or W < stride:
            raise ValueError(f"expected images of at least {stride}x{stride} pixels (the feature stride of "
                             f"{self.backbone_id or type(self.backbone).__name__}), got {H}x{W}; "
                             "resize them first")

    def features(self, images: Tensor) -> Tensor:
        """Run the backbone and return its hooked features, ``Tensor[B, C, h, w]``, not upsampled.

        ``images``: ``Tensor[B, 3, H, W]`` normalized with ``mean`` / ``std``. With ``use_norm`` the
        channel LayerNorm is applied (these are the features the upsampler consumes).
        """
        return self._run(images)[0]

    def target_size(self, image_size: Tuple[int, int]) -> Tuple[int, int]:
        """Output (H', W') for an image of ``image_size``."""
        size = self.output_size
        if size is None:
            return int(image_size[0]), int(image_size[1])
        if isinstance(size, tuple):
            return size
        return max(1, round(image_size[0] * size)), max(1, round(image_size[1] * size))

    def forward(self, images: Tensor, return_lowres: bool = False):
        """``images``: ``Tensor[B, 3, H, W]`` -> ``Tensor[B, C, H', W']`` (``(hr, lr)`` with ``return_lowres``)."""
        lowres, guidance = self._run(images)
        size = self.target_size(tuple(images.shape[-2:]))
        # checked again here: the upsampler may have been replaced since wrap
        options = _supported(self.upsampler, getattr(self, "upsampler_options", {}))
        if self._takes_size:
            highres = self.upsampler(lowres, guidance, output_size=size, **options)
        else:
            highres = self.upsampler(lowres, guidance, **options)
        if tuple(highres.shape[-2:]) != size:
            highres = F.interpolate(highres, size=size, mode="bilinear", align_corners=False)
        return (highres, lowres) if return_lowres else highres

    # -- hooks as a resource ------------------------------------------------------------------
    def remove(self) -> None:
        """Detach every hook; the backbone is left exactly as before ``wrap``. Idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._store.clear()

    def __enter__(self) -> "FeatUpNeck":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def extra_repr(self) -> str:
        return (f"backbone_id={self.backbone_id!r}, layer={self.layer!r}, output_size={self.output_size}, "
                f"use_norm={self.norm is not None}")

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _upsampler_options(max_memory=None, out_dtype=None) -> Dict[str, Any]:
    """The upsampler options given (not None), checked; a malformed value raises naming what was
    expected."""
    from .upsamplers._tiling import parse_max_memory

    options: Dict[str, Any] = {}
    if max_memory is not None:
        options["max_memory"] = parse_max_memory(max_memory)
    if out_dtype is not None:
        if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
            raise TypeError(f"expected out_dtype as a floating torch.dtype (e.g. torch.float16), "
                            f"got {out_dtype!r}")
        options["out_dtype"] = out_dtype
    return options


def _supported(upsampler: nn.Module, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options``, if ``upsampler.forward`` takes each of them; else a TypeError (never ignored).
    ``**kwargs`` alone does not count: it could drop the value silently."""
    for name in options:
        try:
            param = inspect.signature(upsampler.forward).parameters.get(name)
        except (TypeError, ValueError):
            param = None
        if param is None or param.kind not in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY):
            raise TypeError(f"{name}= was given, but the upsampler {type(upsampler).__name__} cannot "
                            f"honour it (its forward takes no {name} argument; JBUStack does); "
                            f"drop {name} or use a JBU upsampler")
    return options


def _check_output_size(size: OutputSize):
    if size is None:
        return None
    if isinstance(size, bool):
        raise TypeError(f"expected output_size as None, an (H, W) pair or a scale factor, got {size!r}")
    if isinstance(size, Real):
        if not math.isfinite(float(size)) or size <= 0:
            raise ValueError(f"expected a positive, finite scale factor for output_size, got {size!r}")
        return float(size)
    if isinstance(size, torch.Size):
        size = tuple(size)
    if (isinstance(size, Sequence) and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        return (int(size[0]), int(size[1]))
    raise TypeError(f"expected output_size as None, an (H, W) pair of positive ints or a scale factor, got {size!r}")


def recorded_pretrained(upsampler: nn.Module) -> Optional[bool]:
    """Whether ``upsampler`` was trained on a pretrained backbone, as its config records it
    (``config["backbone_pretrained"]``, or inside ``config["extra"]``); None when not recorded."""
    cfg = getattr(upsampler, "config", None) or {}
    value = cfg.get("backbone_pretrained")
    if value is None and isinstance(cfg.get("extra"), dict):
        value = cfg["extra"].get("backbone_pretrained")
    return value if isinstance(value, bool) else None


def _check_pretrained_kind(module: nn.Module, backbone_pretrained: Optional[bool], backbone_id, *,
                           registered: bool) -> None:
    """Refuse an upsampler trained on a pretrained backbone for a random-init one, and vice versa.

    Registered upsamplers (``"auto"``) that record nothing were published for pretrained backbones.
    """
    if backbone_pretrained is None:
        return
    theirs = recorded_pretrained(module)
    if theirs is None and registered:
        theirs = True
    if theirs is None or theirs == backbone_pretrained:
        return
    from . import hub

    cfg = getattr(module, "config", None) or {}
    name = cfg.get("name") or cfg.get("path") or type(module).__name__
    kind = {True: "pretrained", False: "random-init"}
    error = getattr(hub, "IncompatibleUpsamplerError", ValueError)
    raise error(f"upsampler {name} was trained on a {kind[theirs]} backbone, but the wrapped backbone "
                f"{backbone_id or '(unnamed)'} is {kind[backbone_pretrained]}; "
                + ("load the backbone with pretrained=True (drop --no-pretrained)" if theirs else
                   "train an upsampler for the pretrained backbone")
                + ", or pass upsampler='bilinear'")


def _resolve_upsampler(upsampler, dim: int, backbone_id: Optional[str],
                       backbone_pretrained: Optional[bool] = None) -> nn.Module:
    if isinstance(upsampler, nn.Module):
        if hasattr(upsampler, "config"):
            from . import hub

            hub.check_compatible(upsampler, dim=dim, backbone_id=backbone_id)
            _check_pretrained_kind(upsampler, backbone_pretrained, backbone_id, registered=False)
        return upsampler
    if not isinstance(upsampler, str):
        raise TypeError("expected upsampler as 'auto', 'bilinear', 'bicubic', 'nearest', 'jbu', a path, a registered "
                        f"name or an nn.Module, got {type(upsampler).__name__}")
    if upsampler in BASELINES:
        from .upsamplers import make_upsampler

        return make_upsampler(upsampler, dim=dim)
    from . import hub

    if upsampler == "auto":
        name = hub.pretrained_for(backbone_id) if backbone_id else None
        if name is None:
            raise LookupError(
                f"no pretrained upsampler is registered for backbone {backbone_id!r}. Train one with "
                f"`featup-adapters train --backbone <spec> --data <images> --out <dir>` (e.g. --backbone "
                f"{_spec_hint(backbone_id)}) and pass upsampler='<dir>', or use upsampler='bilinear' / 'bicubic' "
                "as a baseline")
        entry = next((e for e in hub.list_upsamplers() if e.get("name") == name), {})
        if backbone_pretrained is False and entry.get("backbone_pretrained") is not False:  # before any download
            raise LookupError(
                f"backbone {backbone_id!r} is random-init (pretrained=False), and the upsampler registered for "
                f"it ({name}) was trained on the pretrained backbone; load the backbone with its pretrained "
                "weights, pass a directory of an upsampler trained on this random-init backbone, or use "
                "upsampler='bilinear' / 'bicubic' as a baseline")
        if entry.get("dim") is not None and int(entry["dim"]) != int(dim):  # before any download
            error = getattr(hub, "IncompatibleUpsamplerError", ValueError)
            raise error(f"the pretrained upsampler {name} registered for backbone {backbone_id!r} expects "
                        f"{entry['dim']}-channel features ({entry.get('features') or 'see its entry'}), but the "
                        f"chosen layer gives {dim} channels; pick the matching layer= or train an upsampler "
                        f"for these features (`featup-adapters train --backbone {_spec_hint(backbone_id)}`)")
        upsampler = name
    if upsampler in BASELINES:
        from .upsamplers import make_upsampler

        return make_upsampler(upsampler, dim=dim)
    registered = upsampler in {e.get("name") for e in hub.list_upsamplers()}
    module = hub.load_upsampler(upsampler)
    hub.check_compatible(module, dim=dim, backbone_id=backbone_id)
    _check_pretrained_kind(module, backbone_pretrained, backbone_id, registered=registered)
    return module


def _spec_hint(backbone_id: Optional[str]) -> str:
    if not backbone_id:
        return "timm:resnet18"
    eco, _, name = backbone_id.partition("/")
    return f"{eco}:{name}" if name and eco in ("timm", "hf", "open_clip") else backbone_id


def wrap(backbone: Union[str, nn.Module], upsampler: Union[str, nn.Module] = "auto", *,
         layer: Union[None, str, Layer] = None, output_size: OutputSize = None, use_norm: Optional[bool] = None,
         backbone_id: Optional[str] = None, pretrained: Union[None, bool, str] = None,
         max_memory=None, out_dtype: Optional[torch.dtype] = None) -> FeatUpNeck:
    """Attach an upsampler to ``backbone``'s features.

    Args:
        backbone: a timm / transformers / open_clip model, any ``nn.Module`` (with ``layer=``), or a
            spec string: ``"timm:NAME"``, ``"hf:ID"``, ``"open_clip:NAME"``, a registered name.
        upsampler: ``"auto"`` (the registered pretrained upsampler for this backbone; an error says how
            to train one if none is known), ``"bilinear"`` / ``"bicubic"`` / ``"nearest"`` baselines,
            ``"jbu"`` (a fresh, untrained JBU stack), ``"universal"`` (the shipped channel-agnostic
            ``UniversalJBUStack``, for any backbone), a directory or registered name for
            ``featup_adapters.hub.load_upsampler``, or a module.
        layer: module whose output to upsample (name or :class:`~featup_adapters.adapters.Layer`);
            None = the adapter's default, the last spatial features.
        output_size: None (the image size), an (H, W) pair, or a scale factor.
        use_norm: LayerNorm over channels before upsampling; None = what the upsampler's config says
            (FeatUp's "norm" checkpoints), else off.
        backbone_id: override the id used to find and check pretrained upsamplers.
        pretrained: for a spec string: None / True load its pretrained weights (the default; an
            error names them when offline), False builds it at random init (then ``"auto"`` finds no
            upsampler, since the registered ones were trained on pretrained backbones).
        max_memory: memory budget of the upsampler's forward, bytes or a string like ``"8GB"``
            (None: the upsampler's own default, a fraction of the memory available). Honoured by
            the JBU upsamplers (large outputs are then computed in row bands, or refused up front
            with a ``MemoryBudgetError``); refused for an upsampler that cannot honour it.
        out_dtype: dtype of the upsampled features (None: the features' dtype); likewise.

    An upsampler whose config records the other kind of backbone (``backbone_pretrained``) than
    the wrapped one is refused.

    Returns:
        :class:`FeatUpNeck` in the backbone's mode: a backbone in eval mode (as
        ``default_backbone()`` and loaded models are) gives a neck ready for inference; call
        ``neck.eval()`` on a backbone still in training mode.

    Example:
        >>> neck = wrap("timm:resnet18", "bilinear")
        >>> neck(torch.randn(1, 3, 64, 96)).shape
        torch.Size([1, 512, 64, 96])
    """
    options = _upsampler_options(max_memory, out_dtype)   # malformed values: before any work
    if isinstance(backbone, str):
        backbone, origin = resolve_backbone(backbone, pretrained=pretrained)
    else:
        if pretrained is not None:
            raise TypeError("wrap: pretrained= applies to a backbone spec string; this backbone is already built")
        origin = backbone_origin(backbone)
    known = origin.pretrained if origin is not None else None
    adapter = adapter_for(backbone, layer)
    bid = backbone_id if backbone_id is not None else adapter.spec.backbone_id
    neck = FeatUpNeck(backbone, nn.Identity(), adapter, output_size=output_size, backbone_id=bid,
                      backbone_pretrained=known)
    try:
        module = _resolve_upsampler(upsampler, neck.feature_dim, bid, known)
        neck.upsampler_options = _supported(module, options)
    except BaseException:
        neck.remove()
        raise
    if use_norm is None:
        use_norm = bool((getattr(module, "config", None) or {}).get("use_norm", False))
    neck.upsampler = module
    neck._takes_size = _accepts(module, "output_size")
    if use_norm:
        neck.norm = nn.LayerNorm(neck.feature_dim)  # FeatUp's norm: a plain LayerNorm at init values
    return neck.follow_backbone_mode()
