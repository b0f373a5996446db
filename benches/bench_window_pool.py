"""Benchmark of window pooling: exml_fast.ops.window_pool vs PyTorch's F.max_pool2d / F.avg_pool2d.

Forward + backward (through autograd) of 2 x 2, stride-2 max and average pooling on the activations
LeNet-class networks pool: (256, 6, 28, 28) and (256, 16, 10, 10) (a DeepInversion batch of
LeNet-5-BN) and (32, 6, 28, 28) (a distillation batch), NCHW and channels_last; each against PyTorch's
layer (the reference and the peer: what nn.MaxPool2d / nn.AvgPool2d run) and torch.compile of it.
Calls are timed round-robin; the speed-up is the median of per-round ratios. On a GPU: (256, 6, 28, 28)
and (256, 64, 56, 56), a ResNet stem's activation that moves 514 MB per call, timed with CUDA events.
GB/s counts the least traffic: read x, write the output, read its gradient, write dx (2.5 x's bytes).

Usage:
    python benches/bench_window_pool.py [--device cpu|cuda] [--threads N] [--quick] [--no-compile]
        [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, interleaved_samples, op_parser,
                      parse_op_args, record, timing_cells, true_median)

from exml_fast.ops.window_pool import window_pool
from exml_fast.reference.window_pool import window_pool as ref_window_pool

SHAPES = [(256, 6, 28, 28), (256, 16, 10, 10), (32, 6, 28, 28)]
GPU_SHAPES = [(256, 6, 28, 28), (256, 64, 56, 56)]


def fwd_bwd(fn, x, g):
    def run():
        (dx,) = torch.autograd.grad(fn(x), x, g)
        return dx
    return run


def bench(shape, mode, layout, args) -> dict:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(*shape, device=args.device).contiguous(memory_format=fmt).requires_grad_(True)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, device=args.device)
    variants = {"reference": fwd_bwd(lambda t: ref_window_pool(t, (2, 2), mode), x, g),
                "exml_fast": fwd_bwd(lambda t: window_pool(t, 2, mode=mode), x, g)}
    if not args.no_compile:
        torch._dynamo.reset()  # one lambda's code object for every case: past 8 recompiles dynamo ran eager
        compiled = torch.compile(lambda t: ref_window_pool(t, (2, 2), mode))
        variants["compile(reference)"] = fwd_bwd(compiled, x, g)
    samples = interleaved_samples(variants, device=args.device, min_run_time=args.min_run_time)
    nbytes = 2.5 * x.numel() * x.element_size()
    rows = []
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(s, samples["exml_fast"])]
        sec = true_median(s)
        rows.append({"variant": name, **samples.fields(name), "vs_exml": true_median(ratios),
                     "vs_exml_min": min(ratios), "vs_exml_max": max(ratios), "MB": nbytes / 1e6,
                     "GB/s": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / args.copy_bw})
    return {"shape": list(shape), "mode": mode, "layout": layout, "rows": rows}


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "window pooling", rec["command"])
    lines += ["Forward + backward through autograd, 2 x 2 windows, stride 2. \"time / exml_fast\" is the median of "
              "per-round ratios [min–max] (> 1: exml_fast is faster). GB/s: 2.5 x's bytes (read x, write the "
              "output, read its gradient, write dx) per second.", "",
              f"| mode | shape | layout | variant | ms | time / exml_fast | GB/s | % of copy bw | {TIMING_HEADER} |",
              "|---|---|---|---|---:|---:|---:|---:|---|---|"]
    for r in rec["results"]:
        for row in r["rows"]:
            lines.append(f"| {r['mode']} | {tuple(r['shape'])} | {r['layout']} | {row['variant']} | "
                         f"{row['ms']:.3f} | {row['vs_exml']:.2f}x [{row['vs_exml_min']:.2f}–"
                         f"{row['vs_exml_max']:.2f}] | {row['GB/s']:.1f} | {row['pct_copy_bw']:.0f}% | "
                         f"{timing_cells(row)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = op_parser(__doc__.split("\n\n")[0])
    args = parse_op_args(p, argv)
    t0 = time.perf_counter()
    env = environment(args.device, "window pooling")
    args.copy_bw = env["copy_bandwidth_GBps"] * 1e9
    results = []
    for shape in GPU_SHAPES if args.device == "cuda" and not args.quick else SHAPES:
        for mode in ("max", "avg"):
            for layout in ("nchw", "channels_last"):
                r = bench(shape, mode, layout, args)
                results.append(r)
                print(f"  {mode} {shape} {layout}: " + ", ".join(
                    f"{row['variant']} {row['ms']:.3f} ms ({row['vs_exml']:.2f}x)" for row in r["rows"]), flush=True)
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line("bench_window_pool.py", argv), "results": results}
    record(args.out, f"window_pool_{args.device}{'_quick' if args.quick else ''}{args.suffix}", rec,
           to_markdown(rec))


if __name__ == "__main__":
    main()
