"""Training upsamplers by multi-view consistency, and the per-image implicit upsampler.

    from featup_adapters.training import train_upsampler, fit_implicit

Submodules: ``jitter`` (random views), ``downsamplers`` (simple / attention), ``losses`` (scale net,
Gaussian likelihood, random projection, TV), ``trainer`` (``train_upsampler``: checkpoints, resume,
DDP), ``universal`` (``train_universal``: one channel-agnostic upsampler across backbones),
``distributed`` (torchrun helpers), ``implicit`` (``fit_implicit``), ``evaluate`` (multi-view
reconstruction error), ``cli`` (the ``train`` / ``train-universal`` / ``fit-implicit`` sub-commands).
Importing this package imports only torch.
"""
from __future__ import annotations

from .implicit import ImplicitUpsampler, fit_implicit
from .trainer import TrainConfig, train_upsampler
from .universal import train_universal

__all__ = ["train_upsampler", "train_universal", "fit_implicit", "ImplicitUpsampler", "TrainConfig"]
