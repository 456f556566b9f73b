"""Upsampler persistence and the registry of pretrained upsamplers.

* ``save_upsampler`` / ``UpsamplerMixin.save_pretrained`` write ``model.safetensors`` +
  ``config.json``; ``load_upsampler(dir_or_name)`` reads them back (or a FeatUp checkpoint, a URL,
  a registered name, or a baseline name).
* ``load_featup_checkpoint`` imports FeatUp's released Lightning checkpoints into a ``JBUStack``:
  weights-only unpickling, strict key and shape checks, downloads through torch.hub's cache.
* ``PRETRAINED``: FeatUp's released upsamplers; ``register_upsampler``, ``pretrained_for``,
  ``list_upsamplers``, ``check_compatible``.  Directories ``featup_adapters/weights/<name>/`` that
  hold a saved upsampler are registered under ``<name>`` when this module is imported.

Backbone ids are compared case-insensitively, with a leading ``hf-hub:`` dropped; they read like
``timm/vit_small_patch16_224.dino`` (also the model's Hugging Face Hub id), ``facebook/dinov2-small``
(transformers), ``open_clip/ViT-B-16``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_write_bytes as _atomic_write_bytes
from ._version import __version__

__all__ = ["save_upsampler", "load_upsampler", "load_featup_checkpoint", "check_compatible",
           "register_upsampler", "unregister_upsampler", "pretrained_for", "list_upsamplers",
           "PRETRAINED", "PretrainedUpsampler", "CheckpointError", "IncompatibleUpsamplerError",
           "normalize_backbone_id", "FEATUP_URL"]

FORMAT = "featup_adapters.upsampler"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class CheckpointError(ValueError):
    """A file that is not a usable upsampler checkpoint (unreadable, unsafe, wrong keys/shapes)."""


class IncompatibleUpsamplerError(ValueError):
    """An upsampler whose channel count or backbone does not match the features it is given."""


def normalize_backbone_id(backbone_id: str) -> str:
    s = str(backbone_id).strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
    return s.lower()


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, Tensor) else \
        f"<{type(t).__name__}, not a tensor>"


# ------------------------------------------------------------------------------------------------
# strict state-dict check
# ------------------------------------------------------------------------------------------------

def check_state_dict(module: nn.Module, state: Mapping, *, source: str, prefix: str = "") -> None:
    """Raise CheckpointError naming every missing / unexpected / misshapen key of ``state``
    (keys carry ``prefix``) against ``module.state_dict()``."""
    expected = module.state_dict()
    missing = [k for k in expected if prefix + k not in state]
    unexpected = [k for k in state if not k.startswith(prefix) or k[len(prefix):] not in expected]
    mismatched = []
    for k, v in expected.items():
        got = state.get(prefix + k)
        if got is None:
            continue
        if not isinstance(got, Tensor) or tuple(got.shape) != tuple(v.shape):
            mismatched.append((k, v, got))
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match {type(module).__name__}({_kwargs_repr(module)}):"]
    lines += [f"  missing key {prefix}{k} (expected shape {_shape(expected[k])})" for k in missing]
    lines += [f"  unexpected key {k} (shape {_shape(state[k])})" for k in unexpected]
    lines += [f"  shape mismatch for {prefix}{k}: expected {_shape(v)}, got {_shape(g)}"
              for k, v, g in mismatched]
    raise CheckpointError("\n".join(lines))


def _kwargs_repr(module) -> str:
    kw = module.init_kwargs() if hasattr(module, "init_kwargs") else {}
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


# ------------------------------------------------------------------------------------------------
# save_pretrained / load
# ------------------------------------------------------------------------------------------------

def save_upsampler(module: nn.Module, directory, *, backbone_id: str | None = None,
                   layer: str | None = None, use_norm: bool | None = None,
                   extra: dict | None = None) -> Path:
    """Write ``module``'s weights (safetensors) and config (JSON) into ``directory``; see
    ``UpsamplerMixin.save_pretrained``.  Returns the directory."""
    from .upsamplers import UPSAMPLER_CLASSES
    cls = type(module).__name__
    if UPSAMPLER_CLASSES.get(cls) is not type(module) or not hasattr(module, "init_kwargs"):
        raise TypeError(f"save_pretrained: {cls} is not a registered upsampler class "
                        f"(known: {sorted(UPSAMPLER_CLASSES)}); decorate it with "
                        f"featup_adapters.upsamplers.register_upsampler_class")
    old = getattr(module, "config", None) or {}
    init = module.init_kwargs()
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "class": cls, "init": init,
        "dim": getattr(module, "dim", None), "num_stages": getattr(module, "num_stages", None),
        "backbone_id": backbone_id if backbone_id is not None else old.get("backbone_id"),
        "compatible_backbones": ([] if backbone_id is not None
                                 else list(old.get("compatible_backbones") or [])),
        "layer": layer if layer is not None else old.get("layer"),
        "use_norm": bool(use_norm if use_norm is not None else old.get("use_norm", False)),
        "library": "featup_adapters", "library_version": __version__,
        "torch_version": torch.__version__.split("+")[0],
        "weights": WEIGHTS_NAME,
        "extra": dict(extra) if extra is not None else dict(old.get("extra") or {}),
    }
    if config["use_norm"] and old.get("norm"):
        config["norm"] = old["norm"]
    from safetensors.torch import save as st_save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    blob = st_save(tensors, metadata={"format": "pt", "class": cls})
    config["weights_sha256"] = hashlib.sha256(blob).hexdigest()
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_pretrained: extra/backbone_id/layer must be JSON-serializable: "
                        f"{exc}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(directory / WEIGHTS_NAME, blob)       # weights first, config commits
    _atomic_write_bytes(directory / CONFIG_NAME, (text + "\n").encode())
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a saved upsampler "
                              f"(save one with upsampler.save_pretrained(dir))")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a featup_adapters upsampler config "
                              f"(expected \"format\": \"{FORMAT}\")")
    return config


def _load_saved_dir(directory: Path, map_location) -> nn.Module:
    from packaging.version import InvalidVersion, Version
    from safetensors.torch import load as st_load

    from .upsamplers import UPSAMPLER_CLASSES
    config = _read_config(directory)
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} was saved in format version "
                              f"{config['format_version']} by featup_adapters "
                              f"{config.get('library_version')}; this is {__version__} (format "
                              f"{FORMAT_VERSION}): upgrade featup_adapters")
    try:
        if Version(str(config.get("library_version", "0"))) > Version(__version__):
            warnings.warn(f"{directory} was saved by featup_adapters "
                          f"{config['library_version']}, newer than this {__version__}",
                          stacklevel=3)
    except InvalidVersion:
        pass
    cls = UPSAMPLER_CLASSES.get(config.get("class"))
    if cls is None:
        raise CheckpointError(f"{directory}: unknown upsampler class {config.get('class')!r} "
                              f"(known: {sorted(UPSAMPLER_CLASSES)})")
    weights = directory / config.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing weights file {weights.name}")
    blob = weights.read_bytes()
    digest = config.get("weights_sha256")
    if digest and hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded in {CONFIG_NAME} "
                              f"(an interrupted or mixed save?); save the upsampler again")
    try:
        state = st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from None
    module = cls(**config.get("init", {}))
    check_state_dict(module, state, source=str(weights))
    module.load_state_dict(state)
    module.config = dict(config, path=str(directory))
    return module.to(map_location) if map_location is not None else module


# ------------------------------------------------------------------------------------------------
# FeatUp Lightning checkpoints
# ------------------------------------------------------------------------------------------------

# Globals from these namespaces (Lightning/hydra/omegaconf/numpy metadata in a Lightning file) are
# replaced by inert stand-ins instead of being imported or called; any other global outside
# torch's weights-only allowlist makes the file refused before anything is unpickled.
_METADATA_PREFIXES = ("omegaconf.", "hydra.", "lightning.", "pytorch_lightning.",
                      "lightning_fabric.", "lightning_utilities.", "torchmetrics.", "numpy.",
                      "_codecs.", "argparse.", "pathlib.", "collections.", "typing.",
                      "datetime.", "enum.", "fsspec.")
# builtin data types (e.g. the int in defaultdict(int)); never eval/exec/getattr/open/__import__
_METADATA_BUILTINS = {f"builtins.{n}" for n in ("int", "float", "str", "bool", "bytes", "bytearray",
                                                "complex", "list", "dict", "tuple", "set",
                                                "frozenset", "slice", "range", "object")}


class IgnoredObject(list):
    """Inert stand-in for a metadata object of a checkpoint that was not unpickled."""

    def __new__(cls, *args, **kwargs):
        return list.__new__(cls)

    def __init__(self, *args, **kwargs):
        list.__init__(self)

    def __setstate__(self, state):
        pass

    def __repr__(self):
        return "IgnoredObject()"


def _plain_dict(*args, **kwargs) -> dict:
    return {}


def _stand_in(name: str):
    if name.endswith("AttributeDict"):
        return dict               # a dict subclass pickled as NEWOBJ + SETITEMS
    if name == "collections.defaultdict":
        return _plain_dict        # REDUCE(defaultdict, (factory,)) + SETITEMS
    return IgnoredObject


def _load_weights_only(path: Path, map_location):
    """``torch.load(weights_only=True)`` with Lightning metadata replaced by inert objects."""
    src = str(path)
    try:
        unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(src))
    except ValueError:            # legacy (non-zip) torch file or not a torch file at all
        unsafe = None
    except Exception as exc:
        raise CheckpointError(f"{src} is not a PyTorch checkpoint (cannot read it: {exc})") from None
    if unsafe:
        refused = [g for g in unsafe
                   if not g.startswith(_METADATA_PREFIXES) and g not in _METADATA_BUILTINS]
        if refused:
            raise CheckpointError(
                f"refusing to load {src}: its pickle references {', '.join(refused)}, which could "
                f"run code when unpickled (nothing was executed). FeatUp checkpoints only hold "
                f"tensors and Lightning metadata; if you trust the file, re-save just its state "
                f"dict: torch.save({{'state_dict': torch.load(path, weights_only=False)"
                f"['state_dict']}}, new_path)")
    stand_ins = [(_stand_in(g), g) for g in unsafe or []]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(src, map_location=map_location, weights_only=True)
    except Exception as exc:
        if unsafe is None and not _looks_like_torch_file(path):
            raise CheckpointError(f"{src} is not a PyTorch checkpoint (torch.load could not read "
                                  f"it: {type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        raise CheckpointError(f"cannot load {src} with weights-only unpickling (nothing was "
                              f"executed): {type(exc).__name__}: {exc}") from None


def _looks_like_torch_file(path: Path) -> bool:
    import zipfile
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        return f.read(2) in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _is_url(s) -> bool:
    return isinstance(s, str) and s.split("://", 1)[0].lower() in ("http", "https", "file", "ftp") \
        and "://" in s


def download(url: str, *, file_name: str | None = None, progress: bool = True) -> Path:
    """Fetch ``url`` into torch.hub's checkpoint cache (``torch.hub.get_dir()/checkpoints``) unless
    already there; returns the cached path.  The default file name is the URL's basename
    prefixed with a hash of the URL, so two files with the same basename (FeatUp's norm and
    no_norm variants) never overwrite each other."""
    from urllib.parse import urlparse
    if file_name is None:
        base = os.path.basename(urlparse(url).path) or "checkpoint"
        file_name = f"{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base}"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    cache.mkdir(parents=True, exist_ok=True)
    dst = cache / file_name
    if not dst.exists():
        try:
            torch.hub.download_url_to_file(url, str(dst), progress=progress)
        except Exception as exc:
            raise CheckpointError(f"could not download {url} into {cache}: {exc}") from None
    return dst


def _infer_stack_kwargs(ups: Mapping[str, object], source: str) -> dict:
    def shape(key):
        v = ups.get(key)
        return tuple(v.shape) if isinstance(v, Tensor) else None

    dim_w, dim_b = shape("fixup_proj.1.weight"), shape("fixup_proj.1.bias")
    if dim_w is None and dim_b is None:
        raise CheckpointError(f"{source}: cannot tell the channel count: missing key "
                              f"upsampler.fixup_proj.1.weight (expected shape [C, C, 1, 1])")
    stages = [int(k.split(".")[0][2:]) for k in ups if k.startswith("up")
              and k.split(".")[0][2:].isdigit()]
    kw = {"dim": (dim_w or dim_b)[0], "num_stages": max(stages) if stages else 4}
    proj = shape("up1.range_proj.0.weight")
    if proj is not None and len(proj) == 4:
        kw["key_dim"], kw["guidance_dim"] = proj[0], proj[1]
    fix = shape("up1.fixup_proj.3.weight")
    if fix is not None:
        k = math.isqrt(fix[0])
        if k * k == fix[0] and k % 2 == 1:
            kw["radius"] = (k - 1) // 2
    return kw


def load_featup_checkpoint(path_or_url, *, map_location="cpu", dim: int | None = None,
                           progress: bool = True, file_name: str | None = None) -> nn.Module:
    """A ``JBUStack`` with the weights of a FeatUp JBU checkpoint (local path or URL).

    Reads ``["state_dict"]`` of a FeatUp Lightning checkpoint (a bare state dict works too), keeps
    the ``upsampler.*`` keys and drops the backbone (``model.*``) and training-only modules
    (``downsampler.*``, ``scale_net.*``).  The stack's layout (channels, stages, key dim, radius)
    comes from the weights; ``dim`` additionally asserts the channel count.  Loading is
    weights-only: nothing in the file is executed, Lightning metadata is ignored, and a file
    that references other code is refused.  Missing, unexpected or misshapen ``upsampler.*`` keys
    raise a CheckpointError naming each key with its expected shape.

    ``stack.config`` records ``use_norm`` (the checkpoint has ``model.1.norm.*``: features were
    LayerNorm'ed over channels, eps 1e-5, before upsampling), the source and the dropped keys.
    URLs are fetched into torch.hub's cache (see ``download``).
    """
    from .upsamplers import JBUStack
    source = str(path_or_url)
    path = download(source, file_name=file_name, progress=progress) if _is_url(source) \
        else Path(os.path.expanduser(source))
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    ckpt = _load_weights_only(path, map_location)
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{source} is not a FeatUp checkpoint: it holds a "
                              f"{type(ckpt).__name__}, not a dict with a 'state_dict'")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: 'state_dict' is a {type(state).__name__}, not a dict")
    ups = {k[len("upsampler."):]: v for k, v in state.items()
           if isinstance(k, str) and k.startswith("upsampler.")}
    if not ups:
        some = ", ".join(list(map(str, state))[:6])
        raise CheckpointError(f"{source} is not a FeatUp JBU checkpoint: no 'upsampler.*' keys "
                              f"in its state dict (found: {some or 'nothing'})")
    kw = _infer_stack_kwargs(ups, source)
    if dim is not None:
        kw["dim"] = dim
    stack = JBUStack(**kw)
    check_state_dict(stack, {f"upsampler.{k}": v for k, v in ups.items()}, source=source,
                     prefix="upsampler.")
    stack.load_state_dict(ups)
    norm_keys = sorted(k for k in state if isinstance(k, str) and k.startswith("model.1.norm."))
    use_norm = bool(norm_keys)
    norm = None
    if use_norm:
        norm = {"type": "LayerNorm", "over": "channels", "eps": 1e-5}
        w, b = state.get("model.1.norm.weight"), state.get("model.1.norm.bias")
        if isinstance(w, Tensor) and isinstance(b, Tensor) and not (
                bool((w == 1).all()) and bool((b == 0).all())):
            norm["weight"], norm["bias"] = w.float().tolist(), b.float().tolist()
    dropped = sorted({k.split(".")[0] for k in state if isinstance(k, str)} - {"upsampler"})
    stack.config = {"class": "JBUStack", "format": "featup_lightning", "source": source,
                    "path": str(path), "dim": stack.dim, "num_stages": stack.num_stages,
                    "use_norm": use_norm, "norm": norm, "backbone_id": None,
                    "compatible_backbones": [], "layer": None, "dropped_prefixes": dropped,
                    "lightning_version": _str_or_none(ckpt.get("pytorch-lightning_version"))}
    return stack.to(map_location) if map_location is not None else stack


def _str_or_none(v):
    return v if isinstance(v, str) else None


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

FEATUP_URL = ("https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/"
              "pretrained/{exp_dir}{name}_jbu_stack_cocostuff.ckpt")


@dataclasses.dataclass(frozen=True)
class PretrainedUpsampler:
    name: str                       # registry name, e.g. "featup/dino16"
    source: str                     # URL, checkpoint file or saved directory
    dim: int | None = None
    use_norm: bool = False
    backbone_ids: tuple[str, ...] = ()
    features: str = ""              # which features it was trained on
    kind: str = "user"              # "featup" (released), "local" (shipped), "user"
    file_name: str | None = None    # name in torch.hub's cache (URLs)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backbone_ids"] = list(self.backbone_ids)
        return d


# FeatUp's six released JBU upsamplers (hubconf.py), trained on COCO-Stuff; each with ("norm",
# FeatUp's default) and without a channel LayerNorm on the features.  The backbone ids name models
# that produce the features FeatUp trained on (spec section 4).
_FEATUP_MODELS = {
    "dino16": (384, ("timm/vit_small_patch16_224.dino", "facebook/dino-vits16"),
               "DINO ViT-S/16 patch tokens after the final LayerNorm (class token dropped)"),
    "dinov2": (384, ("timm/vit_small_patch14_dinov2.lvd142m", "facebook/dinov2-small"),
               "DINOv2 ViT-S/14 patch tokens after the final LayerNorm"),
    "clip": (512, ("open_clip/ViT-B-16",),
             "OpenAI CLIP ViT-B/16 visual patch tokens after ln_post AND the 768->512 projection "
             "(tokens @ visual.proj); the un-projected 768-channel tokens do not fit"),
    "maskclip": (512, (), "MaskCLIP features of OpenAI CLIP ViT-B/16 (FeatUp's MaskCLIP "
                          "featurizer: value embeddings of the last block, projected)"),
    "vit": (384, ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "timm/vit_small_patch16_224"),
            "supervised ViT-S/16 (timm vit_small_patch16_224) patch tokens after the final norm"),
    "resnet50": (2048, ("timm/resnet50.tv_in1k", "torchvision/resnet50", "timm/resnet50"),
                 "ResNet-50 layer4 output (stride 32) with torchvision's IMAGENET1K_V1 weights "
                 "(= timm resnet50.tv_in1k); timm's default resnet50 weights differ"),
}


def _featup_entries() -> dict[str, PretrainedUpsampler]:
    out = {}
    for model, (dim, ids, feats) in _FEATUP_MODELS.items():
        for use_norm in (True, False):
            name = f"featup/{model}" + ("" if use_norm else "-no-norm")
            url = FEATUP_URL.format(exp_dir="" if use_norm else "no_norm/", name=model)
            out[name] = PretrainedUpsampler(
                name=name, source=url, dim=dim, use_norm=use_norm, backbone_ids=ids,
                features=feats, kind="featup",
                file_name=f"featup-{'norm' if use_norm else 'no_norm'}-{model}"
                          f"_jbu_stack_cocostuff.ckpt")
    return out


PRETRAINED: dict[str, PretrainedUpsampler] = _featup_entries()
_REGISTRY: dict[str, PretrainedUpsampler] = dict(PRETRAINED)
_BASELINE_NAMES = ("bilinear", "bicubic", "nearest")


def register_upsampler(name: str, source, *, backbone_id: str | Sequence[str] | None = None,
                       dim: int | None = None, use_norm: bool | None = None,
                       overwrite: bool = False, _kind: str = "user") -> PretrainedUpsampler:
    """Make ``load_upsampler(name)`` load ``source`` (a saved directory, a FeatUp checkpoint file
    or a URL), and ``pretrained_for(backbone_id)`` return ``name``.  ``backbone_id`` may be a list
    of ids.  For a saved directory, ``backbone_id``/``dim``/``use_norm`` default to its config.
    Re-registering a name warns unless ``overwrite=True``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_upsampler: expected a non-empty name, got {name!r}")
    if name in _BASELINE_NAMES:
        raise ValueError(f"register_upsampler: {name!r} is reserved for the baseline upsampler")
    src = str(source)
    ids = [backbone_id] if isinstance(backbone_id, str) else list(backbone_id or [])
    if not _is_url(src) and Path(src).is_dir() and (Path(src) / CONFIG_NAME).is_file():
        cfg = _read_config(Path(src))
        if not ids:
            ids = [i for i in [cfg.get("backbone_id"), *(cfg.get("compatible_backbones") or [])]
                   if i]
        dim = cfg.get("dim") if dim is None else dim
        use_norm = cfg.get("use_norm") if use_norm is None else use_norm
    if name in _REGISTRY and not overwrite:
        warnings.warn(f"register_upsampler: overwriting the registered upsampler {name!r} "
                      f"(was {_REGISTRY[name].source})", stacklevel=2)
    entry = PretrainedUpsampler(name=name, source=src, dim=dim, use_norm=bool(use_norm),
                                backbone_ids=tuple(ids), kind=_kind)
    _REGISTRY.pop(name, None)      # re-insert: the latest registration wins in pretrained_for
    _REGISTRY[name] = entry
    return entry


def unregister_upsampler(name: str) -> None:
    """Forget a registered name (FeatUp's released entries come back on re-import only)."""
    _REGISTRY.pop(name, None)


def pretrained_for(backbone_id: str) -> str | None:
    """The registered upsampler name for ``backbone_id``, or None.  Upsamplers registered by the
    user or shipped with the package win over FeatUp's (newest registration first); among
    FeatUp's, the LayerNorm variant (FeatUp's default) comes first."""
    key = normalize_backbone_id(backbone_id)
    entries = list(_REGISTRY.values())
    ranked = [e for e in reversed(entries) if e.kind != "featup"] + \
             [e for e in entries if e.kind == "featup" and e.use_norm] + \
             [e for e in entries if e.kind == "featup" and not e.use_norm]
    for e in ranked:
        if key in (normalize_backbone_id(i) for i in e.backbone_ids):
            return e.name
    return None


def list_upsamplers() -> list[dict]:
    """Every registered upsampler as a dict (name, source, dim, use_norm, backbone_ids, features,
    kind, file_name)."""
    return [e.as_dict() for e in _REGISTRY.values()]


def load_upsampler(dir_or_name, *, map_location="cpu", progress: bool = True) -> nn.Module:
    """Load an upsampler from a registered name, a ``save_pretrained`` directory, a FeatUp
    checkpoint file or URL, or a baseline name ("bilinear", "bicubic", "nearest").

    Names are looked up first, then paths.  The module's ``config`` dict holds the saved
    metadata (class, dims, stages, backbone_id, layer, use_norm, library_version, ...).
    """
    if isinstance(dir_or_name, nn.Module):
        return dir_or_name
    key = os.fspath(dir_or_name) if isinstance(dir_or_name, os.PathLike) else dir_or_name
    if not isinstance(key, str):
        raise TypeError(f"load_upsampler: expected a name, a path or a URL, got "
                        f"{type(dir_or_name).__name__}")
    if key in _REGISTRY:
        return _load_entry(_REGISTRY[key], map_location, progress)
    if key.lower() in _BASELINE_NAMES:
        from .upsamplers import make_upsampler
        up = make_upsampler(key.lower())
        up.config = {"class": type(up).__name__, "name": key.lower(), "backbone_id": None}
        return up
    return _load_source(key, map_location, progress)


def _load_source(src: str, map_location, progress: bool, file_name: str | None = None):
    if _is_url(src):
        return load_featup_checkpoint(src, map_location=map_location, progress=progress,
                                      file_name=file_name)
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        return _load_saved_dir(path, map_location)
    if path.is_file():
        if path.name == CONFIG_NAME or path.suffix == ".safetensors":
            return _load_saved_dir(path.parent, map_location)
        return load_featup_checkpoint(path, map_location=map_location)
    known = ", ".join(sorted(_REGISTRY)) or "none"
    raise CheckpointError(f"unknown upsampler {src!r}: not a registered name (registered: "
                          f"{known}; baselines: {', '.join(_BASELINE_NAMES)}), not an existing "
                          f"file or directory, not a URL")


def _load_entry(entry: PretrainedUpsampler, map_location, progress: bool) -> nn.Module:
    up = _load_source(entry.source, map_location, progress, file_name=entry.file_name)
    cfg = dict(getattr(up, "config", None) or {})
    if entry.kind == "featup" and cfg.get("use_norm") != entry.use_norm:
        warnings.warn(f"{entry.name}: the checkpoint at {entry.source} "
                      f"{'has' if cfg.get('use_norm') else 'lacks'} a feature LayerNorm, but the "
                      f"registry says use_norm={entry.use_norm}; using the checkpoint's",
                      stacklevel=3)
    ids = list(entry.backbone_ids)
    if ids:
        cfg["backbone_id"] = cfg.get("backbone_id") or ids[0]
        cfg["compatible_backbones"] = sorted(set(cfg.get("compatible_backbones") or []) | set(ids))
    cfg["name"] = entry.name
    if entry.features:
        cfg["features"] = entry.features
    up.config = cfg
    return up


def check_compatible(upsampler: nn.Module, *, dim: int | None = None,
                     backbone_id: str | None = None) -> None:
    """Raise IncompatibleUpsamplerError if ``upsampler`` expects another channel count than
    ``dim`` or was trained for another backbone than ``backbone_id``; the message names both.
    Upsamplers without a channel count (baselines) or without a recorded backbone pass."""
    cfg = getattr(upsampler, "config", None) or {}
    name = cfg.get("name") or cfg.get("path") or type(upsampler).__name__
    up_dim = getattr(upsampler, "dim", None) or cfg.get("dim")
    if dim is not None and up_dim is not None and int(dim) != int(up_dim):
        raise IncompatibleUpsamplerError(
            f"upsampler {name} expects {up_dim}-channel features, but backbone "
            f"{backbone_id or '(unnamed)'} gives {dim} channels")
    ids = [i for i in [cfg.get("backbone_id"), *(cfg.get("compatible_backbones") or [])] if i]
    if backbone_id is not None and ids:
        if normalize_backbone_id(backbone_id) not in {normalize_backbone_id(i) for i in ids}:
            raise IncompatibleUpsamplerError(
                f"upsampler {name} was trained for backbone {' / '.join(ids)}, but the wrapped "
                f"backbone is {backbone_id}; pass the upsampler trained for it, or train one "
                f"(featup_adapters.train_upsampler)")


def _register_shipped_weights() -> None:
    if not WEIGHTS_DIR.is_dir():
        return
    for d in sorted(WEIGHTS_DIR.iterdir()):
        if d.is_dir() and (d / CONFIG_NAME).is_file():
            try:
                register_upsampler(d.name, d, overwrite=True, _kind="local")
            except CheckpointError as exc:
                warnings.warn(f"skipping shipped upsampler {d}: {exc}", stacklevel=2)


_register_shipped_weights()
