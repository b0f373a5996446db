"""Shared helpers of the benchmark scripts: environment facts, synchronised
timing, copy bandwidth, paired (round-robin) timing and atomic recording.

Every script prints and records the device name, the torch/CUDA versions, the
commit and the machine's copy bandwidth, and measures each ratio in one run.
Scripts import it as `from benchlib import ...` (run as `python benches/x.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils import benchmark

import exml_fast
from exml_fast.synth import SyntheticBatch
from exml_fast._utils.provenance import device_name, git_commit  # noqa: F401 - the scripts import them from here

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"


# -- timing ----------------------------------------------------------------------------------------
#
# On the GPU every figure comes from CUDA events recorded around rounds of back-to-back calls (as
# triton.testing.do_bench does; no cache flush): the time the device spent, not the host's view of a
# 30 us launch. On the CPU torch.utils.benchmark times the calls (its blocks are the rounds). Every
# record gives the true median of the rounds, their min and max, the round count and the calls per round.


def true_median(values) -> float:
    """The median of ``values``: the middle value, or the mean of the two middle values for an even
    count (torch.median and statistics.median_low return the lower of the two)."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("true_median: no values")
    mid = len(v) // 2
    return v[mid] if len(v) % 2 else (v[mid - 1] + v[mid]) / 2


#: The former name, kept for scripts written against it: it is the true median.
median = true_median


class HostEvent:
    """torch.cuda.Event's timing interface on the host's clock: what the GPU timing code runs with on
    the CPU (and in the tests), so that one code path serves both."""

    def __init__(self, enable_timing: bool = True) -> None:
        self.t: float | None = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: HostEvent) -> float:
        """Milliseconds from this event to ``end``."""
        return (end.t - self.t) * 1e3


@dataclasses.dataclass(frozen=True)
class Clock:
    """How work on a device is timed: an event class (torch.cuda.Event's interface), the synchronisation
    that makes every recorded event complete, and the name the records give the method."""

    event: Callable
    synchronize: Callable[[], None]
    name: str


def device_clock(device: str) -> Clock:
    """CUDA events on a GPU, the host clock (perf_counter) on the CPU."""
    if str(device).startswith("cuda"):
        return Clock(functools.partial(torch.cuda.Event, enable_timing=True), torch.cuda.synchronize,
                     "CUDA events")
    return Clock(HostEvent, lambda: None, "host clock (perf_counter)")


@dataclasses.dataclass
class Timing:
    """Seconds per call of one timed function: one value per round, each round ``inner`` calls back to
    back, timed by ``timer``."""

    per_call_s: list[float]
    inner: int
    timer: str

    @property
    def median_s(self) -> float:
        return true_median(self.per_call_s)

    @property
    def rounds(self) -> int:
        return len(self.per_call_s)

    def fields(self) -> dict:
        """A record's columns: ms (the true median over the rounds), ms_min, ms_max, rounds, inner, timer."""
        return {"ms": self.median_s * 1e3, "ms_min": min(self.per_call_s) * 1e3,
                "ms_max": max(self.per_call_s) * 1e3, "rounds": self.rounds, "inner": self.inner,
                "timer": self.timer}


def event_rounds(fn, *, inner: int, rounds: int, clock: Clock) -> list[float]:
    """Seconds per call of ``fn`` in each of ``rounds`` rounds of ``inner`` back-to-back calls: events
    recorded around each round, all rounds enqueued, one synchronisation at the end."""
    marks = [(clock.event(), clock.event()) for _ in range(rounds)]
    clock.synchronize()
    for start, end in marks:
        start.record()
        for _ in range(inner):
            fn()
        end.record()
    clock.synchronize()
    return [start.elapsed_time(end) / 1e3 / inner for start, end in marks]


def _ceil(x: float) -> int:
    """math.ceil, less a hair: a ratio of timings that is a whole number but for rounding counts as that."""
    return math.ceil(x - 1e-6)


def calls_per_round(fn, *, round_s: float, clock: Clock) -> int:
    """Back-to-back calls of ``fn`` that fill a round of at least ``round_s`` seconds (at least 1),
    from the fastest of three single calls."""
    one = min(event_rounds(fn, inner=1, rounds=3, clock=clock))
    return max(1, _ceil(round_s / max(one, 1e-7)))


def time_fn(fn, *, device: str, min_run_time: float, min_rounds: int = 5, min_round_s: float = 1e-3,
            max_rounds: int = 200, clock: Clock | None = None) -> Timing:
    """Seconds per call of ``fn``, warmed up first.

    On a GPU (or with ``clock`` given): rounds of back-to-back calls timed by events, each round at least
    ``min_round_s`` (and about min_run_time / 20) long, at least ``min_rounds`` rounds and about
    ``min_run_time`` in all. On the CPU: torch.utils.benchmark's blocked_autorange (the CPU records'
    method), its blocks the rounds, topped up to ``min_rounds``."""
    fn()  # warm-up: allocations, autotuning, compilation
    if clock is None and device == "cpu":
        return _benchmark_timing(fn, min_run_time=min_run_time, min_rounds=min_rounds)
    clock = clock or device_clock(device)
    fn()
    round_s = max(min_round_s, min_run_time / 20)
    inner = calls_per_round(fn, round_s=round_s, clock=clock)
    first = event_rounds(fn, inner=inner, rounds=1, clock=clock)[0]
    rounds = min(max_rounds, max(min_rounds, _ceil(min_run_time / max(first * inner, 1e-9))))
    return Timing(event_rounds(fn, inner=inner, rounds=rounds, clock=clock), inner, clock.name)


def _benchmark_timing(fn, *, min_run_time: float, min_rounds: int) -> Timing:
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    m = t.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_rounds:
        times += t.timeit(m.number_per_run).times
    return Timing(times, m.number_per_run, "torch.utils.benchmark")


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a 256 MiB tensor copy (the true median over the rounds)."""
    n = (256 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sec = time_fn(lambda: dst.copy_(src), device=device, min_run_time=1.0 if device == "cpu" else 0.5).median_s
    return 2 * src.numel() * 4 / sec


def timed_call(fn, device: str) -> float:
    """Seconds one call of ``fn`` takes: CUDA events around it on a GPU, the host clock on the CPU (the
    device synchronised before and after either way)."""
    return event_rounds(fn, inner=1, rounds=1, clock=device_clock(device))[0]


class Samples(dict):
    """interleaved_samples' answer: variant -> seconds per call, one per round; ``inner`` (variant ->
    calls per round) and ``timer`` say how they were taken."""

    inner: dict[str, int]
    timer: str

    def fields(self, name: str) -> dict:
        """A record's columns for one variant (as Timing.fields)."""
        return Timing(self[name], self.inner[name], self.timer).fields()


def interleaved_samples(variants: dict, *, device: str, min_run_time: float, min_rounds: int = 5,
                        min_round_s: float | None = None, clock: Clock | None = None) -> Samples:
    """Seconds per call of each variant, timed round-robin (rotating the order each round), so sample r
    of every variant was taken at about the same time: drift of a shared machine then cancels in
    per-round ratios. Each sample is one round of back-to-back calls timed by ``clock`` (default: CUDA
    events on a GPU, the host clock on the CPU), long enough to fill ``min_round_s`` (default 1 ms on a
    GPU; 0 on the CPU: one call per sample, as the CPU records were taken)."""
    clock = clock or device_clock(device)
    if min_round_s is None:
        min_round_s = 0.0 if device == "cpu" else 1e-3
    names = list(variants)
    for n in names:  # warm-up
        event_rounds(variants[n], inner=1, rounds=1, clock=clock)
    samples = Samples({n: [] for n in names})
    samples.inner = {n: calls_per_round(variants[n], round_s=min_round_s, clock=clock) if min_round_s > 0 else 1
                     for n in names}
    samples.timer = clock.name
    deadline = time.perf_counter() + min_run_time * len(names)
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        for n in names[r % len(names):] + names[: r % len(names)]:
            samples[n] += event_rounds(variants[n], inner=samples.inner[n], rounds=1, clock=clock)
        r += 1
    return samples


def range_text(lo: float, hi: float, fmt: str = ".2f") -> str:
    """"lo–hi" for a table cell."""
    return f"{lo:{fmt}}–{hi:{fmt}}"


#: The header cells of timing_cells.
TIMING_HEADER = "min–max ms | rounds × calls"


def timing_cells(row: dict, fmt: str = ".3f") -> str:
    """The range and run-count cells of a row with Timing.fields(): "min–max ms | rounds × calls"."""
    return f"{range_text(row['ms_min'], row['ms_max'], fmt)} | {row['rounds']} × {row['inner']}"


# The variables that cap the CPU kernels' instruction set (torch, oneDNN, exml_fast's own loops).
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "EXML_FAST_CPU_ISA")


def cpu_isa() -> dict:
    """Whether the CPU has AVX-512 (F), the vector ISA torch's CPU kernels run with, and the ISA caps
    set in the environment (a run under them imitates a CPU without AVX-512)."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    return {"cpu_has_avx512": "avx512f" in flags,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "caps": {k: os.environ[k] for k in ISA_VARIABLES if k in os.environ}}


def data_missing(datasets) -> bool:
    """True (after saying which on stderr) if the files of one of ``datasets`` are not found."""
    from exml_fast.data import find_data_root

    for ds in datasets:
        if find_data_root(ds) is None:
            print(f"{ds} files not found (set EXML_FAST_DATA)", file=sys.stderr)
            return True
    return False


def nvidia_driver() -> str | None:
    """The NVIDIA driver's version (nvidia-smi), or None."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, check=False, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def command_line(script: str, argv=None) -> str:
    """The exact command of a run: ``python benches/<script>`` and its arguments (``argv``, else sys.argv's)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benches/{script}", *map(str, args)])


#: How each device's figures are timed (the records' header says it).
TIMERS = {"cuda": "CUDA events (torch.cuda.Event) around rounds of back-to-back calls",
          "cpu": "torch.utils.benchmark (op calls) and the host clock (interleaved rounds)"}


def environment(device: str, title: str) -> dict:
    """Facts recorded with every run; prints a one-line header and the copy bandwidth."""
    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_kind": device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "exml_fast_build": exml_fast.build_info(),
        "commit": git_commit(),
        "timer": TIMERS["cuda" if device.startswith("cuda") else "cpu"],
    }
    if device == "cpu":
        env["cpu_isa"] = cpu_isa()
    else:
        env["driver"] = nvidia_driver()
        env["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    print(f"exml_fast {title} benchmark on {env['device']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}")
    bw = copy_bandwidth(device)
    env["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s\n")
    return env


def env_markdown(env: dict, title: str, command: str) -> list[str]:
    """The header lines of a recorded run's markdown file."""
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    lines = [
        f"# {title} benchmark — {env['device']} ({env['device_kind']})",
        "",
        f"- date: {env['date']}, commit `{env['commit']}`",
        f"- torch {env['torch']}, CUDA {env['cuda']}{driver}, Python {env['python']}, {env['threads']} threads",
        f"- copy bandwidth (read + write): {env['copy_bandwidth_GBps']:.1f} GB/s",
        f"- command: `{command}`",
    ]
    if "timer" in env:
        tf32 = env.get("tf32")
        tf32 = (f"; TF32 matmul {'on' if tf32['matmul'] else 'off'}, cuDNN {'on' if tf32['cudnn'] else 'off'}"
                if tf32 else "")
        lines.insert(-1, f"- timing: {env['timer']}; medians are true medians over the rounds{tf32}")
    if "cpu_isa" in env:
        isa = env["cpu_isa"]
        caps = ", ".join(f"{k}={v}" for k, v in isa["caps"].items()) or "none"
        lines.insert(-1, f"- CPU {'with' if isa['cpu_has_avx512'] else 'without'} AVX-512; torch CPU "
                         f"kernels: {isa['torch_cpu_capability']}; ISA caps: {caps}")
    if "wall_s" in env:
        lines[-1] += f"; wall {env['wall_s']:.0f} s"
    return lines + [""]


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def record(out: str | Path, stem: str, rec: dict, markdown: str) -> None:
    """Write `<out>/<stem>.json` and `<out>/<stem>.md` atomically ('' = do not record)."""
    if not out:
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / f"{stem}.json", json.dumps(rec, indent=2) + "\n")
    write_atomic(out / f"{stem}.md", markdown)
    print(f"\nrecorded in {out / stem}.json and {out / stem}.md")


def op_parser(description: str, *, quick_help: str = "short smoke run (0.2 s per measurement)",
              default_run_time: str = "1 s") -> argparse.ArgumentParser:
    """The arguments every op benchmark takes: --device, --quick, --no-compile,
    --min-run-time, --threads, --suffix, --out. Scripts add their own before calling `parse_op_args`."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help=f"seconds of timed runs per measurement (default {default_run_time}; "
                        "0.2 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--suffix", default="",
                   help="appended to the recorded files' names, e.g. _avx2 for a run under the ISA caps")
    p.add_argument("--out", default=str(RESULTS),
                   help="directory for the recorded run ('' to not record)")
    return p


def parse_op_args(p: argparse.ArgumentParser, argv=None, *, cpu_run_time: float = 1.0,
                  cuda_run_time: float = 1.0) -> argparse.Namespace:
    """Parse, refuse a run that would mean nothing (no GPU for --device cuda, or
    no compiled library: the reference would be timed twice), and fill in
    `min_run_time`; apply --threads."""
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if not exml_fast.has_ops():
        p.error("exml_fast._C is not built: the benchmark would time the reference twice")
    if args.min_run_time is None:
        args.min_run_time = 0.2 if args.quick else (
            cpu_run_time if args.device == "cpu" else cuda_run_time)
    return args


# -- stand-ins for an expert stream (profiles and benchmarks of the distillation loop) --------------


class StubExpert:
    """The attributes ExModelDistillation and the synthesizers read from an Expert (a LeNet-5 on MNIST shapes):
    what the profiles and the tanh benchmark distil from."""

    def __init__(self, model, classes, i):
        self.model, self.classes, self.task_id = model, classes, None
        self.mean, self.std, self.input_shape, self.num_classes = (0.1307,), (0.3081,), (1, 32, 32), 10
        self.meta = {"experience": i}


class RandomSource:
    """A buffer source of N(0, 1) images labelled with the expert's classes: distillation without synthesis."""

    def describe(self):
        return {"method": "random"}

    def generate(self, expert, n, *, seed, device, progress):
        g = torch.Generator().manual_seed(seed)
        cls = torch.tensor(expert.classes)
        return SyntheticBatch(torch.randn(n, 1, 32, 32, generator=g), cls[torch.randint(0, 2, (n,), generator=g)],
                              None, {}, expert.mean, expert.std)
