"""Benchmark of the fused image priors: exml_fast.ops.image_priors vs the reference.

Forward + backward of all four priors (tv_l1, tv_l2, blur, l2): a weighted sum
of the four entries, then the gradient w.r.t. x, for exml_fast, the reference
(slices, norms and a depthwise F.conv2d, as the public DeepInversion / Ex-Model
code) and torch.compile(reference), each through autograd; plus the fused
kernels alone (forward op + backward op, no autograd). GB/s counts the minimum
traffic — read x (forward), read x and write dx (backward) — against the
machine's measured copy bandwidth. Every ratio is measured in this one run.
On a GPU the shapes are a CIFAR batch and an ImageNet batch of 256 (462 MB
moved per call), timed with CUDA events.

Usage:
    python benches/bench_image_priors.py [--device cpu|cuda] [--quick] [--no-compile]
        [--min-run-time S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, op_parser, parse_op_args, record,
                      time_fn, timing_cells)

from exml_fast.ops.image_priors import image_priors
from exml_fast.reference.image_priors import image_priors as ref_image_priors

SHAPES = [(256, 3, 32, 32), (1024, 1, 32, 32), (64, 3, 224, 224)]
QUICK_SHAPES = [(256, 3, 32, 32)]
#: On a GPU: a CIFAR batch, and an ImageNet batch of 256 that moves 462 MB per call (fills an H100).
GPU_SHAPES = [(256, 3, 32, 32), (256, 3, 224, 224)]
KERNELS = (3, 7)
# DeepInversion / Ex-Model CL magnitudes: tv_l1, tv_l2, blur, l2.
WEIGHTS = (1e-4, 2.5e-5, 1e-3, 3e-8)


def make_fwd_bwd(fn, x, k):
    w = torch.tensor(WEIGHTS, device=x.device)

    def step():
        out = fn(x, blur_kernel_size=k)
        torch.autograd.grad((out * w).sum(), x)
    return step


def make_kernels_only(x, k):
    xd = x.detach()
    grad = torch.tensor(WEIGHTS, device=x.device)
    _, sums = torch.ops.exml_fast.image_priors(xd, k, None, False, False)

    def step():
        torch.ops.exml_fast.image_priors(xd, k, None, False, False)
        torch.ops.exml_fast._image_priors_backward(grad, xd, sums, k, None, False, False)
    return step


def run(device, shapes, *, use_compile, min_run_time, copy_bw):
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        x = torch.randn(*shape, device=device).requires_grad_(True)
        nbytes = 3 * x.numel() * x.element_size()
        for k in KERNELS:
            variants = {"reference": ref_image_priors, "exml_fast": image_priors}
            if use_compile:
                torch._dynamo.reset()
                variants["compile(reference)"] = torch.compile(ref_image_priors, dynamic=False)
            timings = {name: time_fn(make_fwd_bwd(fn, x, k), device=device, min_run_time=min_run_time)
                       for name, fn in variants.items()}
            timings["exml_fast kernels only"] = time_fn(make_kernels_only(x, k), device=device,
                                                       min_run_time=min_run_time)
            for name, t in timings.items():
                sec = t.median_s
                row = {
                    "shape": list(shape), "blur_kernel_size": k, "variant": name, **t.fields(), "MB": nbytes / 1e6,
                    "speedup_vs_reference": timings["reference"].median_s / sec,
                    "GB/s": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / copy_bw,
                }
                rows.append(row)
                print(f"  {str(tuple(shape)):18s} k={k} {name:23s} {sec * 1e3:9.3f} ms  "
                      f"x{row['speedup_vs_reference']:6.2f} vs reference  {row['GB/s']:7.2f} GB/s "
                      f"({row['pct_copy_bw']:5.1f}% of copy)", flush=True)
    return rows


def to_markdown(rec: dict, command: str) -> str:
    lines = env_markdown(rec["env"], "image_priors", command) + [
        "## Forward + backward of the four priors (weighted sum, then grad w.r.t. x)",
        "",
        "GB/s counts read x (forward) + read x and write dx (backward), fp32.",
        "",
        f"| shape | blur k | variant | ms | speed-up vs reference | GB/s | % of copy bw | MB moved | {TIMING_HEADER} |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["rows"]:
        lines.append(f"| {tuple(r['shape'])} | {r['blur_kernel_size']} | {r['variant']} | "
                     f"{r['ms']:.3f} | {r['speedup_vs_reference']:.2f}x | {r['GB/s']:.1f} | "
                     f"{r['pct_copy_bw']:.0f}% | {r['MB']:.0f} | {timing_cells(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = op_parser(__doc__, quick_help="smoke run: one shape, short timings, no torch.compile, nothing recorded")
    args = parse_op_args(p, argv)
    min_run_time = args.min_run_time
    env = environment(args.device, "image_priors")
    t0 = time.perf_counter()
    print("forward + backward of image_priors (tv_l1, tv_l2, blur, l2), fp32")
    shapes = QUICK_SHAPES if args.quick else GPU_SHAPES if args.device == "cuda" else SHAPES
    rows = run(args.device, shapes,
               use_compile=not (args.no_compile or args.quick), min_run_time=min_run_time,
               copy_bw=env["copy_bandwidth_GBps"] * 1e9)
    env["wall_s"] = time.perf_counter() - t0
    if not args.quick:
        command = command_line("bench_image_priors.py", argv)
        rec = {"env": env, "command": command, "rows": rows}
        record(args.out, f"image_priors_{args.device}", rec, to_markdown(rec, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
