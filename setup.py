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
  ``FEATUP_REQUIRE_EXT=1`` makes a failed build an error.
* A build with the extension enabled (torch importable, no ``FEATUP_SKIP_EXT``) pins
  ``torch==<the torch it compiles against>`` (the public version: ``2.14.1`` for
  ``2.14.1+cu130``, which PEP 440 matches with every local variant of that release, so the PyPI
  and the PyTorch-index builds both satisfy it) and records the full version in
  ``featup_adapters/_build_info.py``; the loader refuses a binary built for another torch release
  and says how to rebuild.  It prints one summary line: the CPU kernel ISAs and the CUDA
  architectures built (or why not).
* The repository's ``integrations/`` and ``benchmarks/`` folders are installed as
  ``featup_adapters.integrations`` and ``featup_adapters.benchmarks`` (``package_dir``).
"""
import glob
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("featup_adapters", "csrc")


def _log(msg):
    print(f"[featup_adapters setup] {msg}", file=sys.stderr)


# Requirements besides torch (torch is added by _install_requires, pinned when the extension is built).
REQUIRES = ["numpy", "pillow", "safetensors", "packaging", "tqdm"]
TORCH_FLOOR = "torch>=2.6"

# Folders at the repository root shipped inside the package (kept where they are for the clone).
MAPPED = {"featup_adapters.integrations": "integrations",
          "featup_adapters.benchmarks": "benchmarks"}


def _packages():
    found = find_packages(include=["featup_adapters", "featup_adapters.*"])
    for name, folder in MAPPED.items():
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return found


def _package_dir():
    out = dict(MAPPED)
    for name, folder in MAPPED.items():
        for sub in find_packages(where=folder):
            out[f"{name}.{sub}"] = os.path.join(folder, *sub.split("."))
    return out


def _cpu_isas():
    if platform.machine().lower() in ("x86_64", "amd64"):
        return ["generic", "avx2+fma", "avx512"]
    return [f"generic ({platform.machine()} baseline)"]


def _cuda_archs(arch_list):
    archs = []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if item:
            ptx = item.endswith("+PTX")
            num = item.replace("+PTX", "").replace(".", "")
            archs.append(f"sm_{num}" + ("+PTX" if ptx else ""))
    return archs


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
    """(ext_modules, cmdclass, install_requires) for this build."""
    if os.environ.get("FEATUP_SKIP_EXT") == "1":
        _log("FEATUP_SKIP_EXT=1: not building the extension (reference implementation only)")
        return [], {}, [TORCH_FLOOR]
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable: install torch first and use --no-build-isolation; "
             "building without the extension")
        return [], {}, [TORCH_FLOOR]
    from packaging.version import Version

    cpu_sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-DNDEBUG"]
    define_macros = []
    include_dirs = [os.path.join(ROOT, CSRC)]
    info = {"torch_version": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": platform.python_version(), "cpu_isas": _cpu_isas(), "cuda_archs": [],
            "cuda_toolkit": None, "cuda_skipped": None}

    want_cuda = os.environ.get("FEATUP_NO_CUDA") != "1"
    cuda_home = _cuda_home() if want_cuda else None
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # set before torch looked it up lazily
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        info["cuda_archs"] = _cuda_archs(os.environ["TORCH_CUDA_ARCH_LIST"])
        info["cuda_toolkit"] = cuda_home
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
        info["cuda_skipped"] = ("FEATUP_NO_CUDA=1" if not want_cuda else
                                "no CUDA toolchain found (set CUDA_HOME)")
        _log(f"{info['cuda_skipped']}: compiling the CPU kernel only")
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
        """Never let a failed compile break the install: fall back to the reference op.

        After a successful build, writes ``featup_adapters/_build_info.py`` next to the extension
        and prints one summary line of what was built.
        """

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, toolchain broken, ...
                if os.environ.get("FEATUP_REQUIRE_EXT") == "1":
                    raise
                # The metadata (with the torch pin) is written before build_ext runs, so the pin
                # stays: it names the torch present at build time, which this install has.
                _log(f"building the extension failed ({type(exc).__name__}: {exc}); installing "
                     "without it. featup_adapters will run the pure PyTorch reference op. "
                     "Set FEATUP_REQUIRE_EXT=1 to make this an error.")
                _log("build summary: extension NOT built (see above); the reference op will be used")
                return
            target = os.path.join(os.path.dirname(self.get_ext_fullpath("featup_adapters._C")),
                                  "_build_info.py")
            with open(target, "w") as f:
                f.write('"""What featup_adapters._C was compiled with (written by setup.py)."""\n')
                for key, value in info.items():
                    f.write(f"{key.upper()} = {value!r}\n")
            cuda = (f"CUDA kernels for {', '.join(info['cuda_archs'])} (toolkit {cuda_home})"
                    if info["cuda_archs"] else f"no CUDA kernels: {info['cuda_skipped']}")
            _log(f"build summary: featup_adapters._C for torch {torch.__version__}: CPU kernels "
                 f"{', '.join(info['cpu_isas'])} (the widest the CPU supports is chosen at run "
                 f"time); {cuda}")

    pin = f"torch=={Version(torch.__version__).public}"
    return [ext], {"build_ext": TolerantBuild}, [pin]


ext_modules, cmdclass, torch_requirement = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, install_requires=REQUIRES + torch_requirement,
      packages=_packages(), package_dir=_package_dir())
