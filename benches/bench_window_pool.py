"""Benchmark of window pooling: exml_fast.ops.window_pool vs PyTorch's F.max_pool2d / F.avg_pool2d.

Forward + backward (through autograd) of 2 x 2, stride-2 max and average pooling on the activations
LeNet-class networks pool: (256, 6, 28, 28) and (256, 16, 10, 10) (a DeepInversion batch of
LeNet-5-BN) and (32, 6, 28, 28) (a distillation batch), NCHW and channels_last; each against PyTorch's
layer (the reference and the peer: what nn.MaxPool2d / nn.AvgPool2d run) and torch.compile of it.
Calls are timed round-robin; the speed-up is the median of per-round ratios.

Usage:
    python benches/bench_window_pool.py [--device cpu|cuda] [--threads N] [--quick] [--no-compile]
        [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import env_markdown, environment, interleaved_samples, median, op_parser, parse_op_args, record

from exml_fast.ops.window_pool import window_pool
from exml_fast.reference.window_pool import window_pool as ref_window_pool

SHAPES = [(256, 6, 28, 28), (256, 16, 10, 10), (32, 6, 28, 28)]


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
    rows = []
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(s, samples["exml_fast"])]
        rows.append({"variant": name, "ms": median(s) * 1e3, "vs_exml": median(ratios)})
    return {"shape": list(shape), "mode": mode, "layout": layout, "rows": rows}


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "window pooling", "python benches/bench_window_pool.py " + " ".join(rec["argv"]))
    lines += ["Forward + backward through autograd, 2 x 2 windows, stride 2. \"time / exml_fast\" is the median of "
              "per-round ratios (> 1: exml_fast is faster).", "",
              "| mode | shape | layout | variant | ms | time / exml_fast |", "|---|---|---|---|---:|---:|"]
    for r in rec["results"]:
        for row in r["rows"]:
            lines.append(f"| {r['mode']} | {tuple(r['shape'])} | {r['layout']} | {row['variant']} | "
                         f"{row['ms']:.3f} | {row['vs_exml']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = op_parser(__doc__.split("\n\n")[0])
    args = parse_op_args(p, argv)
    t0 = time.perf_counter()
    env = environment(args.device, "window pooling")
    results = []
    for shape in SHAPES:
        for mode in ("max", "avg"):
            for layout in ("nchw", "channels_last"):
                r = bench(shape, mode, layout, args)
                results.append(r)
                print(f"  {mode} {shape} {layout}: " + ", ".join(
                    f"{row['variant']} {row['ms']:.3f} ms ({row['vs_exml']:.2f}x)" for row in r["rows"]), flush=True)
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv), "results": results}
    record(args.out, f"window_pool_{args.device}{'_quick' if args.quick else ''}{args.suffix}", rec,
           to_markdown(rec))


if __name__ == "__main__":
    main()
