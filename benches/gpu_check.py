"""`make gpu-check`: everything a lent GPU machine should check, in one command, in under 10 minutes.

Every CUDA kernel of exml_fast compiles in CI, but runs only where a GPU is lent,
and then briefly. This script does the whole check and writes it down:

  gpu          torch (of the Python running this script) sees a CUDA device; if not, it
               says so and exits 2 before building anything
  build        pip install --no-build-isolation --no-deps -e . for the visible GPU's arch
               (TORCH_CUDA_ARCH_LIST from torch.cuda.get_device_capability()), MAX_JOBS =
               the cores, EXML_FAST_FORCE_CUDA=1; then exml_fast must load with CUDA kernels
  cmake-build  the CMake build of the C++ tests with -DEXML_FAST_CUDA=ON (beside `build`)
  ctest        the C++ suite, its CUDA cases included (none may skip)
  pytest-cuda  python -m pytest python_tests -m cuda: every CUDA test
  sanitizer    compute-sanitizer --tool memcheck over a few fast CUDA tests of each op
  racecheck    compute-sanitizer --tool racecheck (shared-memory hazards) over the tests of the ops whose
               kernels use shared memory, beside memcheck
  bench-*      SMOKE runs of the op benchmarks and the synthesis benchmark on the GPU: short
               settings, without torch.compile, to show that they run; their figures are not
               performance figures (`make gpu-perf`, benches/gpu_perf.py, measures those)

A failing step does not stop the next ones; each has a timeout, and all of them share
a budget (--budget-s, default 570 s), so the whole check ends within 10 minutes: a step
that times out, or that the budget leaves no time for, counts as failed. The summary is
rewritten after every step, so a machine taken back mid-run still leaves what was done.

Writes to --out (default $GPU_CHECK_OUT, else benches/results/gpu/):
  summary.md, summary.json   device, driver, versions, commit; each step's status,
                             seconds, test counts, sanitizer errors, bench figures
  logs/<step>.log            the full output of each step (+ logs/pytest-cuda.xml)
  benches/                   the recorded benchmark runs (<bench>_cuda*.{json,md})
--tar PATH packs the whole folder into one .tgz at the end, whatever happened (a machine that
returns only a few files of its output returns that one).

Usage (from the repository root, with the GPU machine's own python and torch):
    python3 benches/gpu_check.py [--out DIR] [--budget-s 570] [--steps build,pytest-cuda,...] [--tar PATH]
Exit status: 0 every step passed, 1 a step failed or timed out, 2 no usable GPU,
130 interrupted (SIGINT or SIGTERM: the running steps are stopped, the summary kept).

Standard library only: torch is asked in a subprocess, so this script can say what is
missing on a machine where torch, or the GPU, is not there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benches" / "results" / "gpu"
CMAKE_DIR = ROOT / "build-cmake-cuda"
EXIT_FAILED, EXIT_NO_GPU = 1, 2

#: Seconds each step may take at most (the shared budget may leave less). Expected on an
#: H100 with 16 cores: build and cmake-build (side by side) 1-3 min, ctest 10-20 s,
#: pytest-cuda 1-2 min, sanitizer about 1 min, each benchmark 10-40 s.
TIMEOUTS = {
    "gpu": 60, "build": 300, "cmake-build": 300, "ctest": 120, "pytest-cuda": 300,
    "sanitizer": 180, "racecheck": 180, "bench": 90, "bench-synthesis": 150,
}
#: A step is not started with less than this many seconds of budget left.
MIN_STEP_S = 10.0
#: Python modules the steps need besides torch (ninja: the parallel extension build).
NEEDED_MODULES = ("pytest", "numpy", "tqdm", "safetensors", "yaml", "matplotlib", "ninja")

#: The memcheck subset: a few fast CUDA tests of each op (forward/backward against the
#: reference in fp32, the CUDA-vs-CPU comparisons, the Philox known answers). The test
#: that turns on torch's sync debug mode is left out: without the caching allocator
#: (see `start_sanitizer`) every free synchronises.
SANITIZER_FILES = ("ops/test_bn_stats.py", "ops/test_bn_match_loss.py", "ops/test_image_priors.py",
                   "ops/test_soft_target_losses.py", "ops/test_ed_loss.py", "ops/test_dirichlet.py",
                   "ops/test_augment.py", "ops/test_window_pool.py", "ops/test_tanh.py")
#: racecheck looks for hazards on shared memory only: the tests of the ops whose CUDA kernels use it
#: (python_tests/test_gpu_check.py checks this list against csrc/cuda/*.cu).
RACECHECK_FILES = ("ops/test_bn_stats.py", "ops/test_bn_match_loss.py", "ops/test_image_priors.py",
                   "ops/test_soft_target_losses.py", "ops/test_ed_loss.py")
SANITIZER_K = ("((matches_reference and float32) or cuda_matches_cpu or philox or dirichlet_rows_sum_to_one)"
               " and not generator_device")

#: (name, script, arguments, recorded stem): the short GPU runs of the benchmarks.
BENCHES = (
    ("bn_stats", "bench_bn_stats.py",
     ["--batches", "64", "--min-run-time", "0.2", "--step-run-time", "1"], "bn_stats_cuda"),
    ("image_priors", "bench_image_priors.py", ["--min-run-time", "0.2"], "image_priors_cuda"),
    ("soft_target_losses", "bench_soft_target_losses.py", ["--quick"], "soft_target_losses_cuda_quick"),
    ("dirichlet", "bench_dirichlet.py", ["--quick"], "dirichlet_cuda_quick"),
    ("augment", "bench_augment.py", ["--quick"], "augment_cuda_float32_quick"),
    ("window_pool", "bench_window_pool.py", ["--quick"], "window_pool_cuda_quick"),
    ("tanh", "bench_tanh.py", ["--quick"], "tanh_cuda_quick"),
    ("upsample_conv", "bench_upsample_conv.py", ["--quick"], "upsample_conv_cuda_quick"),
    ("synthesis", "bench_synthesis.py", ["--quick"], "synthesis_cuda_quick"),
)
STEPS = ("build", "cmake-build", "ctest", "pytest-cuda", "sanitizer", "racecheck") + tuple(
    f"bench-{b[0]}" for b in BENCHES)

# Skip reasons that mean the GPU or the compiled library is missing: on a GPU machine
# a CUDA test skipped for one of them is a failure, not a skip.
BAD_SKIP = re.compile(r"no CUDA device|needs a CUDA device|not built|compiled exml_fast", re.IGNORECASE)


# -- step results and the runner -----------------------------------------------------------------


@dataclasses.dataclass
class StepResult:
    """What one step did. status: "pass", "fail", "timeout" or "not run" (only "pass" is good)."""

    name: str
    status: str
    seconds: float = 0.0
    rc: int | None = None
    timeout_s: float | None = None
    log: str | None = None
    summary: str = ""
    details: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def fail(self, note: str) -> None:
        """Mark a step that ran to the end as failed, saying why."""
        if self.status == "pass":
            self.status = "fail"
        self.notes.append(note)


def not_run(name: str, why: str) -> StepResult:
    return StepResult(name, "not run", notes=[why])


class Budget:
    """The seconds left of the whole check."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self.clock()

    def timeout_for(self, step_timeout: float, min_s: float = MIN_STEP_S) -> float | None:
        """The step's timeout cut to the budget; None when less than ``min_s`` seconds are left to start it."""
        left = self.left()
        return None if left < min_s else min(step_timeout, left)


def _kill_group(proc: subprocess.Popen) -> None:
    """End the step's process group (it runs in a session of its own): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


#: The steps running now: stopped when the check itself is interrupted (they run in sessions
#: of their own, so a Ctrl-C or SIGTERM would not reach them).
_LIVE: set = set()


def stop_running_steps() -> None:
    for running in list(_LIVE):
        if running.proc is not None:
            _kill_group(running.proc)


class Running:
    """A step's command running in the background, its output going to its log."""

    def __init__(self, name: str, cmd: list[str], *, log: Path, timeout_s: float, env: dict | None = None,
                 cwd: Path = ROOT):
        self.name, self.cmd, self.log, self.timeout_s = name, cmd, log, timeout_s
        log.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(log, "w")  # noqa: SIM115 - closed in wait()
        overrides = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted((env or {}).items()))
        self._file.write(f"$ {overrides + ' ' if overrides else ''}{shlex.join(cmd)}\n"
                         f"# started {dt.datetime.now().isoformat(timespec='seconds')}, timeout {timeout_s:.0f} s\n\n")
        self._file.flush()
        self.t0 = time.monotonic()
        try:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=self._file,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        except OSError as e:
            self.proc = None
            self._file.write(f"cannot start {cmd[0]}: {e}\n")
        else:
            _LIVE.add(self)

    def wait(self) -> StepResult:
        """Wait for the end (or the timeout, counted from the start) and return the result."""
        status, rc = "fail", None
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=max(0.0, self.timeout_s - (time.monotonic() - self.t0)))
                status = "pass" if rc == 0 else "fail"
            except subprocess.TimeoutExpired:
                _kill_group(self.proc)
                status, rc = "timeout", self.proc.returncode
        _LIVE.discard(self)
        seconds = time.monotonic() - self.t0
        self._file.write(f"\n# {status}, exit code {rc}, {seconds:.1f} s\n")
        self._file.close()
        r = StepResult(self.name, status, seconds=seconds, rc=rc, timeout_s=self.timeout_s, log=str(self.log))
        if status == "timeout":
            r.notes.append(f"timed out after {self.timeout_s:.0f} s")
        elif self.proc is None:
            r.notes.append(f"could not start {self.cmd[0]}")
        elif rc != 0:
            r.notes.append(f"exit code {rc}")
        return r


def start_step(name: str, cmd: list[str], *, log: Path, timeout_s: float, env: dict | None = None,
               cwd: Path = ROOT) -> Running:
    """Start `cmd` in its own process group, stdout and stderr to `log`."""
    return Running(name, cmd, log=log, timeout_s=timeout_s, env=env, cwd=cwd)


def run_step(name: str, cmd: list[str], *, log: Path, timeout_s: float, env: dict | None = None,
             cwd: Path = ROOT) -> StepResult:
    """Run `cmd` to its end or its timeout; a timeout kills its whole process group."""
    return start_step(name, cmd, log=log, timeout_s=timeout_s, env=env, cwd=cwd).wait()


def read_log(r: StepResult) -> str:
    return Path(r.log).read_text(errors="replace") if r.log and Path(r.log).exists() else ""


# -- parsers -------------------------------------------------------------------------------------------

_PYTEST_WORDS = {"passed": "passed", "failed": "failed", "skipped": "skipped", "deselected": "deselected",
                 "xfailed": "xfailed", "xpassed": "xpassed", "error": "errors", "errors": "errors",
                 "warning": "warnings", "warnings": "warnings"}
_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?)\b")
_PYTEST_FINAL = re.compile(r"^=*\s*(?:no tests ran|\d+ \w+.*) in (\d+(?:\.\d+)?)s\b.*?=*\s*$")


def parse_pytest_summary(text: str) -> dict | None:
    """Counts from pytest's final line ("== 3 failed, 850 passed, 2 skipped in 81.20s =="), or None.

    Returns passed, failed, skipped, errors, deselected, xfailed, xpassed, warnings (0 when
    absent) and seconds; also `failed_tests` (the FAILED/ERROR node ids of the short summary)
    and `skips` (its SKIPPED lines: "[count] file:line: reason").
    """
    final = None
    for line in text.splitlines():
        m = _PYTEST_FINAL.match(line.strip())
        if m:
            final = (line, float(m.group(1)))
    if final is None:
        return None
    counts = dict.fromkeys(sorted(set(_PYTEST_WORDS.values())), 0)
    for n, word in _PYTEST_COUNT.findall(final[0]):
        counts[_PYTEST_WORDS[word]] += int(n)
    counts["seconds"] = final[1]
    counts["failed_tests"] = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.MULTILINE)
    counts["skips"] = re.findall(r"^SKIPPED (\[\d+\] .*)$", text, re.MULTILINE)
    return counts


_CTEST_LINE = re.compile(r"Test\s+#\d+:\s+(\S+)\s+\.*\s*(.*)$")


def parse_ctest(text: str) -> dict:
    """Per-case outcomes from ctest's output: passed, failed, skipped and the names of the latter two."""
    out = {"passed": 0, "failed": 0, "skipped": 0, "passed_tests": [], "failed_tests": [], "skipped_tests": []}
    for line in text.splitlines():
        m = _CTEST_LINE.search(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        kind = "passed" if rest.startswith("Passed") else (
            "skipped" if ("Skipped" in rest or "Not Run" in rest) else "failed")
        out[kind] += 1
        out[f"{kind}_tests"].append(name)
    return out


_SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+) error")
#: racecheck ends with its own line instead: "RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)".
_RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s*\d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_SANITIZER_ERROR = re.compile(
    r"^========= (?!COMPUTE-SANITIZER|ERROR SUMMARY|RACECHECK SUMMARY|Target application|\s)(.+)$")


def parse_sanitizer(text: str) -> dict:
    """compute-sanitizer's error count: its ERROR SUMMARY (racecheck: the errors of its RACECHECK
    SUMMARY, its warnings in `warning_count`), else (a run cut short) the error headers printed so
    far, with `complete` False. `errors` holds the first 20 headers."""
    headers = [m.group(1) for m in map(_SANITIZER_ERROR.match, text.splitlines()) if m]
    found = _SANITIZER_SUMMARY.findall(text)
    if found:
        return {"error_count": int(found[-1]), "complete": True, "errors": headers[:20]}
    race = _RACECHECK_SUMMARY.findall(text)
    if race:
        return {"error_count": int(race[-1][0]), "warning_count": int(race[-1][1]), "complete": True,
                "errors": headers[:20]}
    return {"error_count": len(headers), "complete": False, "errors": headers[:20]}


def bench_headlines(rec: dict) -> list[str]:
    """A few lines of figures from a recorded benchmark run (its JSON)."""
    lines = []
    for net in rec.get("results", []):  # bench_synthesis
        lines += synthesis_headlines(net)
    for key, rows in rec.items():
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
            continue
        ups = [r["speedup_vs_reference"] for r in rows
               if r.get("variant") == "exml_fast" and "speedup_vs_reference" in r]
        ups += [r["exml_fast_speedup"] for r in rows if r.get("variant") == "reference" and "exml_fast_speedup" in r]
        if ups:
            lines.append(f"{key}: exml_fast vs reference x{statistics.median(ups):.2f} median "
                         f"(x{min(ups):.2f} to x{max(ups):.2f}) over {len(ups)} cases")
        over = {r["variant"]: r for r in rows if "overhead_pct_vs_no_bn" in r}
        if over:
            lines.append(f"{key}: the BN loss adds " + ", ".join(
                f"{r['overhead_pct_vs_no_bn']:.1f} %" + (f" ({r['bn_share_pct']:.0f} % of the step)"
                                                         if "bn_share_pct" in r else "") + f" ({k})"
                for k, r in over.items() if k != "no BN loss"))
    lines += big_row_headlines(rec)
    return lines


def synthesis_headlines(net: dict) -> list[str]:
    """bench_synthesis's figures for one net: images/s, each row against its peer of the same precision
    (the fp32 peer where the record has no pairs), the BN term's share, the time-to-quality race."""
    lines = []
    head = f"{net['net']} batch {net['batch']}"
    for r in net.get("timing", []):
        if "failed" in r:
            lines.append(f"{net['net']} {r['variant']}: FAILED ({r['failed'][:120]})")
        elif r.get("peer"):
            lines.append(f"{head}, {r['variant']}: {r['images_per_s']:.0f} images/s, x{r['speedup_vs_peer']:.2f} "
                         f"[{r['speedup_vs_peer_min']:.2f}-{r['speedup_vs_peer_max']:.2f}] vs {r['peer']}")
        else:
            lines.append(f"{head}, {r['variant']}: {r['images_per_s']:.0f} images/s, x{r['speedup']:.2f} "
                         "vs the frozen public loop")
    for b in net.get("bn_share") or []:
        lines.append(f"{head}: the BN term is {b['share_pct']:.0f} % of {b['variant']}'s step "
                     f"(adds {b['adds_pct']:.0f} % [{b['adds_pct_min']:.0f}-{b['adds_pct_max']:.0f}])")
    for ch in net.get("check", []):
        if not ch.get("within_noise", True):  # information: a short run's losses are noisy
            lines.append(f"{net['net']} {ch['variant']}: final loss differs from the public loop's by "
                         f"{ch['diff']:.4f} (tolerance {ch['tolerance']:.4f})")
    q = net.get("ttq")
    if q:
        if q.get("peer_reach_step") is None:
            lines.append(f"{head} time to quality: no bar (the peer's batch after {q['peer_steps']} steps is "
                         f"at {q['peer_agreement']:.0%} agreement)")
        else:
            lines += _race_lines(head, "public frozen", q["peer_reach_step"], q["peer_reach_s"], q["engine"])
            best = q.get("best")
            if best:
                lines += _race_lines(head, best["peer"], best["peer_reach_step"], best["peer_reach_s"],
                                     best["engine"])
    return lines


def _race_lines(head: str, peer: str, steps, seconds, engine: list[dict]) -> list[str]:
    lines = [f"{head} time to quality: {peer} {steps} steps, {seconds:.1f} s" if steps is not None else
             f"{head} time to quality: {peer} did not reach the bar"]
    for r in engine:
        if r["reached"]:
            vs = f"x{r['speedup']:.2f} vs {peer}" if r.get("speedup") is not None else "no peer figure"
            lines.append(f"{head} time to quality: {r['variant']} {r['steps']} steps, {r['wall_s']:.1f} s, {vs}")
        else:
            lines.append(f"{head} time to quality: {r['variant']} not within {r['probes'][-1]['steps']} steps")
    return lines


#: The keys of an op benchmark's row that say which case it is (the rest are measurements).
_CASE_KEYS = ("op", "shape", "batch", "classes", "B", "K", "H", "beta", "layout", "blur_kernel_size", "max_shift",
              "pad_crop", "dtype", "mode", "direction", "case")


def big_row_headlines(rec: dict, min_mb: float = 100.0) -> list[str]:
    """The op rows that move >= ``min_mb`` MB per call: exml_fast's GB/s against the copy bandwidth and its
    time beside the reference's and torch.compile(reference)'s in the same case."""
    rows = []
    for value in rec.values():
        if not isinstance(value, list):
            continue
        for item in value:
            if isinstance(item, dict) and isinstance(item.get("rows"), list):  # nested per case (tanh, window_pool)
                case = {k: v for k, v in item.items() if k != "rows"}
                rows += [{**case, **r} for r in item["rows"]]
            elif isinstance(item, dict):
                rows.append(item)
    lines = []
    for r in rows:
        if r.get("variant") != "exml_fast" or (r.get("MB") or 0) < min_mb:
            continue
        case = {k: r[k] for k in _CASE_KEYS if k in r}
        same = {o["variant"]: o for o in rows if {k: o.get(k) for k in case} == case and "ms" in o}
        gbps = r.get("GB/s", r.get("GBps"))
        pct = r.get("pct_copy_bw")
        text = ", ".join(f"{k}={v}" for k, v in case.items())
        text += f": {r['MB']:.0f} MB, exml_fast {r['ms']:.3f} ms"
        if gbps is not None:
            text += f" = {gbps:.0f} GB/s" + (f" ({pct:.0f} % of copy)" if pct is not None else "")
        for peer in ("reference", "compile(reference)"):
            if peer in same:
                text += f"; {peer} {same[peer]['ms']:.3f} ms (x{same[peer]['ms'] / r['ms']:.2f})"
        lines.append(text)
    return lines


# -- the machine ------------------------------------------------------------------------------------

_PROBE = r"""
import importlib.util, json, os, platform, sys
info = {"python": platform.python_version(), "executable": sys.executable,
        "missing_modules": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None],
        "xdist": importlib.util.find_spec("xdist") is not None}
try:
    import torch
except Exception as e:
    info["torch_error"] = f"{type(e).__name__}: {e}"
else:
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                torch_site=os.path.dirname(os.path.dirname(torch.__file__)),
                cmake_prefix_path=torch.utils.cmake_prefix_path,
                cuda_available=torch.cuda.is_available(), device_count=0)
    if info["cuda_available"]:
        p = torch.cuda.get_device_properties(0)
        info.update(device_count=torch.cuda.device_count(), device_name=p.name,
                    capability=list(torch.cuda.get_device_capability(0)), memory_gib=p.total_memory / 2**30)
print(json.dumps(info))
"""


def probe_torch(python: str) -> dict:
    """What `python`'s torch sees (versions, CUDA device 0), asked in a subprocess."""
    try:
        r = subprocess.run([python, "-c", _PROBE, *NEEDED_MODULES], capture_output=True, text=True,
                           check=False, timeout=TIMEOUTS["gpu"], cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"torch_error": f"{python} could not be run: {e}"}
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"torch_error": f"{python} failed: {(r.stderr or r.stdout).strip()[-500:]}"}
    return json.loads(lines[-1])


def probe_nvidia_smi() -> dict:
    """The GPUs nvidia-smi lists (name, driver, memory) and the driver's CUDA version; {} without nvidia-smi."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    out: dict = {"path": smi, "gpus": []}
    try:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, check=False, timeout=30)
        out["gpus"] = [[f.strip() for f in line.split(",")] for line in q.stdout.splitlines() if line.strip()]
        head = subprocess.run([smi], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        out["error"] = str(e)
        return out
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    out["driver_cuda"] = m.group(1) if m else None
    return out


def no_gpu_reason(torch_info: dict, smi: dict) -> str | None:
    """Why this machine cannot run the check (None when torch sees a CUDA device)."""
    if torch_info.get("cuda_available") and torch_info.get("device_count", 0) > 0:
        return None
    if "torch_error" in torch_info:
        why = f"torch cannot be imported ({torch_info['torch_error']})"
    elif torch_info.get("torch_cuda") is None:
        why = f"torch {torch_info.get('torch')} is a CPU-only build"
    else:
        why = f"torch {torch_info.get('torch')} (CUDA {torch_info.get('torch_cuda')}) sees no CUDA device"
    if smi.get("gpus"):
        why += f"; nvidia-smi lists {', '.join(g[0] for g in smi['gpus'])}, so the driver or CUDA_VISIBLE_DEVICES"
    elif smi:
        why += "; nvidia-smi lists no GPU"
    else:
        why += "; there is no nvidia-smi"
    return why


def find_sanitizer(cuda_home: str | None, torch_site: str | None) -> str | None:
    """compute-sanitizer on PATH, in the CUDA toolkit, or in an nvidia pip wheel beside torch."""
    cands = [shutil.which("compute-sanitizer")]
    for home in (cuda_home, "/usr/local/cuda"):
        if home:
            cands += [f"{home}/bin/compute-sanitizer", f"{home}/compute-sanitizer/compute-sanitizer"]
    if torch_site and Path(torch_site, "nvidia").is_dir():
        cands += sorted(str(p) for p in Path(torch_site, "nvidia").rglob("compute-sanitizer") if p.is_file())
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def find_ninja(python: str) -> str | None:
    """ninja on PATH or beside the interpreter (the `ninja` wheel's script)."""
    cand = shutil.which("ninja") or str(Path(python).parent / "ninja")
    return cand if os.path.isfile(cand) and os.access(cand, os.X_OK) else None


def git_commit() -> str:
    """HEAD's (short) hash, "+dirty" when tracked files outside benches/results changed; "unknown" without git.

    (exml_fast._utils.provenance.git_commit says the same, but importing exml_fast needs torch, which
    this script must do without to report its absence.)
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!benches/results"], cwd=ROOT, capture_output=True, text=True,
                               check=False, timeout=30).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git checkout)"


def nvcc_version(cuda_home: str | None) -> str | None:
    nvcc = shutil.which("nvcc") if not cuda_home else f"{cuda_home}/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False, timeout=30).stdout
    except (OSError, TypeError, subprocess.SubprocessError):
        return None
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- the summary ------------------------------------------------------------------------------------


def overall(results: list[StepResult]) -> bool:
    return bool(results) and all(r.ok for r in results)


def summary_dict(env: dict, results: list[StepResult], *, finished: bool) -> dict:
    """The JSON summary: the environment, every step, and the totals."""
    steps = [dataclasses.asdict(r) for r in results]
    by = {r.name: r for r in results}
    totals = {
        "pytest": {k: v for k, v in by["pytest-cuda"].details.items() if isinstance(v, (int, float))}
        if "pytest-cuda" in by else None,
        "ctest": {k: by["ctest"].details.get(k) for k in ("passed", "failed", "skipped")} if "ctest" in by else None,
        "sanitizer_errors": by["sanitizer"].details.get("error_count") if "sanitizer" in by else None,
        "racecheck_errors": by["racecheck"].details.get("error_count") if "racecheck" in by else None,
    }
    return {"ok": finished and overall(results), "finished": finished, "env": env, "steps": steps,
            "failed_steps": [r.name for r in results if not r.ok], "totals": totals, "benchmarks": SMOKE_NOTE}


def _rel(path: str | None, out: Path) -> str:
    if not path:
        return ""
    try:
        return str(Path(path).resolve().relative_to(out.resolve()))
    except ValueError:
        return str(path)


def verdict(results: list[StepResult], *, finished: bool) -> str:
    failed = [r for r in results if not r.ok]
    return ("IN PROGRESS" if not finished else
            "PASS" if not failed else f"FAIL ({len(failed)} of {len(results)} steps)")


def header_lines(env: dict, title: str) -> list[str]:
    """The summary's title and the facts of the machine and the run (date, commit, GPU, driver, versions,
    build, the exact command)."""
    smi = env.get("nvidia_smi") or {}
    driver = smi["gpus"][0][1] if smi.get("gpus") else "?"
    lines = [
        f"# {title} on {env.get('device_name', '?')}",
        "",
        (f"- date: {env.get('date')}, commit `{env.get('commit')}`, wall {env.get('wall_s') or 0:.0f} s "
         f"of a {env.get('budget_s') or 0:.0f} s budget"),
        (f"- GPU: {env.get('device_name')} (compute capability {env.get('arch')}, "
         f"{env.get('memory_gib') or 0:.1f} GiB), driver {driver} (CUDA {smi.get('driver_cuda', '?')})"),
        (f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}, "
         f"nvcc {env.get('nvcc')}, {env.get('cores')} cores"),
        (f"- build: TORCH_CUDA_ARCH_LIST={env.get('arch')}, MAX_JOBS={env.get('cores')}, "
         f"CC={env.get('cc') or '(unset)'}, CXX={env.get('cxx') or '(unset)'} (setup.py replaces a CXX that "
         f"links libstdc++ statically; see logs/build.log); compute-sanitizer: {env.get('sanitizer') or 'not found'}"),
    ]
    if env.get("command"):
        lines.append(f"- command: `{env['command']}`")
    if env.get("missing_modules"):
        lines.append(f"- Python modules missing: {', '.join(env['missing_modules'])}")
    return lines


def step_table(results: list[StepResult], out: Path) -> list[str]:
    """One table row per step, then the steps' notes and the skipped tests."""
    lines = ["", "| step | status | seconds | result | log |", "|---|---|---:|---|---|"]
    for r in results:
        status = r.status.upper() if not r.ok else "pass"
        lines.append(f"| {r.name} | {status} | {r.seconds:.0f} | {r.summary} | {_rel(r.log, out)} |")
    notes = [f"- {r.name}: {n}" for r in results for n in r.notes]
    if notes:
        lines += ["", "## Notes", "", *notes]
    skips = [f"- {s}" for r in results for s in r.details.get("skips", [])]
    if skips:
        lines += ["", "## Skipped tests", "", *skips]
    return lines


def bench_lines(results: list[StepResult], out: Path, prefix: str = "bench-") -> list[str]:
    """Each benchmark step's record and its headline figures."""
    lines = []
    for r in results:
        if r.name.startswith(prefix):
            rec = _rel(r.details.get("record_md"), out)
            lines.append(f"- {r.name}: {rec or 'not recorded'}")
            lines += [f"  - {h}" for h in r.details.get("headlines", [])]
    return lines


#: What gpu-check's benchmark figures are (the summary says it where it lists them).
SMOKE_NOTE = ("smoke runs: short settings (2 rounds, small batches), no torch.compile peer; they show that the "
              "benchmarks run on the GPU, not how fast exml_fast is there: `make gpu-perf` (benches/gpu_perf.py) "
              "takes the performance figures")


def summary_markdown(env: dict, results: list[StepResult], *, finished: bool, out: Path) -> str:
    """The Markdown summary: header facts, one table row per step, then notes, skips and bench figures."""
    lines = header_lines(env, f"gpu-check: {verdict(results, finished=finished)}") + step_table(results, out)
    bench = bench_lines(results, out)
    if bench:
        lines += ["", "## Benchmarks: smoke runs, not performance figures", "", f"These are {SMOKE_NOTE}.", "",
                  *bench]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, env: dict, results: list[StepResult], *, finished: bool,
                  summary=None, markdown=None) -> None:
    """(Re)write summary.md and summary.json under `out`, each atomically (``summary`` and ``markdown``:
    the functions that make them; default gpu-check's)."""
    out.mkdir(parents=True, exist_ok=True)
    summary, markdown = summary or summary_dict, markdown or summary_markdown
    for name, text in (("summary.json", json.dumps(summary(env, results, finished=finished), indent=2) + "\n"),
                       ("summary.md", markdown(env, results, finished=finished, out=out))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out / name)


def pack_output(out: Path, tar: str | Path) -> str | None:
    """Pack the folder ``out`` into the gzipped tarball ``tar`` (written atomically; the tarball itself left
    out when it lies inside ``out``). Returns None, or why it could not."""
    tar = Path(tar).resolve()
    if not out.exists():
        return f"{out} does not exist: nothing to pack"
    tmp = tar.with_name(tar.name + ".tmp")
    try:
        tar.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w:gz") as tf:
            tf.add(out, arcname=out.name,
                   filter=lambda info: None if Path(out.parent, info.name).resolve() in (tar, tmp) else info)
        os.replace(tmp, tar)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        return f"could not write {tar}: {e}"
    return None


# -- the steps --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Check:
    """What every step needs: the interpreter, the output folder, the budget, the build settings."""

    python: str
    out: Path
    budget: Budget
    env: dict            # the facts of the machine (summary header)
    build_env: dict      # TORCH_CUDA_ARCH_LIST, MAX_JOBS, CUDA_HOME, ...
    timeouts: dict = dataclasses.field(default_factory=lambda: dict(TIMEOUTS))  # step (or key) -> seconds
    min_start: dict = dataclasses.field(default_factory=dict)  # step -> budget seconds it needs to start
    label: str = "gpu-check"  # the prefix of the console lines

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def start(self, name: str, cmd: list[str], *, timeout_key: str | None = None, env: dict | None = None):
        """Start a step, or return a "not run" result when the budget is spent."""
        min_s = self.min_start.get(name, MIN_STEP_S)
        timeout = self.budget.timeout_for(self.timeouts[timeout_key or name], min_s)
        if timeout is None:
            return not_run(name, f"the {self.env.get('budget_s', 0):.0f} s budget was spent"
                           + (f" (the step needs {min_s:.0f} s to start)" if min_s != MIN_STEP_S else ""))
        print(f"[{self.label}] {name}: {shlex.join(cmd)[:160]}", flush=True)
        return start_step(name, cmd, log=self.logs / f"{name}.log", timeout_s=timeout,
                          env={**self.build_env, **(env or {})})

    def run(self, name: str, cmd: list[str], **kw) -> StepResult:
        started = self.start(name, cmd, **kw)
        return started if isinstance(started, StepResult) else started.wait()


_BUILD_INFO = ("import json, exml_fast; i = exml_fast.build_info(); print('BUILD_INFO ' + json.dumps(i)); "
               "assert exml_fast.has_ops() and i.get('cuda'), 'exml_fast did not load with its CUDA kernels'")


def build_step(c: Check) -> StepResult:
    """pip install -e . (CUDA kernels forced, for the visible arch, all cores), then load and describe it."""
    pip = [c.python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]
    script = f"{shlex.join(pip)} && {shlex.join([c.python, '-c', _BUILD_INFO])}"
    # The machine's own interpreter may be marked externally managed (PEP 668): installing into it
    # is the point here. No network: no version check.
    env = {"EXML_FAST_FORCE_CUDA": "1", "PIP_BREAK_SYSTEM_PACKAGES": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "PIP_NO_INPUT": "1"}
    r = c.run("build", ["bash", "-o", "pipefail", "-c", script], env=env)
    m = re.findall(r"^BUILD_INFO (.*)$", read_log(r), re.MULTILINE)
    if m:
        r.details["build_info"] = info = json.loads(m[-1])
        r.summary = f"CUDA {info.get('cuda_version')} kernels for {info.get('cuda_archs')}"
    elif r.status != "not run":
        r.summary = "no loadable build"
    return r


def start_cmake_build(c: Check):
    """Configure and build the C++ tests with the CUDA kernels (a Running, or "not run")."""
    configure = ["cmake", "-S", str(ROOT), "-B", str(CMAKE_DIR), f"-DPYTHON_EXECUTABLE={c.python}",
                 f"-DCMAKE_PREFIX_PATH={c.env.get('cmake_prefix_path', '')}", "-DEXML_FAST_CUDA=ON"]
    ninja = find_ninja(c.python)
    if ninja:
        configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
    build = ["cmake", "--build", str(CMAKE_DIR), "-j", str(c.env["cores"])]
    if shutil.which("cmake") is None:
        return not_run("cmake-build", "cmake is not on PATH")
    # A configure with another generator cannot be reused: start the folder afresh then.
    cache = CMAKE_DIR / "CMakeCache.txt"
    fresh = ""
    if cache.exists() and ("CMAKE_GENERATOR:INTERNAL=Ninja" in cache.read_text()) != bool(ninja):
        fresh = f"rm -rf {shlex.quote(str(CMAKE_DIR))} && "
    return c.start("cmake-build", ["bash", "-c", f"{fresh}{shlex.join(configure)} && {shlex.join(build)}"])


def ctest_step(c: Check, cmake: StepResult) -> StepResult:
    """Every ctest case, -j all cores; a CUDA case that skips or is missing fails the step."""
    if not cmake.ok:
        return not_run("ctest", "cmake-build failed")
    r = c.run("ctest", ["ctest", "--test-dir", str(CMAKE_DIR), "--output-on-failure", "-j", str(c.env["cores"])])
    d = parse_ctest(read_log(r))
    r.details.update(d)
    cuda_ok = [t for t in d["passed_tests"] if t.startswith("cuda_")]
    r.summary = (f"{d['passed']} passed, {d['failed']} failed, {d['skipped']} skipped "
                 f"({len(cuda_ok)} CUDA cases passed)")
    if not (d["passed"] or d["failed"] or d["skipped"]):
        r.fail("no ctest case ran (see the log)")
    if d["failed"]:
        r.fail("failed: " + ", ".join(d["failed_tests"]))
    if d["skipped"]:
        r.fail("skipped on a GPU machine: " + ", ".join(d["skipped_tests"]))
    if r.status == "pass" and not cuda_ok:
        r.fail("no CUDA case ran (is EXML_FAST_CUDA on?)")
    return r


def judge_pytest(r: StepResult, text: str) -> StepResult:
    """Fold pytest's counts into `r`: failures, errors, nothing passing, or a skip for want of the GPU fail it."""
    counts = parse_pytest_summary(text)
    if counts is None:
        r.summary = "no pytest summary line"
        r.fail("pytest printed no summary (crashed or cut short)")
        return r
    r.details.update(counts)
    r.summary = ", ".join(f"{counts[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if counts[k]
                          or k in ("passed", "failed"))
    if counts["failed"] or counts["errors"]:
        r.fail("failing tests: " + ", ".join(counts["failed_tests"][:30]))
    if counts["passed"] == 0:
        r.fail("no test passed")
    bad = [s for s in counts["skips"] if BAD_SKIP.search(s)]
    if bad:
        r.fail(f"{len(bad)} skip line(s) say the GPU or the compiled library is missing")
    return r


def pytest_step(c: Check) -> StepResult:
    """python -m pytest python_tests -m cuda: every CUDA test; in 8 worker processes where pytest-xdist
    is installed, so that a test that crashes its process fails alone instead of ending the step."""
    # -rfEs: the short summary lists skips too, which judge_pytest reads (a skip for want of the GPU fails).
    cmd = [c.python, "-m", "pytest", "python_tests", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider",
           "--durations=15", f"--junitxml={c.logs / 'pytest-cuda.xml'}"]
    if c.env.get("xdist"):
        cmd += ["-n", str(min(8, c.env["cores"]))]
    r = c.run("pytest-cuda", cmd, env={"PYTHONPATH": str(ROOT)})
    return r if r.status == "not run" else judge_pytest(r, read_log(r))


def sanitizer_help(sanitizer: str) -> str:
    try:
        return subprocess.run([sanitizer, "--help"], capture_output=True, text=True, check=False,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def start_sanitizer(c: Check, name: str = "sanitizer", check: str = "memcheck"):
    """Start compute-sanitizer's `check` (memcheck over SANITIZER_FILES; racecheck, which looks at shared
    memory only, over RACECHECK_FILES) on the SANITIZER_K tests, as step `name`, with only our kernels
    instrumented where the tool can filter, and torch's caching allocator off so that an access past a
    tensor's end lands outside its allocation. A Running (see :func:`finish_sanitizer`), or "not run"."""
    tool = c.env.get("sanitizer")
    if not tool:
        return not_run(name, "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, "
                             "nvidia wheels)")
    cmd = [tool, "--tool", check, "--error-exitcode", "86", "--print-limit", "50"]
    help_text = sanitizer_help(tool)
    if "--kernel-name" in help_text and "kns" in help_text:
        cmd += ["--kernel-name", "kns=exml_fast"]  # substring of the mangled names of our kernels
    files = RACECHECK_FILES if check == "racecheck" else SANITIZER_FILES
    cmd += [c.python, "-m", "pytest", *(f"python_tests/{f}" for f in files), "-m", "cuda",
            "-k", SANITIZER_K, "-q", "-p", "no:cacheprovider"]
    return c.start(name, cmd, env={"PYTHONPATH": str(ROOT), "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})


def finish_sanitizer(started, check: str = "memcheck") -> StepResult:
    """Wait for a started sanitizer step, then read its error count and test counts from the log."""
    r = started if isinstance(started, StepResult) else started.wait()
    if r.status == "not run":
        return r
    text = read_log(r)
    s = parse_sanitizer(text)
    r.details.update(s)
    r.details["pytest"] = {k: v for k, v in (parse_pytest_summary(text) or {}).items() if isinstance(v, (int, float))}
    count = f"{s['error_count']}" if s["complete"] else f"at least {s['error_count']}"
    warned = f", {s['warning_count']} warnings" if "warning_count" in s else ""
    r.summary = f"{count} {check} errors{warned}; " + ", ".join(f"{v} {k}" for k, v in r.details["pytest"].items()
                                                                   if k in ("passed", "failed", "skipped") and v)
    if s["error_count"]:
        r.fail(f"{check}: {count} errors, first: {s['errors'][0] if s['errors'] else '?'}")
    if r.status == "pass" and not s["complete"]:
        r.fail("no ERROR SUMMARY (or RACECHECK SUMMARY) line from compute-sanitizer")
    if r.status == "pass" and not r.details["pytest"].get("passed"):
        r.fail("no test passed under the sanitizer")
    return r


def bench_step(c: Check, name: str, script: str, args: list[str], stem: str, *, smoke: bool = True,
               step: str | None = None, timeout_key: str | None = None, env: dict | None = None) -> StepResult:
    """One benchmark on the GPU, recorded under <out>/benches/; its figures go to the summary. ``smoke``:
    without torch.compile (gpu-check's short runs); ``step``: the step's name (default bench-<name>)."""
    bench_out = c.out / "benches"
    cmd = [c.python, f"benches/{script}", "--device", "cuda", *(["--no-compile"] if smoke else []), *args,
           "--out", str(bench_out)]
    step = step or f"bench-{name}"
    rec_json = bench_out / f"{stem}.json"
    for old in (rec_json, rec_json.with_suffix(".md")):  # a record left by an earlier run is not this run's
        old.unlink(missing_ok=True)
    r = c.run(step, cmd, timeout_key=timeout_key or ("bench-synthesis" if name == "synthesis" else "bench"),
              env={"PYTHONPATH": str(ROOT), **(env or {})})
    if r.status == "not run":
        return r
    if not rec_json.exists():
        r.fail(f"no record {rec_json.name} written")
        r.summary = "not recorded"
        return r
    r.details["record_json"], r.details["record_md"] = str(rec_json), str(bench_out / f"{stem}.md")
    r.details["headlines"] = heads = bench_headlines(json.loads(rec_json.read_text()))
    r.summary = heads[0] if heads else "recorded"
    failed = [h for h in heads if "FAILED" in h]
    if failed:
        r.fail("variants failed: " + "; ".join(failed))
    return r


# -- main -------------------------------------------------------------------------------------------


def machine_facts(python: str, budget_s: float) -> tuple[dict, str | None]:
    """The facts of the machine for the summary, and why it cannot run the check (None if it can)."""
    t0 = time.monotonic()
    torch_info, smi = probe_torch(python), probe_nvidia_smi()
    reason = no_gpu_reason(torch_info, smi)
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None)
    env = {**torch_info, "nvidia_smi": smi, "cuda_home": cuda_home, "budget_s": budget_s,
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cores": cpu_count(),
           "hostname": platform.node(), "cc": os.environ.get("CC"), "cxx": os.environ.get("CXX"),
           "probe_s": time.monotonic() - t0}
    if reason is None:
        env["arch"] = "{}.{}".format(*torch_info["capability"])
        env["commit"] = git_commit()
        env["nvcc"] = nvcc_version(cuda_home)
        env["sanitizer"] = find_sanitizer(cuda_home, torch_info.get("torch_site"))
    return env, reason


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or str(DEFAULT_OUT),
                   help="folder of the summary, logs and bench records (default $GPU_CHECK_OUT, else %(default)s)")
    p.add_argument("--budget-s", type=float, default=570.0,
                   help="seconds for the whole check, shared by the steps (default %(default)s)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="comma-separated subset of the steps, to re-run some (default: all: %(default)s)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter whose torch builds and runs everything (default: this one)")
    p.add_argument("--tar", default=None,
                   help="at the end (also after a failure, a timeout or an interruption) pack --out into this "
                        ".tgz: one file to bring back from a machine that returns only a few")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    return args


def run_all(c: Check, steps: list[str], results: list[StepResult]) -> list[StepResult]:
    """The steps in order (cmake-build beside build), appended to `results`; the summary is
    rewritten after each."""
    t0 = time.monotonic()

    def done(r: StepResult) -> StepResult:
        results.append(r)
        print(f"[gpu-check] {r.name}: {r.status} ({r.seconds:.0f} s) {r.summary}"
              + "".join(f"\n    {n}" for n in r.notes), flush=True)
        c.env["wall_s"] = time.monotonic() - t0
        write_summary(c.out, c.env, results, finished=False)
        return r

    cmake = start_cmake_build(c) if "cmake-build" in steps else None
    if "build" in steps:
        done(build_step(c))
    if cmake is not None:
        cmake = done(cmake if isinstance(cmake, StepResult) else cmake.wait())
    if "ctest" in steps:
        done(ctest_step(c, cmake if cmake is not None else StepResult("cmake-build", "pass")))
    if "pytest-cuda" in steps:
        done(pytest_step(c))
    # memcheck and racecheck side by side: each is mostly the tool's instrumentation, on 16 cores and a GPU
    # that one of them leaves idle (one after the other, they took 163 of the 570 s on an H100).
    memcheck = start_sanitizer(c) if "sanitizer" in steps else None
    racecheck = start_sanitizer(c, "racecheck", "racecheck") if "racecheck" in steps else None
    if memcheck is not None:
        done(finish_sanitizer(memcheck))
    if racecheck is not None:
        done(finish_sanitizer(racecheck, "racecheck"))
    for name, script, args, stem in BENCHES:
        if f"bench-{name}" in steps:
            done(bench_step(c, name, script, args, stem))
    c.env["wall_s"] = time.monotonic() - t0
    return results


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    env, reason = machine_facts(args.python, args.budget_s)
    if reason is not None:
        print(no_gpu_message("gpu-check", reason, "builds and runs the CUDA kernels"), file=sys.stderr)
        return EXIT_NO_GPU
    out = Path(args.out).resolve()
    env["command"] = shlex.join(["python3", "benches/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"[gpu-check] {env['device_name']} (sm {env['arch']}), torch {env['torch']}, {env['cores']} cores; "
          f"writing to {out}", flush=True)
    c = Check(python=args.python, out=out, budget=budget, env=env, build_env=build_env(env))
    return session(c, lambda results: run_all(c, args.steps, results), tar=args.tar)


def no_gpu_message(label: str, reason: str, what: str) -> str:
    return (f"{label}: no usable CUDA GPU on this machine: {reason}.\n"
            f"{label} {what}, so it needs one: run `make {label}` on the GPU machine. Nothing was built or written.")


def gpu_result(env: dict) -> StepResult:
    """The first step's result: the GPU torch sees (and the Python modules missing beside it)."""
    gpu = StepResult("gpu", "pass", seconds=env["probe_s"], summary=f"{env['device_name']}, sm {env['arch']}, "
                     f"{env['memory_gib']:.0f} GiB, {env['device_count']} device(s)")
    if env.get("missing_modules"):
        gpu.notes.append(f"Python modules missing: {', '.join(env['missing_modules'])} (the steps needing them fail)")
    return gpu


def session(c: Check, run, *, tar: str | None, summary=None, markdown=None) -> int:
    """``run(results)`` after the gpu step, SIGTERM taken as an interruption (the running steps are then
    stopped); the final summary (``summary``, ``markdown``: write_summary's), the verdict, and ``tar`` packed
    whatever happened. The exit status: 0 every step passed, 1 one did not, 130 interrupted."""
    results = [gpu_result(c.env)]
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(results)
    except KeyboardInterrupt:
        stop_running_steps()
        results.append(not_run("interrupted", f"{c.label} was interrupted; the steps then running were stopped"))
        write_summary(c.out, c.env, results, finished=True, summary=summary, markdown=markdown)
        print(f"[{c.label}] interrupted; summary of the steps done in {c.out / 'summary.md'}", file=sys.stderr)
        return 130
    else:
        write_summary(c.out, c.env, results, finished=True, summary=summary, markdown=markdown)
        failed = [r.name for r in results if not r.ok]
        print(f"[{c.label}] {'FAIL: ' + ', '.join(failed) if failed else 'PASS'}; summary in "
              f"{c.out / 'summary.md'}", flush=True)
        return EXIT_FAILED if failed else 0
    finally:  # after the last summary, whatever happened
        signal.signal(signal.SIGTERM, previous)
        if tar:
            report_pack(c.out, tar, c.label)


def build_env(env: dict) -> dict:
    """The build's settings for this machine: its GPU's arch, all its cores, its CUDA toolkit."""
    out = {"TORCH_CUDA_ARCH_LIST": env["arch"], "MAX_JOBS": str(env["cores"])}
    if env.get("cuda_home"):
        out["CUDA_HOME"] = env["cuda_home"]
    return out


def report_pack(out: Path, tar: str, label: str) -> None:
    """Pack ``out`` into ``tar`` and say so (or why not)."""
    why = pack_output(out, tar)
    print(f"[{label}] " + (f"packed {out} into {tar}" if why is None else f"--tar: {why}"), flush=True,
          file=sys.stderr if why else sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
