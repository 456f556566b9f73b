"""Saved upsamplers on the Hugging Face Hub: a repo id -> the local snapshot folder that holds its
``config.json`` and ``model.safetensors`` (downloaded into the Hugging Face cache, or read from it
when ``HF_HUB_OFFLINE=1``).

Below both ``upsamplers`` (``from_pretrained``) and ``hub`` (``load_upsampler``, ``wrap``).
``huggingface_hub`` is optional: it is imported when a repo id is resolved.
"""
from __future__ import annotations

import re
from pathlib import Path

from ._format import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, read_config

__all__ = ["looks_like_repo_id", "snapshot", "INSTALL_HINT", "NotOnHub"]

INSTALL_HINT = "pip install huggingface_hub (it also comes with transformers)"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


class NotOnHub(CheckpointError):
    """The repo id names no reachable (or cached) Hugging Face Hub model repository."""


def looks_like_repo_id(name) -> bool:
    """True for ``"user/repo"`` (one slash, Hub-legal characters, not a ``./`` or ``~`` path)."""
    return isinstance(name, str) and bool(_REPO_ID.match(name)) and ".." not in name \
        and not name.endswith((".git", "."))


def snapshot(repo_id: str, *, revision: str | None = None, cache_dir=None,
             force_download: bool = False, local_files_only: bool = False,
             token: str | bool | None = None) -> Path:
    """The local folder of ``repo_id``'s saved upsampler (``config.json`` + its weights file),
    fetched into the Hugging Face cache unless already there.  Every failure is a CheckpointError
    that names the repo id and what was missing."""
    try:
        import huggingface_hub as hf
        from huggingface_hub import errors
    except ImportError:
        raise NotOnHub(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                       f"{INSTALL_HINT}") from None
    kwargs = dict(repo_id=repo_id, revision=revision, cache_dir=cache_dir,
                  force_download=force_download, local_files_only=local_files_only, token=token)

    def fetch(filename: str) -> Path:
        try:
            return Path(hf.hf_hub_download(filename=filename, **kwargs))
        except errors.LocalEntryNotFoundError:
            offline = local_files_only or bool(hf.constants.HF_HUB_OFFLINE)
            why = "offline (HF_HUB_OFFLINE=1 or local_files_only)" if offline else \
                "the Hub is unreachable"
            raise NotOnHub(f"{repo_id}: {filename} is not in the Hugging Face cache "
                                  f"({hf.constants.HF_HUB_CACHE}) and {why}") from None
        except errors.RepositoryNotFoundError:
            raise NotOnHub(f"{repo_id}: no such model repository on the Hugging Face Hub "
                                  f"(or it is private: log in with `hf auth login`)") from None
        except errors.RevisionNotFoundError:
            raise CheckpointError(f"{repo_id}: no revision {revision!r} on the Hugging Face "
                                  f"Hub") from None
        except errors.EntryNotFoundError:
            raise CheckpointError(f"{repo_id} has no {filename}: not a saved featup_adapters "
                                  f"upsampler (push one with upsampler.push_to_hub(repo_id))"
                                  ) from None
        except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as exc:
            first = (str(exc).splitlines() or [""])[0]
            raise CheckpointError(f"{repo_id}: cannot fetch {filename} from the Hugging Face "
                                  f"Hub: {type(exc).__name__}: {first}") from None

    folder = fetch(CONFIG_NAME).parent
    config = read_config(folder)
    weights = fetch(config.get("weights", WEIGHTS_NAME))
    if weights.parent != folder:      # the branch moved between the two downloads
        raise CheckpointError(f"{repo_id}: {CONFIG_NAME} and its weights come from different "
                              f"revisions; pass revision=<commit>")
    return folder
