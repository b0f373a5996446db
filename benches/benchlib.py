"""Shared helpers of the benchmark scripts: environment facts, synchronised
timing, copy bandwidth, paired (round-robin) timing and atomic recording.

Every script prints and records the device name, the torch/CUDA versions, the
commit and the machine's copy bandwidth, and measures each ratio in one run.
Scripts import it as `from benchlib import ...` (run as `python benches/x.py`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

import exml_fast
from exml_fast.synth import SyntheticBatch
from exml_fast._utils.provenance import device_name, git_commit  # noqa: F401 - the scripts import them from here

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benches" / "results"


def median_seconds(fn, *, min_run_time: float) -> float:
    """Median seconds per call (torch.utils.benchmark synchronises CUDA)."""
    fn()  # warm-up (allocations, autotuning, compilation)
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    return t.blocked_autorange(min_run_time=min_run_time).median


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second by a large tensor copy."""
    n = (256 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    sec = median_seconds(lambda: dst.copy_(src), min_run_time=1.0)
    return 2 * src.numel() * 4 / sec


def timed_call(fn, device: str) -> float:
    """Seconds one call of `fn` takes, the device synchronised before and after."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleaved_samples(variants: dict, *, device: str, min_run_time: float,
                        min_rounds: int = 5) -> dict[str, list[float]]:
    """Seconds per call of each variant, timed round-robin (rotating the order
    each round), so sample r of every variant was taken at about the same time:
    drift of a shared machine then cancels in per-round ratios."""
    def timed(fn):
        return timed_call(fn, device)

    names = list(variants)
    for n in names:  # warm-up
        timed(variants[n])
    samples: dict[str, list[float]] = {n: [] for n in names}
    deadline = time.perf_counter() + min_run_time * len(names)
    r = 0
    while r < min_rounds or time.perf_counter() < deadline:
        for n in names[r % len(names):] + names[: r % len(names)]:
            samples[n].append(timed(variants[n]))
        r += 1
    return samples


def median(values) -> float:
    return float(torch.tensor(values, dtype=torch.float64).median())


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
    }
    if device == "cpu":
        env["cpu_isa"] = cpu_isa()
    print(f"exml_fast {title} benchmark on {env['device']} ({device}, {env['threads']} threads), "
          f"torch {env['torch']}, CUDA {env['cuda']}, commit {env['commit']}")
    bw = copy_bandwidth(device)
    env["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s\n")
    return env


def env_markdown(env: dict, title: str, command: str) -> list[str]:
    """The header lines of a recorded run's markdown file."""
    lines = [
        f"# {title} benchmark — {env['device']} ({env['device_kind']})",
        "",
        f"- date: {env['date']}, commit `{env['commit']}`",
        f"- torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}, {env['threads']} threads",
        f"- copy bandwidth (read + write): {env['copy_bandwidth_GBps']:.1f} GB/s",
        f"- command: `{command}`",
    ]
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
