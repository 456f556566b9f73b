"""What the extension loader says: a binary built for another torch, a CUDA kernel without a device.

(The installed-wheel versions of these checks are in test_wheel.py; these run in seconds.)
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from featup_adapters import ops


def _run(code: str):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)


def test_extension_built_for_another_torch_is_not_loaded_and_says_so_in_one_line():
    res = _run("""
        import sys, types, warnings
        info = types.ModuleType("featup_adapters._build_info")
        info.TORCH_VERSION = "2.0.1+cu117"
        sys.modules["featup_adapters._build_info"] = info
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import featup_adapters.ops as O
        print(O.backend("cpu").name)
        print("featup_adapters._C" in sys.modules)
        for m in w:
            print("WARNING", m.message)
    """)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[:2] == ["reference", "False"]  # the mismatched binary is never imported
    warned = [line for line in lines if line.startswith("WARNING")]
    assert len(warned) == 1
    assert f"compiled against torch 2.0.1+cu117 but torch {torch.__version__} is installed" in warned[0]
    assert "rebuild it for this torch:" in warned[0] and "not built" not in warned[0]


def test_cuda_backend_names_a_compiled_kernel_without_a_device():
    choice = ops.backend("cuda")
    if not ops.has_kernel("CUDA"):
        assert choice.name == "reference" and "cuda_kernel" in choice.rejected
    elif torch.cuda.is_available():
        assert choice.name == "cuda_kernel" and choice.note == ""
    else:
        assert choice.name == "cuda_kernel" and choice.note == "compiled, no CUDA device"
        assert str(choice) == "cuda: cuda_kernel (compiled, no CUDA device)"
