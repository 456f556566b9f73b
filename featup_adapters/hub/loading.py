"""``load_upsampler``: one entry point for every way to name an upsampler, and ``check_compatible``.

A name is looked up in the registry first, then as a baseline name, a URL, a local path (saved
directory, its config.json / model.safetensors, or a FeatUp checkpoint file), and last as a Hugging
Face Hub repo id (``"user/repo"``: fetched into the Hugging Face cache, or read from it when
``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from torch import nn

from .. import _hf
from .._format import CONFIG_NAME, CheckpointError, as_directory, load_saved
from ..upsamplers import UPSAMPLER_CLASSES, make_upsampler
from .featup import load_featup_checkpoint
from .download import is_url
from .registry import (_REGISTRY, BASELINE_NAMES, UNIVERSAL_ENV, UNIVERSAL_NAME, PretrainedUpsampler,
                       normalize_backbone_id, universal_weights_dir)

__all__ = ["load_upsampler", "load_saved_upsampler", "load_universal", "check_compatible",
           "IncompatibleUpsamplerError", "UniversalWeightsMissing"]


class IncompatibleUpsamplerError(ValueError):
    """An upsampler whose channel count or backbone does not match the features it is given."""


class UniversalWeightsMissing(CheckpointError):
    """``"universal"`` was asked for, but no universal upsampler is saved where it is looked for."""


def load_universal(*, map_location="cpu") -> nn.Module:
    """The shipped channel-agnostic upsampler (``UniversalJBUStack``) from
    ``registry.universal_weights_dir()``, in eval mode, for features of any backbone."""
    directory = universal_weights_dir()
    if not (directory / CONFIG_NAME).is_file():
        raise UniversalWeightsMissing(
            f"the universal upsampler's weights are not shipped in this build (no saved upsampler at "
            f"{directory}); train them with `featup-adapters train-universal --backbone A --backbone B "
            f"--data <images> --out <dir>` and pass upsampler='<dir>', or set {UNIVERSAL_ENV}=<dir>")
    up = load_saved_upsampler(directory, map_location=map_location)
    if not getattr(up, "universal", False):
        raise CheckpointError(f"{directory} holds a {type(up).__name__}, not a universal upsampler "
                              f"(UniversalJBUStack) for features of any channel count")
    up.config = {**(getattr(up, "config", None) or {}), "name": UNIVERSAL_NAME}
    return up


def load_saved_upsampler(directory, *, map_location="cpu") -> nn.Module:
    """The upsampler saved by ``save_pretrained`` in ``directory``, in eval mode."""
    return load_saved(as_directory(directory), UPSAMPLER_CLASSES, map_location=map_location)


def load_upsampler(dir_or_name, *, map_location="cpu", progress: bool = True) -> nn.Module:
    """Load an upsampler, in eval mode (as Hugging Face's ``from_pretrained`` does), from a
    registered name, a ``save_pretrained`` directory, a FeatUp checkpoint file or URL, a baseline
    name ("bilinear", "bicubic", "nearest"), or a Hugging Face Hub repo id (``"user/repo"``: fetched into the Hugging Face cache, or read from it when
``HF_HUB_OFFLINE=1``).

    Names are looked up first, then paths.  The module's ``config`` dict holds the saved
    metadata (class, dims, stages, backbone_id, layer, use_norm, library_version, ...).
    A module passed in is returned as is.
    """
    if isinstance(dir_or_name, nn.Module):
        return dir_or_name
    key = os.fspath(dir_or_name) if isinstance(dir_or_name, os.PathLike) else dir_or_name
    if not isinstance(key, str):
        raise TypeError(f"load_upsampler: expected a name, a path or a URL, got "
                        f"{type(dir_or_name).__name__}")
    as_directory(key)                       # refuses "" (which would be the current folder)
    if key == UNIVERSAL_NAME:
        return load_universal(map_location=map_location)
    if key in _REGISTRY:
        return _load_entry(_REGISTRY[key], map_location, progress)
    if key.lower() in BASELINE_NAMES:
        up = make_upsampler(key.lower())
        up.config = {"class": type(up).__name__, "name": key.lower(), "backbone_id": None}
        return up.eval()
    return _load_source(key, map_location, progress)


def _load_source(src: str, map_location, progress: bool, file_name: str | None = None):
    if is_url(src):
        return load_featup_checkpoint(src, map_location=map_location, progress=progress,
                                      file_name=file_name)
    path = as_directory(src)
    if path.is_dir():
        return load_saved_upsampler(path, map_location=map_location)
    if path.is_file():
        if path.name == CONFIG_NAME or path.suffix == ".safetensors":
            return load_saved_upsampler(path.parent, map_location=map_location)
        return load_featup_checkpoint(path, map_location=map_location)
    hub_note = ""
    if _hf.looks_like_repo_id(src):
        try:
            return load_saved_upsampler(_hf.snapshot(src), map_location=map_location)
        except _hf.NotOnHub as exc:
            hub_note = f", not a Hugging Face Hub model ({exc})"
    known = ", ".join(sorted(_REGISTRY)) or "none"
    raise CheckpointError(f"unknown upsampler {src!r}: not a registered name (registered: "
                          f"{known}; baselines: {', '.join(BASELINE_NAMES)}), not an existing "
                          f"file or directory, not a URL{hub_note}")


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
    Upsamplers without a channel count (baselines) or without a recorded backbone pass, and so
    do universal ones (``upsampler.universal``, e.g. ``UniversalJBUStack``): they are meant for
    backbones they never saw."""
    cfg = getattr(upsampler, "config", None) or {}
    name = cfg.get("name") or cfg.get("path") or type(upsampler).__name__
    up_dim = getattr(upsampler, "dim", None) or cfg.get("dim")
    if dim is not None and up_dim is not None and int(dim) != int(up_dim):
        raise IncompatibleUpsamplerError(
            f"upsampler {name} expects {up_dim}-channel features, but backbone "
            f"{backbone_id or '(unnamed)'} gives {dim} channels")
    ids = [i for i in [cfg.get("backbone_id"), *(cfg.get("compatible_backbones") or [])] if i]
    if backbone_id is not None and ids and not getattr(upsampler, "universal", False):
        if normalize_backbone_id(backbone_id) not in {normalize_backbone_id(i) for i in ids}:
            raise IncompatibleUpsamplerError(
                f"upsampler {name} was trained for backbone {' / '.join(ids)}, but the wrapped "
                f"backbone is {backbone_id}; pass the upsampler trained for it, or train one "
                f"(featup_adapters.train_upsampler)")
