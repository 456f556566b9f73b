"""The saved format of upsamplers: ``save_upsampler`` and the readers of ``model.safetensors`` +
``config.json`` directories.

The layout and its checks are implemented in ``featup_adapters._format`` (a module below both
``upsamplers`` and ``hub``, so ``save_pretrained`` needs no import of the hub); this module is
their public face.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from .._format import (CONFIG_KEYS, CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME,
                       CheckpointError, build_config, check_state_dict, read_config, read_weights,
                       write_saved)
from ..upsamplers._base import check_registered

__all__ = ["save_upsampler", "read_config", "read_weights", "check_state_dict", "CheckpointError",
           "FORMAT", "FORMAT_VERSION", "WEIGHTS_NAME", "CONFIG_NAME", "CONFIG_KEYS"]


def save_upsampler(module: nn.Module, directory, *, backbone_id: str | None = None,
                   layer: str | None = None, use_norm: bool | None = None,
                   extra: dict | None = None) -> Path:
    """Write ``module``'s weights (safetensors) and config (JSON) into ``directory``; see
    ``UpsamplerMixin.save_pretrained``.  Returns the directory."""
    check_registered(module)
    config = build_config(module, backbone_id=backbone_id, layer=layer, use_norm=use_norm,
                          extra=extra)
    return write_saved(module, directory, config)
