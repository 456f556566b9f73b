"""Builds the project's CUDA kernels as host C++ (with cuda_shim.h) and runs them on CPU tensors.

``build()`` compiles ``featup_adapters/csrc/cuda/adaptive_conv_kernels.cuh`` (the file the CUDA
extension compiles) together with ``emu_ops.cpp`` into a shared library, cached by the hash of
the sources and flags; ``Emulator.run`` launches one op exactly as the CUDA wrapper does (same
launch plans, same early returns) and returns the result and a per-element write count.
Nothing here needs a GPU or the CUDA toolkit, only g++ with C++20.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "featup_adapters" / "csrc"
KERNELS = CSRC / "cuda" / "adaptive_conv_kernels.cuh"
COMMON = CSRC / "adaptive_conv_common.h"
SHIM = HERE / "cuda_shim.h"
OPS = HERE / "emu_ops.cpp"
ASAN_MAIN = HERE / "asan_main.cpp"

FLAGS = ["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread", "-Wall", "-Wextra", "-Werror",
         "-Wno-unknown-pragmas",
         "-Wno-clobbered"]  # getcontext in emu::launch: the scheduler resumes on its own intact stack
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
OPS_IDS = {"forward": 0, "grad_input": 1, "grad_filters": 2}


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _cache_dir() -> Path:
    base = Path(os.environ.get("FEATUP_EMU_CACHE", Path(tempfile.gettempdir()) / "featup_cuda_emu"))
    base.mkdir(parents=True, exist_ok=True)
    return base


def _digest(paths, flags) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.name).encode())
        h.update(Path(p).read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:20]


def _compile(sources, csrc: Path, out_name: str, flags, shared: bool) -> Path:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH: the CUDA emulation needs one")
    headers = [csrc / "cuda" / "adaptive_conv_kernels.cuh", csrc / "adaptive_conv_common.h", SHIM]
    key = _digest(list(sources) + headers, flags + [str(shared)])
    out = _cache_dir() / key / out_name
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [cxx, *flags, *(["-shared", "-fPIC"] if shared else []), f"-I{csrc}", f"-I{HERE}",
           *map(str, sources), "-o", str(tmp)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"compiling the CUDA emulation failed:\n{' '.join(cmd)}\n{res.stderr[-6000:]}")
    os.replace(tmp, out)  # atomic: concurrent sessions never load a half-written library
    return out


def build(csrc: Path = CSRC, grid_limit: int | None = None) -> Path:
    """The emulation library for the kernels under ``csrc`` (default: the project's own).

    ``grid_limit`` replaces the 65535 cap of grid y / z in the plans (FA_GRID_YZ_LIMIT), so that
    small problems exercise the kernels' loops over work that does not fit the grid.
    """
    flags = FLAGS + ([f"-DFA_GRID_YZ_LIMIT={grid_limit}"] if grid_limit else [])
    return _compile([OPS], Path(csrc), "libfa_emu.so", flags, shared=True)


def build_sanitized(csrc: Path = CSRC) -> Path:
    """A standalone program running the kernels under AddressSanitizer + UBSan (see asan_main.cpp)."""
    return _compile([OPS, ASAN_MAIN], Path(csrc), "fa_emu_asan", FLAGS + SANITIZE, shared=False)


def copy_csrc(dest: Path) -> Path:
    """A copy of the kernel sources the emulation needs (to plant a bug in), returns its csrc."""
    (dest / "cuda").mkdir(parents=True, exist_ok=True)
    shutil.copy(KERNELS, dest / "cuda" / KERNELS.name)
    shutil.copy(COMMON, dest / COMMON.name)
    return dest


class EmulationError(RuntimeError):
    pass


class Emulator:
    """ctypes front of libfa_emu.so."""

    def __init__(self, lib_path: Path):
        self.path = lib_path
        lib = ctypes.CDLL(str(lib_path))
        lib.fa_emu_run.restype = ctypes.c_char_p
        lib.fa_emu_run.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                                   ctypes.c_void_p]
        lib.fa_emu_plan.restype = ctypes.c_char_p
        lib.fa_emu_plan.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64,
                                    ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)]
        lib.fa_emu_launches.restype = ctypes.c_int64
        lib.fa_emu_set_plant.restype = None
        lib.fa_emu_set_plant.argtypes = [ctypes.c_int]
        lib.fa_emu_convert.restype = None
        lib.fa_emu_convert.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        self.lib = lib

    @staticmethod
    def _shape(shape):
        return (ctypes.c_int64 * 5)(*shape)

    def plan(self, op: str, shape, sms: int, acc_bytes: int = 4) -> dict:
        out = (ctypes.c_int64 * 10)()
        err = self.lib.fa_emu_plan(OPS_IDS[op], self._shape(shape), sms, acc_bytes, out)
        if err:
            raise EmulationError(err.decode())
        keys = ["gx", "gy", "gz", "bx", "by", "bz", "smem", "rows", "splits", "per_split"]
        return dict(zip(keys, list(out)))

    def run(self, op: str, a: torch.Tensor, b: torch.Tensor, shape, sms: int = 132):
        """Result and int32 write counts of ``op`` on contiguous CPU tensors ``a``, ``b``."""
        B, C, H, W, k = shape
        out_shape = {"forward": (B, C, H, W), "grad_input": (B, C, H + k - 1, W + k - 1),
                     "grad_filters": (B, H, W, k, k)}[op]
        assert a.is_contiguous() and b.is_contiguous() and a.dtype == b.dtype
        # NaN-filled, so an element the kernels never write cannot pass as a plausible value
        out = torch.full(out_shape, float("nan"), dtype=a.dtype)
        counts = torch.zeros(out_shape, dtype=torch.int32)
        err = self.lib.fa_emu_run(OPS_IDS[op], DTYPES[a.dtype], a.data_ptr(), b.data_ptr(), out.data_ptr(),
                                  self._shape(shape), sms, counts.data_ptr())
        if err:
            raise EmulationError(err.decode())
        return out, counts

    def set_plant(self, n: int) -> None:
        self.lib.fa_emu_set_plant(n)

    def launches(self) -> int:
        return self.lib.fa_emu_launches()

    def convert(self, kind: int, src: torch.Tensor) -> torch.Tensor:
        """0: float32 -> float16 bits, 1: back; 2: float32 -> bfloat16 bits, 3: back (bits as int16)."""
        dst = torch.empty(src.shape, dtype=torch.int16 if kind in (0, 2) else torch.float32)
        self.lib.fa_emu_convert(kind, src.numel(), src.data_ptr(), dst.data_ptr())
        return dst
