"""benches/gpu_check.py (`make gpu-check`) as far as a machine without a GPU allows: the step
runner, the parsers, the summary writer, the whole run against fake steps, and the no-GPU exit.
Nothing here needs a GPU or builds anything; every test runs in about a second."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benches" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses looks the module up by name
_spec.loader.exec_module(gc)

# Hides any GPU from torch, so the no-GPU tests hold on a GPU machine too (and never build there).
NO_GPU_ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
NO_GPU_MESSAGE = "no usable CUDA GPU on this machine"


# -- the runner -------------------------------------------------------------------------------------


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_step_pass_fail_and_log(tmp_path):
    r = gc.run_step("ok", _py("print('hello')"), log=tmp_path / "ok.log", timeout_s=30, env={"GC_X": "1"})
    assert (r.status, r.rc, r.ok) == ("pass", 0, True)
    text = (tmp_path / "ok.log").read_text()
    assert "GC_X=1" in text and "hello" in text and "# pass, exit code 0" in text
    r = gc.run_step("bad", _py("import sys; print('boom', file=sys.stderr); sys.exit(3)"),
                    log=tmp_path / "bad.log", timeout_s=30)
    assert (r.status, r.rc, r.ok) == ("fail", 3, False) and r.notes == ["exit code 3"]
    assert "boom" in (tmp_path / "bad.log").read_text()  # stderr goes to the log too


def test_run_step_timeout_kills_the_process_group(tmp_path):
    # The step starts a grandchild that would outlive a plain kill of the step itself.
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print(p.pid, flush=True); time.sleep(60)")
    t0 = time.monotonic()
    r = gc.run_step("slow", _py(code), log=tmp_path / "slow.log", timeout_s=1.0)
    assert time.monotonic() - t0 < 15
    assert r.status == "timeout" and not r.ok and "timed out after 1 s" in r.notes[0]
    grandchild = int((tmp_path / "slow.log").read_text().splitlines()[3])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)  # still there (or a zombie awaiting its reaper)
        except ProcessLookupError:
            break
        if Path(f"/proc/{grandchild}/stat").exists() and ") Z" in Path(f"/proc/{grandchild}/stat").read_text():
            break
        time.sleep(0.05)
    else:
        pytest.fail("the timed-out step's grandchild is still running")


def test_run_step_missing_program(tmp_path):
    r = gc.run_step("none", ["/nonexistent/program"], log=tmp_path / "n.log", timeout_s=5)
    assert r.status == "fail" and "could not start" in r.notes[0]


def test_stop_running_steps_ends_them(tmp_path):
    running = gc.start_step("sleep", _py("import time; time.sleep(60)"), log=tmp_path / "s.log", timeout_s=60)
    t0 = time.monotonic()
    gc.stop_running_steps()  # what an interrupted check does before it exits
    r = running.wait()
    assert time.monotonic() - t0 < 15 and r.status == "fail" and r.rc is not None and r.rc < 0
    assert running not in gc._LIVE


def test_budget_cuts_timeouts_and_refuses_when_spent():
    now = [100.0]
    b = gc.Budget(60, clock=lambda: now[0])
    assert b.timeout_for(300) == 60 and b.timeout_for(20) == 20
    now[0] = 155.0
    assert b.timeout_for(300) is None  # 5 s left < MIN_STEP_S


# -- parsers ----------------------------------------------------------------------------------------

PYTEST_Q = """\
........................s.....F
=========================== short test summary info ============================
SKIPPED [1] python_tests/test_cli.py:189: MNIST / Fashion-MNIST files not found (set EXML_FAST_DATA)
FAILED python_tests/test_bn_stats.py::test_forward_matches_reference[cuda-torch.float16-odd] - AssertionError
ERROR python_tests/test_strategies.py::test_ed_and_baselines_on_cuda_match_the_cpu_run - RuntimeError
1 failed, 850 passed, 1 skipped, 1404 deselected, 3 warnings, 1 error in 81.20s (0:01:21)
"""


def test_parse_pytest_summary_quiet_output():
    c = gc.parse_pytest_summary(PYTEST_Q)
    assert {k: c[k] for k in ("passed", "failed", "skipped", "deselected", "errors", "warnings")} == {
        "passed": 850, "failed": 1, "skipped": 1, "deselected": 1404, "errors": 1, "warnings": 3}
    assert c["seconds"] == 81.2 and c["xfailed"] == 0
    assert c["failed_tests"] == [
        "python_tests/test_bn_stats.py::test_forward_matches_reference[cuda-torch.float16-odd]",
        "python_tests/test_strategies.py::test_ed_and_baselines_on_cuda_match_the_cpu_run"]
    assert c["skips"] == [("[1] python_tests/test_cli.py:189: MNIST / Fashion-MNIST files not found "
                           "(set EXML_FAST_DATA)")]


@pytest.mark.parametrize("line,expect", [
    ("============ 12 passed, 2 xfailed in 3.02s ============", {"passed": 12, "xfailed": 2, "failed": 0}),
    ("==== 2 errors in 0.51s ====", {"errors": 2, "passed": 0}),
    ("============ no tests ran in 0.01s ============", {"passed": 0, "failed": 0}),
    ("1 passed in 0.1s", {"passed": 1}),
])
def test_parse_pytest_summary_final_lines(line, expect):
    c = gc.parse_pytest_summary("collected 3 items\n\n" + line + "\n")
    assert {k: c[k] for k in expect} == expect


def test_parse_pytest_summary_without_a_final_line():
    assert gc.parse_pytest_summary("Fatal Python error: Segmentation fault\n") is None
    assert gc.parse_pytest_summary("") is None


def _judge(text):
    return gc.judge_pytest(gc.StepResult("pytest-cuda", "pass"), text)


def test_judge_pytest():
    assert _judge("851 passed, 3 skipped in 80.0s\nSKIPPED [3] python_tests/test_cli.py:189: MNIST files not found\n"
                  ).ok
    r = _judge(PYTEST_Q)
    assert r.status == "fail" and "failing tests" in r.notes[0]
    assert r.summary == "850 passed, 1 failed, 1 errors, 1 skipped"
    # A CUDA test that skips for want of the GPU or of the build is a failure on the GPU machine.
    r = _judge("SKIPPED [800] python_tests/test_bn_stats.py:93: no CUDA device\n1 passed, 800 skipped in 2.0s\n")
    assert r.status == "fail" and "missing" in r.notes[0]
    assert not _judge("SKIPPED [862] python_tests/_util.py:9: compiled exml_fast._C not built\n"
                      "862 skipped in 2.0s\n").ok
    assert "no test passed" in _judge("5 deselected in 0.2s\n").notes[0]
    r = _judge("Segmentation fault (core dumped)\n")
    assert not r.ok and r.summary == "no pytest summary line"


CTEST = """\
Test project /repo/build-cmake-cuda
      Start  1: registration
 1/31 Test  #1: registration .....................   Passed    2.01 sec
24/31 Test #24: cuda_kernel_registered ...........   Passed    2.50 sec
25/31 Test #25: cuda_nchw_fp32 ...................***Failed    2.60 sec
26/31 Test #26: cuda_bf16_5d .....................***Skipped   0.50 sec
27/31 Test #27: cuda_backward ....................***Timeout 300.00 sec

80% tests passed, 2 tests failed out of 5
"""


def test_parse_ctest():
    d = gc.parse_ctest(CTEST)
    assert (d["passed"], d["failed"], d["skipped"]) == (2, 2, 1)
    assert d["failed_tests"] == ["cuda_nchw_fp32", "cuda_backward"] and d["skipped_tests"] == ["cuda_bf16_5d"]
    assert d["passed_tests"] == ["registration", "cuda_kernel_registered"]


SANITIZER = """\
========= COMPUTE-SANITIZER
....
========= Invalid __global__ read of size 4 bytes
=========     at exml_fast::(anonymous namespace)::gather_kernel<float>(...)+0x1a0 in augment_kernel.cu:77
=========     by thread (31,0,0) in block (3,0,0)
=========
========= Program hit cudaErrorLaunchFailure (error 719) due to "unspecified launch failure" on CUDA API call
"""


def test_parse_sanitizer():
    s = gc.parse_sanitizer(SANITIZER + "3 passed in 9.0s\n========= ERROR SUMMARY: 2 errors\n")
    assert s["error_count"] == 2 and s["complete"]
    assert s["errors"][0].startswith("Invalid __global__ read") and s["errors"][1].startswith("Program hit")
    cut = gc.parse_sanitizer(SANITIZER)  # killed by the timeout: no summary, the headers so far
    assert cut == {**cut, "error_count": 2, "complete": False}
    assert gc.parse_sanitizer("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")["error_count"] == 0


def test_racecheck_covers_every_op_whose_cuda_kernels_use_shared_memory():
    root = Path(gc.__file__).resolve().parents[1]
    shared = {f"ops/test_{cu.name.removesuffix('_kernel.cu')}.py" for cu in (root / "csrc" / "cuda").glob("*.cu")
              if "__shared__" in cu.read_text()}
    assert shared and shared <= set(gc.RACECHECK_FILES) <= set(gc.SANITIZER_FILES)
    assert all((root / "python_tests" / f).exists() for f in gc.RACECHECK_FILES)


def test_parse_racecheck():
    # racecheck prints no ERROR SUMMARY: its own summary line (this one as an H100 printed it, 2026-11-25)
    clean = gc.parse_sanitizer("========= COMPUTE-SANITIZER\n236 passed in 97.43s (0:01:37)\n"
                               "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    assert clean == {"error_count": 0, "warning_count": 0, "complete": True, "errors": []}
    race = gc.parse_sanitizer(
        "========= COMPUTE-SANITIZER\n"
        "========= Error: Race reported between Write access at reduce_kernel<float>+0x90 in bn_stats_kernel.cu:40\n"
        "=========     and Read access at reduce_kernel<float>+0xb0 in bn_stats_kernel.cu:44 [128 hazards]\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (1 error, 1 warning)\n")
    assert race["error_count"] == 1 and race["warning_count"] == 1 and race["complete"]
    assert race["errors"] == ["Error: Race reported between Write access at reduce_kernel<float>+0x90 in "
                              "bn_stats_kernel.cu:40"]


def test_bench_headlines():
    ops = {"env": {"device": "H100"}, "op_level": [
        {"variant": "reference", "speedup_vs_reference": 1.0},
        {"variant": "exml_fast", "speedup_vs_reference": 2.0},
        {"variant": "exml_fast", "speedup_vs_reference": 6.0},
        {"variant": "exml_fast kernels only", "speedup_vs_reference": 9.0}],
        "step_level": [{"variant": "no BN loss", "overhead_pct_vs_no_bn": 0.0},
                       {"variant": "exml_fast", "overhead_pct_vs_no_bn": 3.5}]}
    assert gc.bench_headlines(ops) == ["op_level: exml_fast vs reference x4.00 median (x2.00 to x6.00) over 2 cases",
                                       "step_level: the BN loss adds 3.5 % (exml_fast)"]
    losses = {"rows": [{"variant": "reference", "exml_fast_speedup": 3.0}, {"variant": "exml_fast",
                                                                          "exml_fast_speedup": 1.0}]}
    assert gc.bench_headlines(losses) == ["rows: exml_fast vs reference x3.00 median (x3.00 to x3.00) over 1 cases"]
    synth = {"argv": ["--quick"], "results": [{"net": "resnet18", "batch": 64, "timing": [
        {"variant": "public", "images_per_s": 1000.4, "speedup": 1.0},
        {"variant": "exml bf16+cl+graph", "failed": "RuntimeError: capture failed"}]}]}
    assert gc.bench_headlines(synth) == ["resnet18 batch 64, public: 1000 images/s, x1.00 vs the frozen public loop",
                                         "resnet18 exml bf16+cl+graph: FAILED (RuntimeError: capture failed)"]
    paired = {"results": [{"net": "resnet18", "batch": 256, "timing": [
        {"variant": "exml bf16+cl+graph", "images_per_s": 9000.0, "speedup": 6.0, "peer": "public frozen bf16+cl",
         "speedup_vs_peer": 1.5, "speedup_vs_peer_min": 1.4, "speedup_vs_peer_max": 1.7}],
        "bn_share": [{"variant": "exml fp32", "share_pct": 12.0, "adds_pct": 13.6, "adds_pct_min": 10.0,
                      "adds_pct_max": 15.0}]}]}
    assert gc.bench_headlines(paired) == [
        "resnet18 batch 256, exml bf16+cl+graph: 9000 images/s, x1.50 [1.40-1.70] vs public frozen bf16+cl",
        "resnet18 batch 256: the BN term is 12 % of exml fp32's step (adds 14 % [10-15])"]


def test_big_row_headlines_give_gb_per_s_and_the_peers_of_the_same_case():
    rec = {"results": [{"shape": [256, 64, 56, 56], "mode": "max", "rows": [
        {"variant": "reference", "ms": 2.0, "MB": 514.0, "GB/s": 257.0},
        {"variant": "exml_fast", "ms": 1.0, "MB": 514.0, "GB/s": 514.0, "pct_copy_bw": 16.0},
        {"variant": "compile(reference)", "ms": 1.5, "MB": 514.0}]},
        {"shape": [256, 6, 28, 28], "mode": "max", "rows": [{"variant": "exml_fast", "ms": 0.1, "MB": 12.0}]}]}
    assert gc.big_row_headlines(rec) == [
        "shape=[256, 64, 56, 56], mode=max: 514 MB, exml_fast 1.000 ms = 514 GB/s (16 % of copy); "
        "reference 2.000 ms (x2.00); compile(reference) 1.500 ms (x1.50)"]


def test_no_gpu_reason():
    gpu = {"torch": "2.11.0", "torch_cuda": "13.0", "cuda_available": True, "device_count": 1}
    assert gc.no_gpu_reason(gpu, {}) is None
    assert "cannot be imported" in gc.no_gpu_reason({"torch_error": "ModuleNotFoundError"}, {})
    assert "CPU-only build" in gc.no_gpu_reason({"torch": "2.11.0+cpu", "torch_cuda": None}, {})
    why = gc.no_gpu_reason({**gpu, "cuda_available": False, "device_count": 0},
                           {"gpus": [["NVIDIA H100 80GB HBM3", "580.65", "81559 MiB"]]})
    assert "sees no CUDA device" in why and "nvidia-smi lists NVIDIA H100" in why
    assert "there is no nvidia-smi" in gc.no_gpu_reason({**gpu, "cuda_available": False}, {})


# -- the summary ------------------------------------------------------------------------------------

ENV = {"device_name": "NVIDIA H100 80GB HBM3", "arch": "9.0", "memory_gib": 79.2, "torch": "2.11.0+cu130",
       "torch_cuda": "13.0", "python": "3.12.3", "nvcc": "13.0.88", "cores": 16, "commit": "abc123",
       "date": "2026-01-01T00:00:00+00:00", "budget_s": 570, "wall_s": 420.0, "sanitizer": "/usr/local/cuda/bin/cs",
       "nvidia_smi": {"gpus": [["NVIDIA H100 80GB HBM3", "580.65.06", "81559 MiB"]], "driver_cuda": "13.0"}}


def _results(tmp_path):
    pytest_r = gc.StepResult("pytest-cuda", "pass", seconds=80.4, rc=0, log=str(tmp_path / "logs/pytest-cuda.log"))
    gc.judge_pytest(pytest_r, PYTEST_Q)
    bench = gc.StepResult("bench-soft_target_losses", "pass", seconds=12, summary="rows: x3",
                          details={"record_md": str(tmp_path / "benches/losses_cuda_quick.md"),
                                   "headlines": ["rows: exml_fast vs reference x3.00"]})
    return [gc.StepResult("gpu", "pass", seconds=2, summary="NVIDIA H100 80GB HBM3, sm 9.0"),
            gc.StepResult("build", "pass", seconds=95, rc=0, summary="CUDA 13.0 kernels for 9.0"),
            gc.StepResult("ctest", "timeout", seconds=120, timeout_s=120, notes=["timed out after 120 s"]),
            pytest_r,
            gc.StepResult("sanitizer", "pass", seconds=60, details={"error_count": 0, "complete": True}),
            bench,
            gc.not_run("bench-synthesis", "the 570 s budget was spent")]


def test_summary_markdown_and_json(tmp_path):
    results = _results(tmp_path)
    gc.write_summary(tmp_path, ENV, results, finished=True)
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("# gpu-check: FAIL (3 of 7 steps) on NVIDIA H100 80GB HBM3")
    for text in ("driver 580.65.06 (CUDA 13.0)", "torch 2.11.0+cu130 (CUDA 13.0), Python 3.12.3", "commit `abc123`",
                 "| build | pass | 95 | CUDA 13.0 kernels for 9.0 |", "| ctest | TIMEOUT | 120 |",
                 "| pytest-cuda | FAIL | 80 | 850 passed, 1 failed, 1 errors, 1 skipped | logs/pytest-cuda.log |",
                 "| bench-synthesis | NOT RUN |", "- ctest: timed out after 120 s",
                 "- bench-synthesis: the 570 s budget was spent", "## Skipped tests",
                 "MNIST / Fashion-MNIST files not found", "- bench-soft_target_losses: benches/losses_cuda_quick.md",
                 "  - rows: exml_fast vs reference x3.00"):
        assert text in md, text
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is False and s["finished"] is True
    assert s["failed_steps"] == ["ctest", "pytest-cuda", "bench-synthesis"]
    assert s["totals"]["pytest"]["passed"] == 850 and s["totals"]["pytest"]["failed"] == 1
    assert s["totals"]["sanitizer_errors"] == 0
    assert [st["status"] for st in s["steps"]] == ["pass", "pass", "timeout", "fail", "pass", "pass", "not run"]
    assert s["env"]["device_name"] == "NVIDIA H100 80GB HBM3"


def test_summary_pass_and_in_progress(tmp_path):
    ok = [gc.StepResult("gpu", "pass"), gc.StepResult("build", "pass")]
    gc.write_summary(tmp_path, ENV, ok, finished=False)
    assert "# gpu-check: IN PROGRESS" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is False  # not finished: not a pass yet
    gc.write_summary(tmp_path, ENV, ok, finished=True)
    assert (tmp_path / "summary.md").read_text().startswith("# gpu-check: PASS on NVIDIA H100")
    assert json.loads((tmp_path / "summary.json").read_text())["ok"] is True
    assert not list(tmp_path.glob("*.tmp"))


# -- the whole run against fake steps ---------------------------------------------------------------

FAKE_LOGS = {
    "build": "[exml_fast build] CUDA kernels: ...\nBUILD_INFO " + json.dumps(
        {"loaded": True, "cuda": True, "cuda_version": "13.0", "cuda_archs": "9.0"}) + "\n",
    "cmake-build": "[120/120] Linking CXX executable exml_fast_cpp_tests\n",
    "ctest": "1/2 Test  #1: registration ....   Passed    2.01 sec\n"
             "2/2 Test  #2: cuda_nchw_fp32 ..   Passed    2.01 sec\n100% tests passed, 0 tests failed out of 2\n",
    "pytest-cuda": "862 passed, 1404 deselected in 95.00s (0:01:35)\n",
    "sanitizer": "========= COMPUTE-SANITIZER\n230 passed in 60.0s\n========= ERROR SUMMARY: 0 errors\n",
    # as an H100 printed it: racecheck ends with its own summary, and no ERROR SUMMARY line
    "racecheck": "========= COMPUTE-SANITIZER\n120 passed in 80.0s\n========= RACECHECK SUMMARY: 0 hazards displayed "
                 "(0 errors, 0 warnings)\n",
}


class FakeRunning:
    """Stands for a step's process: writes a canned log (and a bench record) and "exits"."""

    def __init__(self, name, cmd, *, log, timeout_s, env=None, cwd=None, calls=None, rc=0):
        calls.append((name, cmd, env, timeout_s))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(FAKE_LOGS.get(name, ""))
        if name.startswith("bench-"):
            out = Path(cmd[cmd.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            stem = next(b[3] for b in gc.BENCHES if f"bench-{b[0]}" == name)
            (out / f"{stem}.json").write_text(json.dumps(
                {"rows": [{"variant": "exml_fast", "speedup_vs_reference": 4.0}]}))
        self.result = gc.StepResult(name, "pass" if rc == 0 else "fail", seconds=1.0, rc=rc, timeout_s=timeout_s,
                                    log=str(log))

    def wait(self):
        return self.result


def _fake_gpu(monkeypatch, tmp_path, fail=()):
    calls = []
    env = {**ENV, "device_count": 1, "probe_s": 1.0, "cmake_prefix_path": "/torch/share/cmake",
           "missing_modules": []}
    monkeypatch.setattr(gc, "machine_facts", lambda python, budget_s: (dict(env), None))
    monkeypatch.setattr(gc, "start_step", lambda name, cmd, **kw: FakeRunning(
        name, cmd, calls=calls, rc=1 if name in fail else 0, **kw))
    monkeypatch.setattr(gc, "CMAKE_DIR", tmp_path / "build-cmake-cuda")
    return calls


def test_main_runs_every_step_in_order_and_writes_the_summary(monkeypatch, tmp_path):
    calls = _fake_gpu(monkeypatch, tmp_path)
    out = tmp_path / "gpu"
    assert gc.main(["--out", str(out), "--python", "/usr/bin/python3"]) == 0
    names = [c[0] for c in calls]
    assert names == ["cmake-build", "build", "ctest", "pytest-cuda", "sanitizer", "racecheck",
                     *(f"bench-{b[0]}" for b in gc.BENCHES)]
    by = {c[0]: c for c in calls}
    # Built for the visible GPU's arch with every core, the CUDA kernels forced.
    assert by["build"][2]["TORCH_CUDA_ARCH_LIST"] == "9.0" and by["build"][2]["MAX_JOBS"] == "16"
    assert by["build"][2]["EXML_FAST_FORCE_CUDA"] == "1"
    assert "pip install -v --no-build-isolation --no-deps -e ." in by["build"][1][-1]
    assert "-DEXML_FAST_CUDA=ON" in by["cmake-build"][1][-1]
    assert by["pytest-cuda"][1][:6] == ["/usr/bin/python3", "-m", "pytest", "python_tests", "-m", "cuda"]
    assert "--tool" in by["sanitizer"][1] and by["sanitizer"][2]["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    assert by["racecheck"][1][by["racecheck"][1].index("--tool") + 1] == "racecheck"
    assert [a for a in by["racecheck"][1] if a.startswith("python_tests/")] == [
        f"python_tests/{f}" for f in gc.RACECHECK_FILES]
    for name, *_ in gc.BENCHES:
        cmd = by[f"bench-{name}"][1]
        assert cmd[cmd.index("--device") + 1] == "cuda" and "--no-compile" in cmd
    assert all(c[3] <= 570 for c in calls)
    s = json.loads((out / "summary.json").read_text())
    assert s["ok"] and s["finished"] and s["failed_steps"] == []
    assert s["totals"]["pytest"]["passed"] == 862 and s["totals"]["ctest"]["passed"] == 2
    assert s["totals"]["sanitizer_errors"] == 0 and s["totals"]["racecheck_errors"] == 0
    md = (out / "summary.md").read_text()
    assert md.startswith("# gpu-check: PASS") and "| bench-synthesis | pass |" in md
    assert "- bench-bn_stats: benches/bn_stats_cuda.md" in md
    # the correctness run: its benchmarks are smoke runs, and the summary says so (and the command)
    assert "## Benchmarks: smoke runs, not performance figures" in md and "make gpu-perf" in md
    assert s["benchmarks"].startswith("smoke runs") and "- command: `python3 benches/gpu_check.py --out" in md


def test_tar_packs_the_whole_output_at_the_end(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, tmp_path, fail={"ctest"})
    out, tar = tmp_path / "gpu", tmp_path / "back" / "gpu.tgz"
    assert gc.main(["--out", str(out), "--tar", str(tar)]) == gc.EXIT_FAILED  # packed after a failure too
    with tarfile.open(tar) as tf:
        names = set(tf.getnames())
    assert {"gpu/summary.md", "gpu/summary.json", "gpu/logs/ctest.log", "gpu/benches/bn_stats_cuda.json"} <= names
    with tarfile.open(tar) as tf:  # the final summary, not an in-progress one
        assert json.loads(tf.extractfile("gpu/summary.json").read())["finished"] is True


def test_tar_after_an_interruption(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, tmp_path)

    def wait(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(FakeRunning, "wait", wait)
    assert gc.main(["--out", str(tmp_path / "o"), "--tar", str(tmp_path / "o.tgz")]) == 130
    with tarfile.open(tmp_path / "o.tgz") as tf:
        assert "o/summary.json" in tf.getnames()


def test_pack_output_of_a_missing_folder_says_why(tmp_path):
    assert "does not exist" in gc.pack_output(tmp_path / "nothing", tmp_path / "x.tgz")
    assert not (tmp_path / "x.tgz").exists()


def test_main_keeps_going_after_a_failure_and_exits_1(monkeypatch, tmp_path):
    calls = _fake_gpu(monkeypatch, tmp_path, fail={"build", "cmake-build"})
    out = tmp_path / "gpu"
    assert gc.main(["--out", str(out)]) == gc.EXIT_FAILED
    names = [c[0] for c in calls]
    assert "ctest" not in names  # nothing to run without its build ...
    assert names[-1] == "bench-synthesis" and "pytest-cuda" in names  # ... but every other step ran
    s = json.loads((out / "summary.json").read_text())
    assert s["failed_steps"] == ["build", "cmake-build", "ctest"]
    assert s["steps"][3]["status"] == "not run" and s["steps"][3]["notes"] == ["cmake-build failed"]


def test_main_interrupted_stops_and_keeps_the_summary(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, tmp_path)
    real = FakeRunning.wait

    def wait(self):
        if self.result.name == "sanitizer":
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(FakeRunning, "wait", wait)
    assert gc.main(["--out", str(tmp_path / "o")]) == 130
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert [st["name"] for st in s["steps"]][-2:] == ["pytest-cuda", "interrupted"] and not s["ok"]


def test_steps_option_runs_a_subset_and_rejects_unknown_names(monkeypatch, tmp_path, capsys):
    calls = _fake_gpu(monkeypatch, tmp_path)
    assert gc.main(["--out", str(tmp_path / "o"), "--steps", "pytest-cuda,bench-soft_target_losses"]) == 0
    assert [c[0] for c in calls] == ["pytest-cuda", "bench-soft_target_losses"]
    with pytest.raises(SystemExit):
        gc.main(["--steps", "pytest"])
    assert "unknown pytest" in capsys.readouterr().err


# -- without a GPU ----------------------------------------------------------------------------------


def test_main_without_gpu_builds_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gc, "machine_facts", lambda python, budget_s: ({}, "torch 2.11.0 sees no CUDA device"))

    def refuse(*args, **kwargs):
        raise AssertionError("a step was started on a machine without a GPU")

    monkeypatch.setattr(gc, "start_step", refuse)
    assert gc.main(["--out", str(tmp_path / "out")]) == gc.EXIT_NO_GPU
    assert NO_GPU_MESSAGE in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_script_without_gpu_exits_2_quickly(tmp_path):
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "benches" / "gpu_check.py"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=NO_GPU_ENV, cwd=ROOT, timeout=120, check=False)
    assert r.returncode == gc.EXIT_NO_GPU, r.stderr
    assert NO_GPU_MESSAGE in r.stderr and "Nothing was built" in r.stderr
    assert "[gpu-check] build" not in r.stdout and not (tmp_path / "out").exists()
    assert time.monotonic() - t0 < 60


def test_make_gpu_check_without_gpu_fails(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make")
    r = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_OUT={tmp_path / 'out'}"],
                       capture_output=True, text=True, env=NO_GPU_ENV, cwd=ROOT, timeout=120, check=False)
    assert r.returncode != 0 and NO_GPU_MESSAGE in r.stderr
    assert not (tmp_path / "out").exists()


# -- every CUDA test is selected by `pytest -m cuda` ------------------------------------------------


def unmarked_cuda_tests(src: str) -> list[str]:
    """The test functions of a test module's source that skip without a GPU (a skipif on CUDA,
    or a torch.cuda.is_available() call) but lack the `cuda` marker, which `pytest -m cuda`
    (and so gpu-check) selects. Tests parametrized over _util.DEVICES get it from the "cuda" param."""
    tree = ast.parse(src)
    module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                        and "mark.cuda" in (ast.get_source_segment(src, n) or "") for n in tree.body)
    missing = []
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        decorators = [ast.get_source_segment(src, d) or "" for d in fn.decorator_list]
        gated = any("skipif" in d and "cuda" in d.lower() for d in decorators)
        gated |= any(isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.cuda.is_available"
                     for n in ast.walk(fn))
        if gated and not module_marked and "pytest.mark.cuda" not in decorators:
            missing.append(fn.name)
    return missing


def test_unmarked_cuda_tests_finds_them():
    src = """
import pytest, torch
CUDA = torch.cuda.is_available()

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_a(): ...

def test_b():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_c(): ...

@pytest.mark.parametrize("device", DEVICES)
def test_d(device): ...
"""
    assert unmarked_cuda_tests(src) == ["test_a", "test_b"]
    assert unmarked_cuda_tests("import pytest\npytestmark = [pytest.mark.cuda]\n" + src) == []


def test_every_cuda_test_carries_the_cuda_marker():
    """gpu-check runs `pytest -m cuda`: a CUDA test without the marker would never run there."""
    missing = [f"{path.name}::{name}" for path in sorted((ROOT / "python_tests").rglob("test_*.py"))
               for name in unmarked_cuda_tests(path.read_text())]
    assert not missing, f"CUDA tests without @pytest.mark.cuda: {missing}"


# -- make gpu-repro: one GPU-sized reproduction run, cut at GPU_REPRO_S and resumed ---------------------------

def _make(*args):
    if shutil.which("make") is None:
        pytest.skip("make not found")
    return subprocess.run(["make", "-s", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("method,command", [
    ("dafl", "reproduce dfkd-mnist --budget paper --recipe public --methods dafl --device cuda"),
    ("dfad", "reproduce dfkd-mnist --budget paper --recipe public --methods dfad --device cuda"),
    ("skd", "reproduce dfkd-mnist --budget paper --methods skd --device cuda"),
    ("mi-ed", "reproduce exml-mnist --budget paper --runs 1 --scenarios split_mnist --strategies mi-ed "
              "--device cuda"),
    ("skd-cil", "reproduce cil-mnist --budget paper --strategies skd --device cuda --out runs/gpu-repro/cil-mnist "
                '--results "benches/results/gpu/repro" --seeds $s --progress'),
])
def test_gpu_repro_runs_the_asked_reproduction_under_a_time_limit(method, command):
    out = _make("-n", "gpu-repro", f"METHOD={method}", "GPU_REPRO_S=17").stdout
    flat = " ".join(out.replace("\\\n", " ").split())
    assert "timeout --signal=INT 17" in flat and " ".join(command.split()) in flat
    assert "run the same command again to resume" in flat


_FAKE_PYTHON = """#!/bin/bash
# stands in for the interpreter: notes its arguments, and a --seeds run of seed $FAIL_SEED stops as at the limit
echo "$*" >> "$FAKE_CALLS"
echo "args: $*"
prev=""
for a in "$@"; do [ "$prev" = "--seeds" ] && [ "$a" = "${FAIL_SEED:-}" ] && exit 124; prev="$a"; done
exit "${FAKE_RC:-0}"
"""


@pytest.fixture
def fake_python(tmp_path):
    """The stand-in interpreter, written once per test (the targets that run it need make)."""
    if shutil.which("make") is None:
        pytest.skip("make not found")
    fake = tmp_path / "python"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    return fake


def test_gpu_repro_says_how_to_resume_a_run_stopped_at_its_time_limit(tmp_path, fake_python):
    fake = fake_python
    env = {**os.environ, "FAKE_CALLS": str(tmp_path / "calls.txt"), "FAKE_RC": "124"}
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "gpu-repro", "METHOD=dfad", f"PYTHON={fake}",
                           f"GPU_REPRO_OUT={tmp_path / 'repro'}", "GPU_REPRO_S=30"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode != 0 and "--methods dfad --device cuda" in (tmp_path / "calls.txt").read_text()
    assert "gpu-repro: stopped at 30 s; run the same command again to resume" in done.stderr


@pytest.mark.parametrize("fail_seed", [None, "3"])
def test_gpu_repro_runs_skd_cils_seeds_side_by_side_then_the_table_once_all_have_finished(tmp_path, fake_python,
                                                                                          fail_seed):
    """The five seeds run at once (each a --seeds process into the ledger, with a log of its own); the table
    (--runs 5, read from the ledger) is made only when every seed finished, and a seed stopped at the time limit
    stops the call with the resume hint."""
    fake = fake_python
    calls, out = tmp_path / "calls.txt", tmp_path / "repro"
    env = {**os.environ, "FAKE_CALLS": str(calls), "EXML_FAST_DATA": str(tmp_path)}
    if fail_seed is not None:
        env["FAIL_SEED"] = fail_seed
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "gpu-repro", "METHOD=skd-cil", f"PYTHON={fake}",
                           f"GPU_REPRO_OUT={out}", "GPU_REPRO_S=30"], capture_output=True, text=True, timeout=60,
                          env=env)
    lines = calls.read_text().splitlines()
    seeds = sorted(line.split("--seeds ")[1].split()[0] for line in lines if "--seeds" in line)
    assert seeds == ["0", "1", "2", "3", "4"]
    for s in seeds:  # each seed's log holds its command and its output; the call prints each log's tail
        log = (out / f"skd_cil_seed{s}.log").read_text()
        assert "cil-mnist --budget paper --strategies skd --device cuda" in log and "args: -m exml_fast" in log
        assert f"--seeds {s} --progress" in log
        assert f"== seed {s} ({out}/skd_cil_seed{s}.log):" in done.stdout
    tables = [line for line in lines if "--runs 5" in line]
    if fail_seed is None:
        assert done.returncode == 0, done.stderr
        assert tables == [lines[-1]] and "cil-mnist --budget paper --strategies skd --device cuda" in tables[0]
    else:
        assert done.returncode != 0 and tables == []
        assert "gpu-repro: stopped at 30 s; run the same command again to resume" in done.stderr


def test_gpu_repro_refuses_an_unknown_method():
    done = _make("gpu-repro", "METHOD=vgg")
    assert done.returncode != 0
    assert "gpu-repro: METHOD must be one of dafl, dfad, skd, mi-ed, skd-cil; got 'vgg'" in done.stderr
