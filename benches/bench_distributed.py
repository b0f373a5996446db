"""Synthesis images/s from 1 to K processes: `exml-fast synthesize` under torchrun, as a user runs it.

Each configuration is one command on a fresh output folder: ``torchrun --standalone
--nproc_per_node=P -m exml_fast synthesize ...`` with ``OMP_NUM_THREADS`` = threads per rank
(P = 1 runs plain ``python -m exml_fast``). The job is the same every time (teacher, method, n,
batch size, iterations, seed); its rate is n over the slowest rank's synthesis seconds, as each
rank prints them (from its first batch to the job's end, the final barrier included; the
processes' start, the imports and the group's set-up are not in it, and are reported apart as
the command's wall time).

Rows: P processes x T threads for P = 1..--max-procs at --threads-per-rank threads, and one
process with P x T threads (the peer a user already has: the same cores in one process).
Speed-up is against one process with T threads, efficiency = speed-up / P. Every sharded job's
shards are compared with the single-process job's: the same bits is the design (batch b is
seeded from (seed, b) alone) as long as the kernels are the same (same threads per rank).

    python benches/bench_distributed.py                     # CPU: 1..cores processes, 1 thread each
    python benches/bench_distributed.py --quick --out ''    # a smoke run, nothing recorded

The teacher is a randomly initialised LeNet-5-BN unless --teacher names a checkpoint: the
rate of DeepInversion does not depend on what the teacher learned.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchlib import RESULTS, env_markdown, environment, record

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exml_fast.checkpoint import save_model  # noqa: E402
from exml_fast.models import build_model  # noqa: E402
from exml_fast.synth import load_synthetic  # noqa: E402

_LINE = re.compile(r"^\[synthesize(?: rank (\d+)/(\d+))?\] (\d+) images.*?; ([\d.]+) s, ", re.MULTILINE)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cpu (gloo) or cuda (NCCL, one GPU per rank; --max-procs at most the GPUs)")
    p.add_argument("--max-procs", type=int, default=None, help="largest P (default: the cores, or the GPUs)")
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP_NUM_THREADS of each rank (default 1)")
    p.add_argument("--teacher", default=None, help="checkpoint (default: a random LeNet-5-BN)")
    p.add_argument("--method", default="deepinversion")
    p.add_argument("-n", type=int, default=None, help="images (default 512; --quick 32)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64; --quick 8")
    p.add_argument("--iterations", type=int, default=None, help="default 100; --quick 30")
    p.add_argument("--quick", action="store_true", help="a smoke run: n 32, batch 8, 30 iterations, P <= 2")
    p.add_argument("--suffix", default="", help="appended to the recorded files' names")
    p.add_argument("--out", default=str(RESULTS), help="directory for the recorded run ('' to not record)")
    args = p.parse_args(argv)
    for name in ("max_procs", "threads_per_rank", "n", "batch_size", "iterations"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    units = torch.cuda.device_count() if args.device == "cuda" else (os.cpu_count() or 1)
    if args.device == "cuda" and units == 0:
        p.error("--device cuda: no CUDA device is visible")
    if args.max_procs is None:
        args.max_procs = units if args.device == "cuda" else max(1, units // args.threads_per_rank)
    if args.quick:
        args.max_procs = min(args.max_procs, 2)
    for name, default, quick in (("n", 512, 32), ("batch_size", 64, 8), ("iterations", 100, 30)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else default)
    return args


def run_job(args, teacher: str, out: Path, procs: int, threads: int) -> dict:
    """One synthesis job; its rate from the ranks' own timings, and the command's wall time."""
    cli = ["synthesize", "--teacher", teacher, "--method", args.method, "-n", str(args.n), "--batch-size",
           str(args.batch_size), "--iterations", str(args.iterations), "--seed", "0", "--device", args.device,
           "--no-progress", "--no-grid", "--out", str(out)]
    launcher = ([sys.executable, "-m", "exml_fast"] if procs == 1 else
                [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                 "-m", "exml_fast"])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    r = subprocess.run(launcher + cli, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{procs} x {threads}: exit {r.returncode}\n{r.stderr[-2000:]}")
    lines = _LINE.findall(r.stdout)
    if len(lines) != procs:
        raise RuntimeError(f"{procs} x {threads}: expected {procs} summary lines, got:\n{r.stdout}")
    seconds = max(float(s) for *_, s in lines)
    if seconds < 0.05:
        raise RuntimeError(f"{procs} x {threads}: {seconds:.2f} s of synthesis is too short to time: raise -n or "
                           "--iterations")
    return {"procs": procs, "threads_per_proc": threads, "synthesis_s": seconds,
            "images_per_s": args.n / seconds, "command_wall_s": wall}


def same_job(a: Path, b: Path) -> bool:
    x, y = load_synthetic(a), load_synthetic(b)
    return torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


def markdown(env: dict, args, rows: list[dict], argv: list[str]) -> str:
    lines = env_markdown(env, "Distributed synthesis", "python benches/bench_distributed.py " + " ".join(argv))
    lines += [
        f"{args.method}, {args.n} images, batch {args.batch_size}, {args.iterations} iterations per batch, "
        f"{args.device}; rate = images / the slowest rank's synthesis seconds (process start, imports and "
        "the group's set-up excluded: they are in the command's wall time). The last row, one process "
        "with all the threads, runs other kernels (another thread count), so its bits may differ.",
        "",
        "| processes × threads | images/s | speed-up | efficiency | synthesis s | command wall s "
        "| same bits as 1 process |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['procs']} × {r['threads_per_proc']} | {r['images_per_s']:.1f} | ×{r['speedup']:.2f} | "
                     f"{r['efficiency'] * 100:.0f} % | {r['synthesis_s']:.1f} | {r['command_wall_s']:.1f} | "
                     f"{r['same_bits']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads_per_rank)
    env = environment(args.device, "distributed synthesis")
    t_start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_distributed_") as tmp:
        tmp = Path(tmp)
        teacher = args.teacher
        if teacher is None:
            torch.manual_seed(0)
            teacher = str(tmp / "teacher.pt")
            save_model(build_model("lenet5bn").eval(), teacher, arch="lenet5bn", num_classes=10, in_channels=1,
                       input_shape=(1, 32, 32), mean=0.1307, std=0.3081)
        t = args.threads_per_rank
        configs = [(p, t) for p in range(1, args.max_procs + 1)]
        if args.max_procs > 1:
            configs.append((1, args.max_procs * t))
        for procs, threads in configs:
            out = tmp / f"job_{procs}x{threads}"
            row = run_job(args, teacher, out, procs, threads)
            row["same_bits"] = "—" if (procs, threads) == (1, t) else (
                "yes" if same_job(out, tmp / f"job_1x{t}") else "no")
            rows.append(row)
            print(f"  {procs} x {threads}: {row['images_per_s']:.1f} images/s ({row['synthesis_s']:.1f} s of "
                  f"synthesis, {row['command_wall_s']:.1f} s for the command); same bits: {row['same_bits']}",
                  flush=True)
    base = rows[0]["images_per_s"]
    for r in rows:
        r["speedup"] = r["images_per_s"] / base
        r["efficiency"] = r["speedup"] / (r["procs"] * r["threads_per_proc"] / args.threads_per_rank)
    env["wall_s"] = time.perf_counter() - t_start
    rec = {"env": env, "argv": argv, "args": {k: v for k, v in vars(args).items()}, "rows": rows}
    record(args.out, f"distributed_{args.device}{args.suffix}", rec, markdown(env, args, rows, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
