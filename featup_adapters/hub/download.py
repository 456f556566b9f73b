"""Downloads: URLs into torch.hub's checkpoint cache, Hugging Face Hub repos into its cache.

``download(url)`` fetches a file once into ``torch.hub.get_dir()/checkpoints`` and returns the
cached path; ``is_url`` tells a URL from a path or a registered name.  ``hf_snapshot(repo_id)``
(implemented in ``featup_adapters._hf``) returns the local folder of a saved upsampler on the
Hugging Face Hub.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .._format import CheckpointError
from .._hf import looks_like_repo_id
from .._hf import snapshot as hf_snapshot

__all__ = ["download", "is_url", "hf_snapshot", "looks_like_repo_id"]

_SCHEMES = ("http", "https", "file", "ftp")


def is_url(s) -> bool:
    """True for ``http(s)://``, ``file://`` and ``ftp://`` strings."""
    return isinstance(s, str) and "://" in s and s.split("://", 1)[0].lower() in _SCHEMES


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
