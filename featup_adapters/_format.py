"""The saved-upsampler format: ``model.safetensors`` + ``config.json`` in one directory.

This module is the bottom layer of persistence: it imports nothing else from the package except
``_io`` and ``_version``, so both ``upsamplers`` (``save_pretrained`` / ``from_pretrained``) and
``hub`` (``load_upsampler``, the registry) build on it without importing each other.  The class
registry that maps ``config["class"]`` to a Python class is passed in by the caller.

Layout of ``config.json`` (every key is checked on load; an unknown key is an error, custom data
goes under ``"extra"``)::

    {"format": "featup_adapters.upsampler", "format_version": 1, "class": "JBUStack",
     "init": {...constructor kwargs...}, "dim": 384, "num_stages": 4, "backbone_id": ...,
     "compatible_backbones": [...], "layer": ..., "use_norm": false, "norm": {...} (optional),
     "library": "featup_adapters", "library_version": "0.1.0", "torch_version": "2.x",
     "weights": "model.safetensors", "weights_sha256": "...", "extra": {...}}
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ._io import atomic_write_bytes
from ._version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "CONFIG_KEYS",
           "CheckpointError", "check_state_dict", "build_config", "write_saved", "read_config",
           "read_weights", "load_saved", "as_directory"]

FORMAT = "featup_adapters.upsampler"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# key -> accepted JSON types (None = null allowed)
_STR_OR_NULL = (str, type(None))
CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "format": (str,), "format_version": (int,), "class": (str,), "init": (dict,),
    "dim": (int, type(None)), "num_stages": (int, type(None)), "backbone_id": _STR_OR_NULL,
    "compatible_backbones": (list,), "layer": _STR_OR_NULL, "use_norm": (bool,),
    "norm": (dict, type(None)), "library": (str,), "library_version": (str,),
    "torch_version": (str,), "weights": (str,), "weights_sha256": (str,), "extra": (dict,),
}
_REQUIRED = ("format", "format_version", "class", "init")


class CheckpointError(ValueError):
    """A file that is not a usable upsampler checkpoint (unreadable, unsafe, wrong keys/shapes)."""


def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, Tensor) else \
        f"<{type(t).__name__}, not a tensor>"


def _kwargs_repr(module) -> str:
    kw = module.init_kwargs() if hasattr(module, "init_kwargs") else {}
    return ", ".join(f"{k}={v!r}" for k, v in kw.items())


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


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------

def build_config(module: nn.Module, *, backbone_id: str | None = None, layer: str | None = None,
                 use_norm: bool | None = None, extra: dict | None = None) -> dict:
    """The ``config.json`` dict of ``module`` (without the weights' digest).  ``backbone_id``,
    ``layer``, ``use_norm`` and ``extra`` default to the values in ``module.config``."""
    old = getattr(module, "config", None) or {}
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "class": type(module).__name__,
        "init": module.init_kwargs(),
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
    return config


def write_saved(module: nn.Module, directory, config: dict) -> Path:
    """Write ``module``'s state dict (safetensors) and ``config`` (JSON, with the weights' SHA-256)
    into ``directory``: each file atomically, weights first, so the config commits the save."""
    from safetensors.torch import save as st_save
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    blob = st_save(tensors, metadata={"format": "pt", "class": config["class"]})
    config = dict(config, weights_sha256=hashlib.sha256(blob).hexdigest())
    try:
        text = json.dumps(config, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"save_pretrained: extra/backbone_id/layer must be JSON-serializable: "
                        f"{exc}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / config.get("weights", WEIGHTS_NAME), blob)
    atomic_write_bytes(directory / CONFIG_NAME, (text + "\n").encode())
    return directory


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def as_directory(path, who: str = "load_upsampler") -> Path:
    """``path`` (str or PathLike, ``~`` expanded) as a Path; an empty string is refused instead of
    being taken as the current folder."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"{who}: expected a directory path, got {type(path).__name__}")
    if not path.strip():
        raise CheckpointError(f"{who}: expected a directory, a file, a URL or a registered name, "
                              f"got an empty string")
    return Path(os.path.expanduser(path))


def _type_names(types) -> str:
    names = {int: "an integer", str: "a string", dict: "an object", list: "a list",
             bool: "true/false", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _json_type(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def read_config(directory) -> dict:
    """The validated ``config.json`` of a saved upsampler directory.

    Raises CheckpointError naming the file and the offending key for: no config, invalid JSON, a
    config of another format, a missing required key (format, format_version, class, init), an
    unknown key, a value of the wrong type, or a format version newer than this library reads.
    """
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}: not a saved upsampler "
                              f"(save one with upsampler.save_pretrained(dir))")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {_json_type(config)}")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a featup_adapters upsampler config (expected "
                              f"\"format\": \"{FORMAT}\", got {config.get('format')!r})")
    for key in _REQUIRED:
        if key not in config:
            raise CheckpointError(f"{path}: missing key {key!r} (a saved upsampler's config has "
                                  f"{', '.join(_REQUIRED)})")
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}"
                              f"{' (and ' + ', '.join(map(repr, unknown[1:])) + ')' if unknown[1:] else ''}"
                              f"; expected only {', '.join(sorted(CONFIG_KEYS))} (custom data goes "
                              f"under \"extra\")")
    for key, value in config.items():
        types = CONFIG_KEYS[key]
        bad = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if bad:
            raise CheckpointError(f"{path}: key {key!r} must be {_type_names(types)}, got "
                                  f"{_json_type(value)} ({json.dumps(value)[:60]})")
    if config["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {config['format_version']} was written by "
                              f"featup_adapters {config.get('library_version')}; this is "
                              f"{__version__}, which reads format {FORMAT_VERSION}: upgrade "
                              f"featup_adapters")
    bad_init = [k for k in config["init"] if not isinstance(k, str) or not k.isidentifier()]
    if bad_init:
        raise CheckpointError(f"{path}: key 'init' holds {bad_init[0]!r}, not a parameter name")
    return config


def read_weights(directory, config: dict) -> dict[str, Tensor]:
    """The state dict of a saved upsampler, after checking its SHA-256 against ``config``."""
    from safetensors.torch import load as st_load
    weights = Path(directory) / config.get("weights", WEIGHTS_NAME)
    if not weights.is_file():
        raise CheckpointError(f"{directory}: missing weights file {weights.name}")
    blob = weights.read_bytes()
    digest = config.get("weights_sha256")
    if digest and hashlib.sha256(blob).hexdigest() != digest:
        raise CheckpointError(f"{weights} does not match the SHA-256 recorded in {CONFIG_NAME} "
                              f"(an interrupted or mixed save?); save the upsampler again")
    try:
        return st_load(blob)
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from None


def load_saved(directory, classes: Mapping[str, type], *, map_location="cpu",
               expect: type | None = None) -> nn.Module:
    """Rebuild the upsampler saved in ``directory``: ``classes[config["class"]](**config["init"])``
    with the saved weights, in eval mode, on ``map_location``.  ``expect``: the class (or a base
    class) the saved one must be."""
    from packaging.version import InvalidVersion, Version
    directory = Path(directory)
    config = read_config(directory)
    try:
        if Version(config.get("library_version", "0")) > Version(__version__):
            warnings.warn(f"{directory} was saved by featup_adapters "
                          f"{config['library_version']}, newer than this {__version__}",
                          stacklevel=3)
    except InvalidVersion:
        pass
    cls = classes.get(config["class"])
    if cls is None:
        raise CheckpointError(f"{directory / CONFIG_NAME}: unknown upsampler class "
                              f"{config['class']!r} (known: {sorted(classes)})")
    if expect is not None and not issubclass(cls, expect):
        raise CheckpointError(f"{directory} holds a {config['class']}, not an instance of "
                              f"{expect.__name__}; "
                              f"load it with featup_adapters.hub.load_upsampler or "
                              f"{config['class']}.from_pretrained")
    state = read_weights(directory, config)
    try:
        module = cls(**config["init"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_NAME}: key 'init' does not build a "
                              f"{config['class']}: {exc}") from None
    check_state_dict(module, state, source=str(directory / config.get("weights", WEIGHTS_NAME)))
    module.load_state_dict(state)
    module.config = dict(config, path=str(directory))
    if map_location is not None:
        module = module.to(map_location)
    return module.eval()
