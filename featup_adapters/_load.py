"""Reading ``torch.save`` files without running code: the one safe loader of the project.

``load_torch_file(path, what="--resume")`` unpickles with ``torch.load(weights_only=True)``: only
tensors, numbers, strings and plain containers come back, and a file whose pickle references any
other global (``os.system``, a class) is refused before anything is unpickled.  Each failure is a
:class:`CheckpointFileError` (a ``ValueError``) in one line that names the file and what is wrong
with it: missing, a directory, empty, not a PyTorch file, or holding code.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

__all__ = ["CheckpointFileError", "load_torch_file"]

# first bytes of a legacy (non-zip) torch.save file: a pickle protocol 2-5 header
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointFileError(ValueError):
    """A file that cannot be loaded as a checkpoint (message names the file and why)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_torch_file(path: str | os.PathLike, *, what: str = "checkpoint", map_location="cpu"):
    """``torch.load(path, weights_only=True)`` with clear errors.

    Args:
        path: the file.
        what: how the caller names the file in messages (e.g. ``"--resume"``).
        map_location: passed to ``torch.load``.

    Raises:
        CheckpointFileError: missing file, a directory, an empty file, a file that is not a
            PyTorch checkpoint, or one whose pickle would need code to rebuild it (refused; nothing
            is executed).
    """
    import torch

    p = Path(path)
    if not p.exists():
        raise CheckpointFileError(f"{what}: no such file: {p}")
    if p.is_dir():
        raise CheckpointFileError(f"{what}: expected a checkpoint file, got a directory: {p}")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointFileError(f"{what}: {p} is empty (0 bytes), not a checkpoint (an interrupted "
                                  "copy or download?)")
    is_zip = zipfile.is_zipfile(p)
    if not is_zip:
        with open(p, "rb") as f:
            head = f.read(2)
        if head not in _PICKLE_MAGIC:
            raise CheckpointFileError(f"{what}: {p} is not a PyTorch checkpoint ({size} bytes that "
                                      "torch.save did not write)")
    if is_zip:
        try:
            unsafe = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(str(p)))
        except Exception as exc:  # a zip that is not a torch archive, or a damaged one
            raise CheckpointFileError(f"{what}: {p} is not a readable PyTorch checkpoint "
                                      f"({_first_line(exc)})") from None
        if unsafe:
            raise CheckpointFileError(
                f"{what}: refusing to load {p}: its pickle references {', '.join(unsafe)}, which "
                "could run code when unpickled (nothing was executed); featup_adapters checkpoints "
                "hold only tensors, numbers, strings and plain containers")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointFileError(
            f"{what}: refusing to load {p}: weights-only unpickling rejected it, so it holds more than "
            f"tensors and plain containers (nothing was executed): {_first_line(exc)}") from None
    except Exception as exc:
        raise CheckpointFileError(f"{what}: {p} is not a readable PyTorch checkpoint "
                                  f"({_first_line(exc)})") from None
