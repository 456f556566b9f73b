"""Upsampler persistence and the registry of pretrained upsamplers.

* ``format``: ``save_upsampler`` / ``UpsamplerMixin.save_pretrained`` write ``model.safetensors``
  + ``config.json``; the readers validate every key of the config.
* ``featup``: ``load_featup_checkpoint`` imports FeatUp's released Lightning checkpoints into a
  ``JBUStack``; ``safe_torch_load`` is the weights-only loader for every torch file the hub reads.
* ``registry``: ``PRETRAINED`` (FeatUp's released upsamplers), ``register_upsampler``,
  ``pretrained_for``, ``list_upsamplers``; the upsamplers shipped in ``featup_adapters/weights/``.
* ``download``: URLs into torch.hub's cache; ``hf_snapshot``: Hugging Face Hub repos into its cache.
* ``loading``: ``load_upsampler(dir_or_name)`` for all of the above (and ``"universal"``:
  ``load_universal``, the channel-agnostic upsampler for any backbone), ``check_compatible``.
* ``torch_hub``: the models behind ``hubconf.py`` (FeatUp's torch.hub entries); imported by
  ``hubconf.py`` only, not here, since it builds on ``neck`` and ``adapters``.

Every loader returns the module in eval mode.
"""
from __future__ import annotations

from .download import download, hf_snapshot, is_url
from .featup import IgnoredObject, load_featup_checkpoint, safe_torch_load
from .format import (CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, CheckpointError,
                     check_state_dict, read_config, save_upsampler)
from .loading import (IncompatibleUpsamplerError, UniversalWeightsMissing, check_compatible,
                      load_saved_upsampler, load_universal, load_upsampler)
from .registry import (_REGISTRY, BASELINE_NAMES, FEATUP_URL, PRETRAINED, WEIGHTS_DIR,
                       UNIVERSAL_ENV, UNIVERSAL_NAME, PretrainedUpsampler,
                       _register_shipped_weights, list_upsamplers, normalize_backbone_id,
                       pretrained_for, register_upsampler, universal_weights_dir,
                       unregister_upsampler)

_is_url = is_url                      # the name before the split
_BASELINE_NAMES = BASELINE_NAMES

__all__ = ["save_upsampler", "load_upsampler", "load_saved_upsampler", "load_featup_checkpoint",
           "safe_torch_load", "check_compatible", "register_upsampler", "unregister_upsampler",
           "pretrained_for", "list_upsamplers", "PRETRAINED", "PretrainedUpsampler",
           "CheckpointError", "IncompatibleUpsamplerError", "normalize_backbone_id", "FEATUP_URL",
           "download", "hf_snapshot", "read_config", "check_state_dict", "IgnoredObject", "FORMAT",
           "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "WEIGHTS_DIR", "load_universal",
           "UniversalWeightsMissing", "universal_weights_dir", "UNIVERSAL_NAME", "UNIVERSAL_ENV"]
