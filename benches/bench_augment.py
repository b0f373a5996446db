"""Benchmark of per-sample augmentation (roll-jitter + flip + pad-crop).

Forward + backward (through autograd, gradient w.r.t. x) of:
- exml_fast: `ops.augment` (draw on the device + the fused gather kernels);
- reference: `reference.augment` (the same per-sample semantics: the same
  draw, then a vectorised gather with index tensors);
- compile(reference): the same draw, then torch.compile(reference.augment_with_params);
- public (for information): `reference.batch_augment_public`, ONE roll and one
  flip for the whole batch as the public DeepInversion code did — a different,
  weaker augmentation, not a peer;
- exml_fast kernels only: the two ops called directly (no draw, no autograd).

Sizes: (256, 3, 32, 32) and (1024, 1, 32, 32) with max_shift 2 and pad_crop 4;
(64, 3, 224, 224) with max_shift 30 and no pad-crop; flip on. GB/s counts
the minimum traffic: read x + write out, read grad + write dx.

Usage:
    python benches/bench_augment.py [--device cpu|cuda] [--channels-last]
        [--dtype float32] [--no-compile] [--quick] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, op_parser, parse_op_args, record,
                      time_fn, timing_cells)

from exml_fast.ops.augment import augment
from exml_fast.reference.augment import augment as ref_augment
from exml_fast.reference.augment import augment_with_params as ref_apply
from exml_fast.reference.augment import batch_augment_public, draw_augment_params

SIZES = [((256, 3, 32, 32), 2, 4), ((1024, 1, 32, 32), 2, 4), ((64, 3, 224, 224), 30, 0)]
#: On a GPU: a CIFAR batch, and an ImageNet batch of 256 (616 MB moved per call).
GPU_SIZES = [((256, 3, 32, 32), 2, 4), ((256, 3, 224, 224), 30, 0)]


def make_step(fn, x, grad):
    def step():
        out = fn(x)
        torch.autograd.grad(out, x, grad)
    return step


def bench(device, dtype, channels_last, *, use_compile, min_run_time, copy_bw, sizes):
    rows = []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for shape, max_shift, pad in sizes:
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        x.requires_grad_(True)
        grad = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        gen = torch.Generator(device=device).manual_seed(0)
        n = shape[0]
        kw = {"max_shift": max_shift, "flip": True, "pad_crop": pad, "generator": gen}

        variants = {
            "reference": lambda t: ref_augment(t, **kw),
            "exml_fast": lambda t: augment(t, **kw),
        }
        if use_compile:
            torch._dynamo.reset()
            compiled = torch.compile(ref_apply, dynamic=False)
            variants["compile(reference)"] = lambda t: compiled(
                t, draw_augment_params(n, max_shift=max_shift, pad_crop=pad, device=device,
                                       generator=gen), pad_crop=pad)
        variants["public once-per-batch (info)"] = lambda t: batch_augment_public(
            t, max_shift=max_shift, flip=True)
        timings = {name: time_fn(make_step(fn, x, grad), device=device, min_run_time=min_run_time)
                   for name, fn in variants.items()}

        params = draw_augment_params(n, max_shift=max_shift, pad_crop=pad, device=device,
                                     generator=gen)
        xd = x.detach()

        def kernels_only():
            torch.ops.exml_fast.augment_with_params(xd, params, pad)
            torch.ops.exml_fast._augment_with_params_backward(grad, params, pad)

        timings["exml_fast kernels only"] = time_fn(kernels_only, device=device, min_run_time=min_run_time)
        nbytes = 4 * x.numel() * x.element_size()
        layout = "channels_last" if channels_last else "NCHW"
        for name, t in timings.items():
            sec = t.median_s
            row = {"shape": list(shape), "max_shift": max_shift, "pad_crop": pad, "layout": layout,
                   "dtype": str(dtype).removeprefix("torch."), "variant": name, **t.fields(), "MB": nbytes / 1e6,
                   "speedup_vs_reference": timings["reference"].median_s / sec, "GB/s": nbytes / sec / 1e9,
                   "pct_copy_bw": 100 * nbytes / sec / copy_bw}
            rows.append(row)
            print(f"  {str(tuple(shape)):18s} shift {max_shift:2d} pad {pad} {layout:13s} "
                  f"{name:29s} {sec * 1e3:9.3f} ms  x{row['speedup_vs_reference']:6.2f} vs reference  "
                  f"{row['GB/s']:7.2f} GB/s ({row['pct_copy_bw']:5.1f}% of copy)", flush=True)
    return rows


def main(argv=None) -> int:
    p = op_parser(__doc__, quick_help="short smoke run: 0.2 s per measurement, the first two sizes")
    p.add_argument("--dtype", default="float32",
                   choices=["float32", "float64", "float16", "bfloat16"])
    p.add_argument("--channels-last", action="store_true", help="x and grad in channels_last")
    args = parse_op_args(p, argv)
    min_run_time = args.min_run_time
    sizes = SIZES[:2] if args.quick else GPU_SIZES if args.device == "cuda" else SIZES
    dtype = getattr(torch, args.dtype)

    env = environment(args.device, "augment")
    t0 = time.perf_counter()
    print("forward + backward of per-sample roll-jitter + flip (+ pad-crop)")
    rows = bench(args.device, dtype, args.channels_last, use_compile=not args.no_compile,
                 min_run_time=min_run_time, copy_bw=env["copy_bandwidth_GBps"] * 1e9, sizes=sizes)
    env["wall_s"] = time.perf_counter() - t0
    cmd = command_line("bench_augment.py", argv)
    rec = {"env": env, "command": cmd, "rows": rows}
    layout = "_cl" if args.channels_last else ""
    stem = f"augment_{args.device}_{args.dtype}{layout}" + ("_quick" if args.quick else "")
    record(args.out, stem, rec, to_markdown(rec, cmd))
    return 0


def to_markdown(rec: dict, command: str) -> str:
    lines = env_markdown(rec["env"], "augment", command) + [
        "Forward + backward through autograd (draw included, except `kernels only`);",
        "`public once-per-batch` is a weaker augmentation (one draw per batch), for information.",
        "",
        "| shape | max_shift | pad_crop | layout | dtype | variant | ms | speed-up vs reference |"
        f" GB/s | % of copy bw | MB moved | {TIMING_HEADER} |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["rows"]:
        lines.append(f"| {tuple(r['shape'])} | {r['max_shift']} | {r['pad_crop']} | {r['layout']} | "
                     f"{r['dtype']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {r['GB/s']:.1f} | {r['pct_copy_bw']:.0f}% | "
                     f"{r['MB']:.0f} | {timing_cells(r)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
