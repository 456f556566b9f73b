"""The CPU-side parts of the prepared GPU check (benchmarks/gpu_check.py, scripts/gpu_check.sh)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_arguments_default_to_the_issue_cases(tmp_path):
    a = gpu_check.parse_args([str(tmp_path)])
    assert a.sizes == [224, 448, 1024] and a.channels == 384 and a.dtypes == ["float32", "bfloat16"]
    assert a.budget < 360  # the whole check fits in six minutes
    a = gpu_check.parse_args([str(tmp_path), "--sizes", "224", "--dtypes", "bfloat16", "--no-build"])
    assert a.sizes == [224] and a.dtypes == ["bfloat16"] and a.no_build


@pytest.mark.parametrize("argv,message", [
    (["--sizes", "abc"], "expected comma-separated integers"),
    (["--sizes", "100"], "expected multiples of 16"),
    (["--dtypes", "float16"], "expected a subset of float32,bfloat16"),
    (["--repeats", "0"], "must be positive"),
])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args([str(tmp_path), *argv])
    assert e.value.code == gpu_check.EXIT_USAGE
    assert message in capsys.readouterr().err


def fake_result():
    op = []
    for dt in ("float32", "bfloat16"):
        for case, ms in (("forward", 0.08), ("grad_input", 0.09), ("grad_filters", 0.15),
                         ("conv2d depthwise (same FLOPs)", 0.06), ("unfold forward", 2.0)):
            op.append({"case": case, "dtype": dt, "size": 224, "C": 384, "k": 7, "gflop": 1.888,
                       "mb_moved": 160.0, "ms": ms, "min_ms": ms, "peak_mb": 77.0})
        op.append({"case": "unfold forward+backward", "dtype": dt, "size": 1024, "C": 384, "k": 7,
                   "gflop": 39.5, "mb_moved": 3000.0, "skipped": "needs ~370 GB, 130 GB free"})
    stack = [{"case": "forward", "impl": "ours", "dtype": "float32", "size": 224, "C": 384, "ms": 1.5, "peak_mb": 300},
             {"case": "forward", "impl": "unfold", "dtype": "float32", "size": 224, "C": 384, "ms": 15.0, "peak_mb": 7000}]
    return {"date": "2026-12-02 10:00", "status": "ok", "seconds": 301.0,
            "gpu": {"name": "NVIDIA H200", "capability": "9.0", "sms": 132, "memory_gb": 139.8, "torch": "2.14.1", "cuda": "13.0"},
            "build": {"ok": True, "seconds": 120.0, "arch": "9.0"},
            "tests": {"ok": True, "seconds": 90.0, "summary": "130 passed in 88.0s"},
            "bench": {"op": op, "stack": stack, "backend": "cuda: cuda_kernel",
                      "compile": {"case": "torch.compile", "ms": 1.2, "compile_s": 40.0, "max_abs_diff": 1e-6}}}


def test_reports_are_written_from_a_result(tmp_path):
    js, md = gpu_check.write_reports(tmp_path / "out", fake_result())
    assert json.loads(js.read_text()) == fake_result()
    text = md.read_text()
    assert "NVIDIA H200 (sm_90, 132 SMs" in text
    assert "| float32 | 224 | 384 | forward | 0.080 ms | 23600 | 1953 | 0.75x | 77 MB |" in text
    assert "| bfloat16 | 1024 | 384 | unfold forward+backward | skipped: needs ~370 GB, 130 GB free |" in text
    assert "| float32 | 224 | 384 | forward | 1.500 ms | 15.000 ms | 10.0x | 300 MB | 7000 MB |" in text
    assert "- tests: ok (90.0 s) 130 passed in 88.0s" in text
    assert "torch.compile(JBUStack, fullgraph=True) forward at 224: 1.200 ms" in text


def test_failed_steps_are_reported_as_failed(tmp_path):
    res = fake_result()
    res["tests"] = {"ok": False, "seconds": 5.0, "summary": "2 failed, 128 passed"}
    res["bench"] = {"error": "RuntimeError: CUDA error: an illegal memory access"}
    text = gpu_check.render_markdown(res)
    assert "- tests: FAILED (5.0 s) 2 failed, 128 passed" in text
    assert "- benchmarks: FAILED: RuntimeError: CUDA error" in text


def test_without_a_gpu_the_check_skips_with_a_message_and_exit_77(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == gpu_check.EXIT_NO_GPU, res.stdout + res.stderr
    assert "gpu_check: skipped, nothing measured: no CUDA GPU visible" in res.stderr
    report = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert report["status"] == "skipped" and report["args"]["sizes"] == [224, 448, 1024]
    assert "Not measured: no CUDA GPU visible" in (tmp_path / "out" / "gpu.md").read_text()


def test_the_script_without_outdir_is_a_usage_error():
    res = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                         env=dict(os.environ, PYTHON=sys.executable), timeout=120)
    assert res.returncode == gpu_check.EXIT_USAGE and "outdir" in res.stderr


@pytest.mark.slow
def test_benchmark_code_runs_on_cpu_at_toy_sizes(tmp_path):
    """The benchmark child's code paths (op, unfold, conv2d proxy, stack, autocast) on CPU, tiny."""
    out = tmp_path / "raw.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path), "--bench-child",
                          str(out), "--device", "cpu", "--sizes", "32", "--channels", "8", "--repeats", "1",
                          "--budget", "400"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    raw = json.loads(out.read_text())
    assert {r["case"] for r in raw["op"]} == {"forward", "grad_input", "grad_filters", "conv2d depthwise (same FLOPs)",
                                             "unfold forward", "unfold forward+backward"}
    assert all("ms" in r for r in raw["op"] + raw["stack"]), [r for r in raw["op"] + raw["stack"] if "ms" not in r]
    assert len(raw["stack"]) == 8  # (ours, unfold) x (forward, forward+backward) x (float32, bfloat16 autocast)
    assert "| float32 | 32 | 8 | forward |" in gpu_check.render_markdown({"gpu": fake_result()["gpu"], "bench": raw})
