"""Training checkpoints: written atomically (temp file + ``os.replace``), resumed exactly.

A checkpoint is a ``torch.save`` dict of tensors, numbers, strings and plain containers only, so it
is read back with ``torch.load(weights_only=True)`` (``featup_adapters.hub.safe_torch_load``):
a file whose pickle would run code is refused, never executed::

    {"format": "featup_adapters.train/1", "step": int, "backbone_id": str, "layer": str | None,
     "feature_dim": int, "config": {...}, "model": state_dict (upsampler + downsampler + scale net),
     "optimizer": state_dict, "rng": {"torch": ..., "cuda": [...]}}
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .._format import CheckpointError
from .._io import atomic_torch_save

FORMAT = "featup_adapters.train/1"


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    return atomic_torch_save(obj, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resolve_resume(resume: str | os.PathLike) -> Path:
    """A checkpoint file, or a training folder (then its ``last.pt``)."""
    p = Path(resume)
    if p.is_dir():
        p = p / "checkpoints" / "last.pt" if (p / "checkpoints" / "last.pt").exists() else p / "last.pt"
    if not p.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {str(p)!r}; expected a file written "
                                "by train_upsampler or its output folder")
    return p


def read_checkpoint(path: str | os.PathLike, fmt: str = FORMAT) -> tuple[Path, dict]:
    """``(file, checkpoint dict)`` for a checkpoint file or training folder, read weights-only; a
    file of another format than ``fmt`` is refused."""
    path = resolve_resume(path)
    from ..hub import safe_torch_load

    try:
        ckpt = safe_torch_load(path, map_location="cpu", metadata_stand_ins=False)
    except CheckpointError as exc:
        raise CheckpointError(f"--resume: {exc}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"--resume: {str(path)!r} is not a featup_adapters training checkpoint "
                                  f"(expected format {fmt!r}, found {found!r})")
    return path, ckpt


def load_checkpoint(path: str | os.PathLike, *, backbone_id: str, layer, feature_dim: int) -> dict:
    """Load a training checkpoint and check it belongs to this backbone, layer and width."""
    path, ckpt = read_checkpoint(path)
    theirs = (ckpt.get("backbone_id"), ckpt.get("layer"), ckpt.get("feature_dim"))
    ours = (backbone_id, layer, feature_dim)
    if theirs != ours:
        raise ValueError(f"--resume: checkpoint {str(path)!r} was trained for backbone "
                         f"{theirs[0]!r} (layer {theirs[1]!r}, {theirs[2]} channels), but this run "
                         f"uses backbone {ours[0]!r} (layer {ours[1]!r}, {ours[2]} channels)")
    return ckpt
