"""Saving and loading upsamplers the Hugging Face way: ``save_pretrained``, ``from_pretrained``,
``push_to_hub`` (through ``huggingface_hub.ModelHubMixin`` when it is installed), and the class
registry that maps a saved ``config["class"]`` back to its Python class.

The files are the ones ``featup_adapters.hub.load_upsampler`` reads (``model.safetensors`` +
``config.json``, see ``featup_adapters._format``), so a folder written by either side loads with
the other, and a Hub repo pushed from here loads with ``load_upsampler("user/repo")`` or
``wrap(backbone, "user/repo")``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .. import _format, _hf

try:
    from huggingface_hub import ModelHubMixin as _HubMixin
except ImportError:                       # huggingface_hub is optional
    _HubMixin = None

__all__ = ["UPSAMPLER_CLASSES", "register_upsampler_class", "check_registered", "PretrainedMixin"]

# class name -> class; filled by @register_upsampler_class, read by from_pretrained / load_upsampler
UPSAMPLER_CLASSES: dict[str, type] = {}


def register_upsampler_class(cls: type) -> type:
    """Class decorator: makes ``cls`` loadable by name from a saved ``config.json``.

    The class must implement ``init_kwargs() -> dict`` (JSON-serializable constructor kwargs).
    """
    UPSAMPLER_CLASSES[cls.__name__] = cls
    return cls


def check_registered(module) -> None:
    """Raise TypeError unless ``module``'s class is a registered upsampler class (one that a saved
    config can name)."""
    cls = type(module).__name__
    if UPSAMPLER_CLASSES.get(cls) is not type(module) or not hasattr(module, "init_kwargs"):
        raise TypeError(f"save_pretrained: {cls} is not a registered upsampler class "
                        f"(known: {sorted(UPSAMPLER_CLASSES)}); decorate it with "
                        f"featup_adapters.upsamplers.register_upsampler_class")


_MODEL_CARD = """---
{{ card_data }}
---

# {{ class_name }} upsampler

A featup_adapters feature upsampler ({{ class_name }}, {{ dim }} channels) for the features of
`{{ backbone_id }}`{{ layer_note }}.

```python
import featup_adapters
model = featup_adapters.wrap(backbone, "{{ repo_id }}").eval()   # features at image resolution
# or: featup_adapters.JBUStack.from_pretrained("{{ repo_id }}")
```
"""

_BASES = (_HubMixin,) if _HubMixin is not None else ()
_CLASS_KW = dict(library_name="featup_adapters", tags=["featup", "feature-upsampling"],
                 model_card_template=_MODEL_CARD) if _HubMixin is not None else {}


class PretrainedMixin(*_BASES, **_CLASS_KW):
    """``save_pretrained(dir)``, ``Class.from_pretrained(dir_or_repo_id)`` (eval mode, like
    Hugging Face models) and ``push_to_hub(repo_id)``; see the module docstring."""

    def save_pretrained(self, directory, *, backbone_id: str | None = None,
                        layer: str | None = None, use_norm: bool | None = None,
                        extra: dict | None = None, config: dict | None = None,
                        push_to_hub: bool = False, repo_id: str | None = None,
                        model_card_kwargs: dict | None = None, **push_to_hub_kwargs):
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created if needed).

        Each file is written to a temporary name and renamed into place, weights first; the config
        records the weights' SHA-256, so a half-finished overwrite is detected on load.
        ``backbone_id``, ``layer`` and ``use_norm`` default to the values in ``self.config`` (e.g.
        those of a loaded FeatUp checkpoint), else None/None/False. ``extra`` must be JSON-able.
        Read back with ``featup_adapters.hub.load_upsampler(directory)`` or
        ``Class.from_pretrained(directory)``.  Returns the directory; with ``push_to_hub=True``
        the folder is also uploaded to ``repo_id`` (default: the folder's name) and the commit URL
        is returned.  A ``README.md`` model card is written when ``model_card_kwargs`` is given or
        when pushing (an existing one is kept).
        """
        if config is not None:
            raise TypeError("save_pretrained: the config is built from the module (its init "
                            "arguments and self.config); pass backbone_id=/layer=/use_norm=/extra=")
        check_registered(self)
        cfg = _format.build_config(self, backbone_id=backbone_id, layer=layer,
                                   use_norm=use_norm, extra=extra)
        directory = _format.write_saved(self, directory, cfg)
        if model_card_kwargs is not None or push_to_hub:
            self._write_model_card(directory, cfg, repo_id or directory.name,
                                   model_card_kwargs or {})
        if push_to_hub:
            return _upload_folder(directory, repo_id or directory.name, **push_to_hub_kwargs)
        return directory

    def push_to_hub(self, repo_id: str, *, backbone_id: str | None = None,
                    layer: str | None = None, use_norm: bool | None = None,
                    extra: dict | None = None, model_card_kwargs: dict | None = None,
                    **kwargs) -> str:
        """Save into a temporary folder (with a model card) and upload it to the Hugging Face Hub
        repo ``repo_id`` in one commit; returns the commit URL.  ``kwargs`` go to
        ``HfApi.upload_folder`` / ``create_repo`` as in ``ModelHubMixin.push_to_hub``
        (``commit_message``, ``private``, ``token``, ``branch``, ``create_pr``, ...)."""
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / repo_id.replace("/", "--")
            self.save_pretrained(folder, backbone_id=backbone_id, layer=layer, use_norm=use_norm,
                                 extra=extra, repo_id=repo_id,
                                 model_card_kwargs=model_card_kwargs or {})
            return _upload_folder(folder, repo_id, **kwargs)

    def _write_model_card(self, directory: Path, cfg: dict, repo_id: str, kwargs: dict) -> None:
        if _HubMixin is None or (directory / "README.md").exists():
            return
        layer = cfg.get("layer")
        card = self.generate_model_card(
            class_name=cfg["class"], dim=cfg.get("dim"), repo_id=repo_id,
            backbone_id=cfg.get("backbone_id") or "(backbone not recorded)",
            layer_note=f" (layer `{layer}`)" if layer else "", **kwargs)
        card.save(directory / "README.md")

    def _save_pretrained(self, save_directory: Path) -> None:   # ModelHubMixin's hook
        self.save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, map_location="cpu",
                        revision: str | None = None, cache_dir=None, force_download: bool = False,
                        local_files_only: bool = False, token: str | bool | None = None,
                        **model_kwargs):
        """The upsampler saved in a local folder or a Hugging Face Hub repo (``"user/repo"``,
        fetched into the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only), in eval
        mode on ``map_location``.  The saved class must be ``cls`` or a subclass; ``cls`` being
        the common base (``UpsamplerMixin``) accepts any registered upsampler.  Folders written by
        ``save_pretrained`` and by ``featup_adapters.hub.save_upsampler`` are the same format."""
        if model_kwargs:
            raise TypeError(f"{cls.__name__}.from_pretrained: the module is rebuilt from the "
                            f"saved config's 'init'; unexpected arguments {sorted(model_kwargs)}")
        return cls._from_pretrained(model_id=pretrained_model_name_or_path, revision=revision,
                                    cache_dir=cache_dir, force_download=force_download,
                                    local_files_only=local_files_only, token=token,
                                    map_location=map_location)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision=None, cache_dir=None, force_download=False,
                         local_files_only=False, token=None, map_location="cpu", **unused):
        path = _format.as_directory(model_id, f"{cls.__name__}.from_pretrained")
        if path.is_file() and (path.name == _format.CONFIG_NAME or path.suffix == ".safetensors"):
            path = path.parent
        if not path.exists() and _hf.looks_like_repo_id(os.fspath(model_id)):
            path = _hf.snapshot(os.fspath(model_id), revision=revision, cache_dir=cache_dir,
                                force_download=force_download, local_files_only=local_files_only,
                                token=token)
        elif not path.is_dir():
            raise _format.CheckpointError(
                f"{cls.__name__}.from_pretrained: {model_id!s} is not a folder with a saved "
                f"upsampler{'' if path.exists() else ' (no such folder)'} nor a Hugging Face Hub "
                f"repo id like 'user/repo'")
        expect = None if cls.__name__ in ("UpsamplerMixin", "PretrainedMixin") else cls
        return _format.load_saved(path, UPSAMPLER_CLASSES, map_location=map_location,
                                  expect=expect)


def _upload_folder(folder: Path, repo_id: str, *, commit_message: str | None = None,
                   private: bool | None = None, token: str | None = None,
                   branch: str | None = None, create_pr: bool | None = None, **kwargs) -> str:
    if _HubMixin is None:
        raise ImportError(f"push_to_hub needs huggingface_hub: {_hf.INSTALL_HINT}")
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id=repo_id, private=private, exist_ok=True).repo_id
    return api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=folder,
                             commit_message=commit_message or "Upload featup_adapters upsampler",
                             revision=branch, create_pr=create_pr, **kwargs)
