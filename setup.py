"""Builds the ``featup_adapters._C`` extension (the adaptive-convolution op).

Everything else about the package lives in setup.cfg / pyproject.toml.  This file exists only
because the C++/CUDA extension needs torch's build helpers.

* The CPU kernel is always compiled (C++17, OpenMP).  Its hot loops are compiled three times
  (generic, AVX2+FMA, AVX-512) on x86-64 and chosen at run time, so the binary runs on any CPU.
* The CUDA kernel is compiled whenever a CUDA toolchain is found (``CUDA_HOME`` or ``nvcc`` on
  PATH), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``), even on machines without a GPU.
* ``FEATUP_NO_CUDA=1`` skips the CUDA part; ``FEATUP_SKIP_EXT=1`` skips the extension entirely.
* A missing or broken compiler never fails the install: the package then runs on its pure
  PyTorch reference implementation and ``featup_adapters.ops.backend()`` says why.
"""
import glob
import os
import shutil
import sys
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("featup_adapters", "csrc")


def _log(msg):
    print(f"[featup_adapters setup] {msg}", file=sys.stderr)


def _is_toolkit(path):
    return bool(path) and os.path.exists(os.path.join(path, "bin", "nvcc")) and os.path.exists(
        os.path.join(path, "include", "cuda_runtime.h"))


def _nvcc_top(nvcc):
    """The toolkit folder nvcc itself reports (works when nvcc on PATH is a wrapper script)."""
    import subprocess
    import tempfile
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            open(src, "w").close()
            out = subprocess.run([nvcc, "--dryrun", "-c", src], capture_output=True, text=True,
                                 timeout=60, cwd=tmp)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if "TOP=" in line:
            return os.path.realpath(line.split("TOP=", 1)[1].strip())
    return None


def _cuda_home():
    """A CUDA toolkit folder (bin/nvcc + include/cuda_runtime.h), or None."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(key)):
            return os.environ[key]
        if os.environ.get(key):
            _log(f"ignoring {key}={os.environ[key]}: no bin/nvcc and include/cuda_runtime.h there")
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), _nvcc_top(nvcc)]
    candidates += ["/usr/local/cuda", "/opt/cuda"]
    for path in candidates:
        if _is_toolkit(path):
            return path
    return None


def _extra_cuda_includes():
    # torch's CUDA headers include cusparse.h / cublas_v2.h; a bare toolkit may lack them while
    # torch's own CUDA wheels ship them under site-packages/nvidia/*/include.
    found = []
    site = sysconfig.get_paths()["purelib"]
    for pattern in ("nvidia/cu*/include", "nvidia/cusparse/include", "nvidia/cublas/include"):
        found += sorted(glob.glob(os.path.join(site, pattern)))
    return found


def _extensions():
    if os.environ.get("FEATUP_SKIP_EXT") == "1":
        _log("FEATUP_SKIP_EXT=1: not building the extension (reference implementation only)")
        return [], {}
    try:
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable: install torch first and use --no-build-isolation; "
             "building without the extension")
        return [], {}

    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-DNDEBUG"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, CSRC)]

    want_cuda = os.environ.get("FEATUP_NO_CUDA") != "1"
    cuda_home = _cuda_home() if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # set before torch looked it up lazily
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        _log(f"CUDA toolchain at {cuda_home}: compiling the CUDA kernel for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = cpp_extension.CUDAExtension(
            "featup_adapters._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + _extra_cuda_includes(),
            define_macros=define_macros + [("FEATUP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math",
                                                           "-DNDEBUG"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        _log("no CUDA toolchain found (set CUDA_HOME): compiling the CPU kernel only")
        ext = cpp_extension.CppExtension(
            "featup_adapters._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class TolerantBuild(base):
        """Never let a failed compile break the install: fall back to the reference op."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, toolchain broken, ...
                if os.environ.get("FEATUP_REQUIRE_EXT") == "1":
                    raise
                _log(f"building the extension failed ({type(exc).__name__}: {exc}); installing "
                     "without it. featup_adapters will run the pure PyTorch reference op. "
                     "Set FEATUP_REQUIRE_EXT=1 to make this an error.")

    return [ext], {"build_ext": TolerantBuild}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
