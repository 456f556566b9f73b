"""Loads the compiled ``featup_adapters._C`` extension and decides which backend serves each device.

Backends are tried in priority order per device (xformers-style); each one that cannot serve says
why, so a degraded choice is never silent: ``featup_adapters.ops.backend()`` reports it, and the
first call that falls back to the reference warns once with the reason.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings

import torch

OP = "featup_adapters::adaptive_conv"

_EXT_ERROR: str | None = None
try:
    _ext = importlib.import_module("featup_adapters._C")
except ImportError as exc:  # not built: no compiler at install time, or FEATUP_SKIP_EXT=1
    _ext = None
    _EXT_ERROR = (f"the featup_adapters._C extension is not built ({exc}); reinstall with a C++ "
                  f"compiler and torch present: pip install --no-build-isolation .")


def extension_loaded() -> bool:
    return _ext is not None


def has_kernel(dispatch_key: str) -> bool:
    """True if the extension registered a kernel for ``dispatch_key`` ('CPU' or 'CUDA')."""
    if _ext is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, dispatch_key)


def cpu_isa() -> str:
    """The instruction set the CPU kernel chose at run time (``avx512``, ``avx2``, ``generic``)."""
    if _ext is None:
        return "none"
    return torch.ops.featup_adapters._cpu_isa()


@dataclasses.dataclass(frozen=True)
class BackendChoice:
    device: str
    name: str                      # "cpu_kernel", "cuda_kernel" or "reference"
    rejected: dict                 # backend name -> why it cannot serve this device

    def __str__(self) -> str:
        why = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        return f"{self.device}: {self.name}" + (f" (not used: {why})" if why else "")


def _choose(device: str) -> BackendChoice:
    rejected = {}
    if device == "cpu":
        if has_kernel("CPU"):
            return BackendChoice("cpu", f"cpu_kernel[{cpu_isa()}]", rejected)
        rejected["cpu_kernel"] = _EXT_ERROR or "the extension registered no CPU kernel"
    elif device == "cuda":
        if has_kernel("CUDA"):
            return BackendChoice("cuda", "cuda_kernel", rejected)
        rejected["cuda_kernel"] = _EXT_ERROR or (
            "the extension was built without CUDA (no CUDA toolchain at build time; set CUDA_HOME "
            "and rebuild)")
    else:
        rejected[f"{device}_kernel"] = f"no compiled kernel exists for device type '{device}'"
    return BackendChoice(device, "reference", rejected)


BACKENDS: dict[str, BackendChoice] = {d: _choose(d) for d in ("cpu", "cuda")}
NATIVE: dict[str, bool] = {d: c.name != "reference" for d, c in BACKENDS.items()}
_WARNED: set = set()


def backend(device: str | torch.device | None = None):
    """Which implementation serves ``device`` (a BackendChoice), or all devices when None."""
    if device is None:
        return dict(BACKENDS)
    kind = torch.device(device).type
    if kind not in BACKENDS:
        BACKENDS[kind] = _choose(kind)
        NATIVE[kind] = False
    return BACKENDS[kind]


def warn_fallback(device_type: str) -> None:
    if device_type in _WARNED:
        return
    _WARNED.add(device_type)
    warnings.warn(f"featup_adapters.ops.adaptive_conv runs the pure PyTorch reference on "
                  f"{device_type}: {backend(device_type)}", RuntimeWarning, stacklevel=3)
