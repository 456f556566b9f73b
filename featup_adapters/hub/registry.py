"""The registry of pretrained upsamplers: FeatUp's released ones and those shipped or registered.

* ``PRETRAINED``: FeatUp's twelve released JBU upsamplers (six backbones, with and without the
  feature LayerNorm), fetched from FeatUp's storage on first use.
* ``register_upsampler(name, source)`` / ``unregister_upsampler`` / ``pretrained_for(backbone_id)``
  / ``list_upsamplers()``.
* Directories ``featup_adapters/weights/<name>/`` that hold a saved upsampler are registered under
  ``<name>`` (kind ``"local"``) when this module is imported.
* The name ``"universal"`` is reserved: ``load_upsampler("universal")`` reads the channel-agnostic
  ``UniversalJBUStack`` from :func:`universal_weights_dir` (``featup_adapters/weights/universal/``,
  or the folder named by the environment variable ``FEATUP_ADAPTERS_UNIVERSAL_WEIGHTS``).

Backbone ids are compared case-insensitively, with a leading ``hf-hub:`` dropped; they read like
``timm/vit_small_patch16_224.dino`` (also the model's Hugging Face Hub id), ``facebook/dinov2-small``
(transformers), ``open_clip/ViT-B-16``.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from .._format import CONFIG_NAME, CheckpointError, read_config
from .download import is_url

__all__ = ["PRETRAINED", "PretrainedUpsampler", "FEATUP_URL", "WEIGHTS_DIR", "BASELINE_NAMES",
           "register_upsampler", "unregister_upsampler", "pretrained_for", "list_upsamplers",
           "normalize_backbone_id", "UNIVERSAL_NAME", "UNIVERSAL_ENV", "universal_weights_dir"]

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FEATUP_URL = ("https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/"
              "pretrained/{exp_dir}{name}_jbu_stack_cocostuff.ckpt")
BASELINE_NAMES = ("bilinear", "bicubic", "nearest")
UNIVERSAL_NAME = "universal"
UNIVERSAL_ENV = "FEATUP_ADAPTERS_UNIVERSAL_WEIGHTS"
UNIVERSAL_DIR = WEIGHTS_DIR / UNIVERSAL_NAME


def universal_weights_dir() -> Path:
    """Where ``"universal"`` is read from: ``$FEATUP_ADAPTERS_UNIVERSAL_WEIGHTS`` when set and
    non-empty, else ``UNIVERSAL_DIR`` (``featup_adapters/weights/universal``); read at each call."""
    env = os.environ.get(UNIVERSAL_ENV, "").strip()
    return Path(env).expanduser() if env else Path(UNIVERSAL_DIR)


def normalize_backbone_id(backbone_id: str) -> str:
    s = str(backbone_id).strip()
    for prefix in ("hf-hub:", "hf_hub:"):
        if s.lower().startswith(prefix):
            s = s[len(prefix):]
    return s.lower()


@dataclasses.dataclass(frozen=True)
class PretrainedUpsampler:
    name: str                       # registry name, e.g. "featup/dino16"
    source: str                     # URL, checkpoint file or saved directory
    dim: int | None = None
    use_norm: bool = False
    backbone_ids: tuple[str, ...] = ()
    features: str = ""              # which features it was trained on
    kind: str = "user"              # "featup" (released), "local" (shipped), "user"
    file_name: str | None = None    # name in torch.hub's cache (URLs)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["backbone_ids"] = list(self.backbone_ids)
        return d


# FeatUp's six released JBU upsamplers (its hubconf.py), trained on COCO-Stuff; each with ("norm",
# FeatUp's default) and without a channel LayerNorm on the features.  The backbone ids name models
# that produce the features FeatUp trained on (spec section 4).
FEATUP_MODELS = {
    "dino16": (384, ("timm/vit_small_patch16_224.dino", "facebook/dino-vits16"),
               "DINO ViT-S/16 patch tokens after the final LayerNorm (class token dropped)"),
    "dinov2": (384, ("timm/vit_small_patch14_dinov2.lvd142m", "facebook/dinov2-small"),
               "DINOv2 ViT-S/14 patch tokens after the final LayerNorm"),
    "clip": (512, ("open_clip/ViT-B-16",),
             "OpenAI CLIP ViT-B/16 visual patch tokens after ln_post AND the 768->512 projection "
             "(tokens @ visual.proj); the un-projected 768-channel tokens do not fit"),
    "maskclip": (512, (), "MaskCLIP features of OpenAI CLIP ViT-B/16 (FeatUp's MaskCLIP "
                          "featurizer: value embeddings of the last block, projected)"),
    "vit": (384, ("timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "timm/vit_small_patch16_224"),
            "supervised ViT-S/16 (timm vit_small_patch16_224) patch tokens after the final norm"),
    "resnet50": (2048, ("timm/resnet50.tv_in1k", "torchvision/resnet50", "timm/resnet50"),
                 "ResNet-50 layer4 output (stride 32) with torchvision's IMAGENET1K_V1 weights "
                 "(= timm resnet50.tv_in1k); timm's default resnet50 weights differ"),
}


def _featup_entries() -> dict[str, PretrainedUpsampler]:
    out = {}
    for model, (dim, ids, feats) in FEATUP_MODELS.items():
        for use_norm in (True, False):
            name = f"featup/{model}" + ("" if use_norm else "-no-norm")
            url = FEATUP_URL.format(exp_dir="" if use_norm else "no_norm/", name=model)
            out[name] = PretrainedUpsampler(
                name=name, source=url, dim=dim, use_norm=use_norm, backbone_ids=ids,
                features=feats, kind="featup",
                file_name=f"featup-{'norm' if use_norm else 'no_norm'}-{model}"
                          f"_jbu_stack_cocostuff.ckpt")
    return out


PRETRAINED: dict[str, PretrainedUpsampler] = _featup_entries()
_REGISTRY: dict[str, PretrainedUpsampler] = dict(PRETRAINED)


def register_upsampler(name: str, source, *, backbone_id: str | Sequence[str] | None = None,
                       dim: int | None = None, use_norm: bool | None = None,
                       overwrite: bool = False, _kind: str = "user") -> PretrainedUpsampler:
    """Make ``load_upsampler(name)`` load ``source`` (a saved directory, a FeatUp checkpoint file
    or a URL), and ``pretrained_for(backbone_id)`` return ``name``.  ``backbone_id`` may be a list
    of ids.  For a saved directory, ``backbone_id``/``dim``/``use_norm`` default to its config.
    Re-registering a name warns unless ``overwrite=True``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_upsampler: expected a non-empty name, got {name!r}")
    if name in BASELINE_NAMES:
        raise ValueError(f"register_upsampler: {name!r} is reserved for the baseline upsampler")
    if name == UNIVERSAL_NAME:
        raise ValueError(f"register_upsampler: {name!r} is reserved for the shipped universal upsampler "
                         f"(set {UNIVERSAL_ENV} to load another folder under that name)")
    src = str(source)
    if not src.strip():
        raise ValueError(f"register_upsampler({name!r}): expected a source (a saved directory, a "
                         f"checkpoint file or a URL), got an empty string")
    ids = [backbone_id] if isinstance(backbone_id, str) else list(backbone_id or [])
    if not is_url(src) and Path(src).is_dir() and (Path(src) / CONFIG_NAME).is_file():
        cfg = read_config(Path(src))
        if not ids:
            ids = [i for i in [cfg.get("backbone_id"), *(cfg.get("compatible_backbones") or [])]
                   if i]
        dim = cfg.get("dim") if dim is None else dim
        use_norm = cfg.get("use_norm") if use_norm is None else use_norm
    if name in _REGISTRY and not overwrite:
        warnings.warn(f"register_upsampler: overwriting the registered upsampler {name!r} "
                      f"(was {_REGISTRY[name].source})", stacklevel=2)
    entry = PretrainedUpsampler(name=name, source=src, dim=dim, use_norm=bool(use_norm),
                                backbone_ids=tuple(ids), kind=_kind)
    _REGISTRY.pop(name, None)      # re-insert: the latest registration wins in pretrained_for
    _REGISTRY[name] = entry
    return entry


def unregister_upsampler(name: str) -> None:
    """Forget a registered name (FeatUp's released entries come back on re-import only)."""
    _REGISTRY.pop(name, None)


def pretrained_for(backbone_id: str) -> str | None:
    """The registered upsampler name for ``backbone_id``, or None.  Upsamplers registered by the
    user or shipped with the package win over FeatUp's (newest registration first); among
    FeatUp's, the LayerNorm variant (FeatUp's default) comes first."""
    key = normalize_backbone_id(backbone_id)
    entries = list(_REGISTRY.values())
    ranked = [e for e in reversed(entries) if e.kind != "featup"] + \
             [e for e in entries if e.kind == "featup" and e.use_norm] + \
             [e for e in entries if e.kind == "featup" and not e.use_norm]
    for e in ranked:
        if key in (normalize_backbone_id(i) for i in e.backbone_ids):
            return e.name
    return None


def list_upsamplers() -> list[dict]:
    """Every registered upsampler as a dict (name, source, dim, use_norm, backbone_ids, features,
    kind, file_name)."""
    return [e.as_dict() for e in _REGISTRY.values()]


def _register_shipped_weights(directory=None) -> None:
    """Register every saved upsampler under ``directory`` (default ``WEIGHTS_DIR``) by its folder
    name, as kind ``"local"``."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    if not directory.is_dir():
        return
    for d in sorted(directory.iterdir()):
        if d.name != UNIVERSAL_NAME and d.is_dir() and (d / CONFIG_NAME).is_file():
            try:
                register_upsampler(d.name, d, overwrite=True, _kind="local")
            except CheckpointError as exc:
                warnings.warn(f"skipping shipped upsampler {d}: {exc}", stacklevel=2)


_register_shipped_weights()
