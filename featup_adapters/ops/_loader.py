"""Loads the compiled ``featup_adapters._C`` extension and decides which backend serves each device.

Backends are tried in priority order per device (xformers-style); each one that cannot serve says
why, so a degraded choice is never silent: ``featup_adapters.ops.backend()`` reports it, and the
first call that falls back to the reference warns once with the reason.
"""
from __future__ import annotations

import dataclasses
import importlib
import warnings
from pathlib import Path

import torch

OP = "featup_adapters::adaptive_conv"

_PACKAGE = Path(__file__).resolve().parent.parent
_SOURCE_TREE = (_PACKAGE.parent / "setup.py").is_file()  # a clone (editable or on sys.path)
REBUILD = ("python setup.py build_ext --inplace (in the clone)" if _SOURCE_TREE else
           "pip install --no-build-isolation --no-deps --force-reinstall <featup_adapters source "
           "checkout or sdist>")


def _build_info():
    """featup_adapters/_build_info.py (written by setup.py next to the extension), or None."""
    try:
        return importlib.import_module("featup_adapters._build_info")
    except ImportError:
        return None


def _installed_extension() -> Path | None:
    """The compiled extension of an installed featup_adapters distribution elsewhere than this
    package (this source tree then shadows it: the current folder comes first on sys.path)."""
    from importlib import metadata

    for dist in metadata.distributions(name="featup_adapters"):  # every copy on sys.path
        for f in dist.files or []:
            if f.parts[0] == "featup_adapters" and f.name.startswith("_C.") and f.suffix in (".so", ".pyd"):
                path = Path(f.locate()).resolve()
                if path.parent != _PACKAGE and path.is_file():
                    return path
    return None


def _load():
    """(the extension module or None, why it is not loaded or None)."""
    from packaging.version import Version

    info = _build_info()
    built = getattr(info, "TORCH_VERSION", None)
    if built and Version(built).public != Version(torch.__version__).public:
        # a binary compiled for another torch release fails to link or, worse, crashes: not loaded
        return None, (f"featup_adapters._C was compiled against torch {built} but torch "
                      f"{torch.__version__} is installed (the extension is tied to the torch it was "
                      f"built with); rebuild it for this torch: {REBUILD}")
    try:
        return importlib.import_module("featup_adapters._C"), None
    except ImportError as exc:
        # ModuleNotFoundError: no binary at all (a stale _build_info.py may remain from a build)
        built = None if isinstance(exc, ModuleNotFoundError) else built
        if built and built != torch.__version__:
            return None, (f"featup_adapters._C was compiled against torch {built} but torch "
                          f"{torch.__version__} is installed and it does not load ({exc}); rebuild "
                          f"it for this torch: {REBUILD}")
        if built:
            return None, f"featup_adapters._C does not load ({exc}); rebuild it: {REBUILD}"
        other = _installed_extension() if _SOURCE_TREE else None
        if other is not None:
            return None, (f"featup_adapters is imported from the source tree {_PACKAGE}, which has no "
                          f"compiled extension, and shadows the installed copy in {other.parent} "
                          f"(the current folder comes first on sys.path): run from outside the clone, "
                          f"or build the tree: python setup.py build_ext --inplace")
        return None, (f"the featup_adapters._C extension is not built ({exc}); reinstall with a C++ "
                      f"compiler and torch present: pip install --no-build-isolation ."
                      + (" (in a clone used in place: python setup.py build_ext --inplace)"
                         if _SOURCE_TREE else ""))


_ext, _EXT_ERROR = _load()
if _EXT_ERROR and ("compiled against torch" in _EXT_ERROR or "shadows the installed" in _EXT_ERROR):
    # a setup mistake, not a machine without a compiler: say it now rather than at the first op
    warnings.warn(f"featup_adapters: {_EXT_ERROR}", RuntimeWarning, stacklevel=2)


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
    name: str                      # "cpu_kernel[ISA]", "cuda_kernel" or "reference"
    rejected: dict                 # backend name -> why it cannot serve this device
    note: str = ""                 # e.g. "compiled, no CUDA device"

    def __str__(self) -> str:
        why = "; ".join(f"{k}: {v}" for k, v in self.rejected.items())
        note = f" ({self.note})" if self.note else ""
        return f"{self.device}: {self.name}{note}" + (f" (not used: {why})" if why else "")


def _choose(device: str) -> BackendChoice:
    rejected = {}
    if device == "cpu":
        if has_kernel("CPU"):
            return BackendChoice("cpu", f"cpu_kernel[{cpu_isa()}]", rejected)
        rejected["cpu_kernel"] = _EXT_ERROR or "the extension registered no CPU kernel"
    elif device == "cuda":
        if has_kernel("CUDA"):
            note = "" if torch.cuda.is_available() else "compiled, no CUDA device"
            return BackendChoice("cuda", "cuda_kernel", rejected, note)
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
