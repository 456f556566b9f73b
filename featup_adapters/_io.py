"""Atomic file writes: a partial output is never mistaken for a complete one.

Everything the library writes (checkpoints, weights, features, pictures, CSV logs) goes through
``atomic_write``: the data lands in a temporary file in the destination folder, is flushed to disk,
and only then renamed over the destination; on any error the temporary file is removed and the
destination is left as it was.  A Ctrl-C (SIGINT) that arrives while a file is being written is
held back until the file is complete and in place, then raised as ``KeyboardInterrupt``: what was
being saved is saved, and the interrupt is not turned into an error deep inside a serializer.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import threading
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def deferred_interrupt():
    """Hold back SIGINT inside the block; raise ``KeyboardInterrupt`` after it if one came.

    Only the main thread can install signal handlers; elsewhere (and when SIGINT is not handled
    by Python's default handler) the block runs unchanged.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Context manager yielding a file opened with ``mode`` whose content replaces ``path`` on exit.

    Example:
        >>> with atomic_write("out/log.csv", "w") as f:   # doctest: +SKIP
        ...     f.write("step,loss\\n")
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"expected a file path to write, got a directory: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with deferred_interrupt():
        with _atomic_write(path, mode) as f:
            yield f


@contextlib.contextmanager
def _atomic_write(path: Path, mode: str):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_write(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically."""
    import torch
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    return Path(path)


def _json_safe(obj):
    """``obj`` with every NaN / Inf float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj, *, indent: int = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN and Inf become ``null``) to ``path`` atomically."""
    text = json.dumps(_json_safe(obj), indent=indent, allow_nan=False)
    with atomic_write(path, "w") as f:
        f.write(text + "\n")
    return Path(path)
