"""FeatUp checkpoint import and the one safe loader for torch files.

* ``safe_torch_load(path)``: ``torch.load(weights_only=True)`` for every torch file the hub reads.
  Lightning/hydra/omegaconf metadata in a FeatUp checkpoint is replaced by inert stand-ins; any
  other global outside torch's weights-only allowlist makes the file refused before anything is
  unpickled.  An empty file or a file that is not a torch checkpoint is named as such.
* ``load_featup_checkpoint(path_or_url)``: a ``JBUStack`` with the weights of FeatUp's released
  Lightning checkpoints (strict key and shape checks; URLs through torch.hub's cache).
"""
from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .._format import CheckpointError, check_state_dict
from ..upsamplers import JBUStack
from .download import download, is_url

__all__ = ["load_featup_checkpoint", "safe_torch_load", "IgnoredObject"]

# Globals from these namespaces (Lightning/hydra/omegaconf/numpy metadata in a Lightning file) are
# replaced by inert stand-ins instead of being imported or called.
_METADATA_PREFIXES = ("omegaconf.", "hydra.", "lightning.", "pytorch_lightning.",
                      "lightning_fabric.", "lightning_utilities.", "torchmetrics.", "numpy.",
                      "_codecs.", "argparse.", "pathlib.", "collections.", "typing.",
                      "datetime.", "enum.", "fsspec.")
# builtin data types (e.g. the int in defaultdict(int)); never eval/exec/getattr/open/__import__
_METADATA_BUILTINS = {f"builtins.{n}" for n in ("int", "float", "str", "bool", "bytes", "bytearray",
                                                "complex", "list", "dict", "tuple", "set",
                                                "frozenset", "slice", "range", "object")}
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


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


def _check_looks_like_torch_file(path: Path) -> bool:
    """Raise CheckpointError for an empty file or one that is neither a torch zip archive nor a
    legacy pickle; returns whether it is a zip archive."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint (an interrupted "
                              f"download or save?)")
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] in _PICKLE_MAGIC:
        return False
    if head[8:9] == b"{" or path.suffix == ".safetensors":
        what = "it is a safetensors file: pass the folder that holds it and its config.json"
    else:
        what = f"its first bytes are {head[:8]!r}"
    raise CheckpointError(f"{path} is not a PyTorch checkpoint (expected a torch.save file; "
                          f"{what})")


def safe_torch_load(path, map_location="cpu", *, metadata_stand_ins: bool = True):
    """``torch.load(path, weights_only=True)`` with clear errors; nothing in the file is executed.

    With ``metadata_stand_ins`` the Lightning/hydra/omegaconf objects of a FeatUp checkpoint are
    read as inert ``IgnoredObject``s; without it only torch's weights-only allowlist is accepted.
    Raises CheckpointError for a missing, empty, non-torch or code-referencing file."""
    path = Path(os.path.expanduser(os.fspath(path)))
    src = str(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    is_zip = _check_looks_like_torch_file(path)
    unsafe = None
    if is_zip:
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(src))
        except Exception as exc:
            raise CheckpointError(f"{src} is not a PyTorch checkpoint (cannot read it: "
                                  f"{type(exc).__name__}: {exc})") from None
    if unsafe:
        allowed = (lambda g: g.startswith(_METADATA_PREFIXES) or g in _METADATA_BUILTINS) \
            if metadata_stand_ins else (lambda g: False)
        refused = [g for g in unsafe if not allowed(g)]
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
        first = (str(exc).splitlines() or [""])[0]
        if not is_zip:
            raise CheckpointError(f"{src} is not a readable PyTorch checkpoint (torch.load with "
                                  f"weights_only=True failed: {type(exc).__name__}: "
                                  f"{first})") from None
        raise CheckpointError(f"cannot load {src} with weights-only unpickling (nothing was "
                              f"executed): {type(exc).__name__}: {first}") from None


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
    """A ``JBUStack`` with the weights of a FeatUp JBU checkpoint (local path or URL), in eval mode.

    Reads ``["state_dict"]`` of a FeatUp Lightning checkpoint (a bare state dict works too), keeps
    the ``upsampler.*`` keys and drops the backbone (``model.*``) and training-only modules
    (``downsampler.*``, ``scale_net.*``).  The stack's layout (channels, stages, key dim, radius)
    comes from the weights; ``dim`` additionally asserts the channel count.  Loading is
    weights-only (``safe_torch_load``): nothing in the file is executed, Lightning metadata is
    ignored, and a file that references other code is refused.  Missing, unexpected or misshapen
    ``upsampler.*`` keys raise a CheckpointError naming each key with its expected shape.

    ``stack.config`` records ``use_norm`` (the checkpoint has ``model.1.norm.*``: features were
    LayerNorm'ed over channels, eps 1e-5, before upsampling), the source and the dropped keys.
    URLs are fetched into torch.hub's cache (see ``download``).
    """
    source = os.fspath(path_or_url) if isinstance(path_or_url, os.PathLike) else str(path_or_url)
    if not source.strip():
        raise CheckpointError("load_featup_checkpoint: expected a file path or a URL, got an "
                              "empty string")
    path = download(source, file_name=file_name, progress=progress) if is_url(source) \
        else Path(os.path.expanduser(source))
    ckpt = safe_torch_load(path, map_location)
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
    version = ckpt.get("pytorch-lightning_version")
    stack.config = {"class": "JBUStack", "format": "featup_lightning", "source": source,
                    "path": str(path), "dim": stack.dim, "num_stages": stack.num_stages,
                    "use_norm": use_norm, "norm": norm, "backbone_id": None,
                    "compatible_backbones": [], "layer": None, "dropped_prefixes": dropped,
                    "lightning_version": version if isinstance(version, str) else None}
    if map_location is not None:
        stack = stack.to(map_location)
    return stack.eval()
