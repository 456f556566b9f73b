"""Atomic file writes: a partial output is never mistaken for a complete one.

Everything the library writes (checkpoints, weights, features, pictures, CSV logs) goes through
``atomic_write``: the data lands in a temporary file in the destination folder, is flushed to disk,
and only then renamed over the destination; on any error the temporary file is removed and the
destination is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb"):
    """Context manager yielding a file opened with ``mode`` whose content replaces ``path`` on exit.

    Example:
        >>> with atomic_write("out/log.csv", "w") as f:   # doctest: +SKIP
        ...     f.write("step,loss\\n")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
