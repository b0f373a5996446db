"""Benchmark of a generator fit step in float32 and under bfloat16 autocast (GenerativeSynthesizer's precision).

Cases: DAFL's and DFAD's public recipes on MNIST's shapes, as `reproduce dfkd-mnist --recipe public` runs
them (their generators, the ReLU LeNet-5 teacher and LeNet-5-Half student, batch 512): one DAFL step is a
generator step and the student's KD step on its samples; one DFAD step is five student steps, each drawing a
batch, then the generator's step. The networks are untrained (the cost of a step does not depend on the
weights). Each timed call is one `fit` of `--steps` steps (a fit's set-up, the student's clone and the
optimisers, is in it once), reported per step. The peer is the same fit in float32, the precision the
papers' code runs; "bf16" is `precision="bf16"` (the networks' forwards and backward under
`torch.autocast`, the losses and all state in float32), which pays off where the CPU has bfloat16 matrix
units (AMX) or on a GPU. Calls are timed round-robin; each speed-up is the median of per-round ratios
fp32 / bf16.

Usage:
    python benches/bench_generator_precision.py [--device cpu|cuda] [--threads N] [--quick]
        [--batch B] [--steps K] [--presets dafl dfad] [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (command_line, env_markdown, environment, interleaved_samples, op_parser,
                      parse_op_args, record, timing_cells, true_median)

from exml_fast.models import build_model
from exml_fast.synth import GenerativeSynthesizer

PRESETS = ("dafl", "dfad")


def _synth(preset: str, precision: str, args) -> GenerativeSynthesizer:
    torch.manual_seed(0)
    teacher = build_model("lenet5_dafl", num_classes=10, in_channels=1).to(args.device).eval()
    student = build_model("lenet5_half_dafl", num_classes=10, in_channels=1) if preset == "dafl" else None
    return GenerativeSynthesizer(teacher, input_shape=(1, 32, 32), mean=(0.1307,), std=(0.3081,), preset=preset,
                                 student=student, device=args.device, precision=precision,
                                 feature_layer="features.7" if preset == "dafl" else None)


def bench_preset(preset: str, args) -> dict:
    variants = {}
    for precision in ("fp32", "bf16"):
        synth = _synth(preset, precision, args)

        def step(synth=synth):
            synth.fit(args.steps, batch_size=args.batch, generator=0, progress=False)
        variants[precision] = step
    samples = interleaved_samples(variants, device=args.device, min_run_time=args.min_run_time, min_rounds=3)
    rows = []
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(samples["fp32"], s, strict=True)]
        per_call = samples.fields(name)
        per_step = {k: per_call[k] / args.steps for k in ("ms", "ms_min", "ms_max")}
        rows.append({"variant": name, **per_call, **per_step, "steps_per_call": args.steps,
                     "speedup_vs_fp32": true_median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)})
    return {"case": f"{preset} fit step, batch {args.batch}", "steps_per_call": args.steps, "rows": rows}


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "generator fit precision", rec["command"])
    lines += [__doc__.split("\n\n")[1].replace("\n", " "), "",
              "| case | precision | ms a step | speed-up vs fp32 | min–max ms a step | rounds × calls |",
              "|---|---|---:|---:|---|---|"]
    for r in rec["results"]:
        for row in r["rows"]:
            lines.append(f"| {r['case']} | {row['variant']} | {row['ms']:.1f} | {row['speedup_vs_fp32']:.2f}x "
                         f"[{row['speedup_min']:.2f}–{row['speedup_max']:.2f}] | {timing_cells(row, '.1f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = op_parser(__doc__.split("\n\n")[0], quick_help="short smoke run (batch 16, 0.2 s per measurement)")
    p.add_argument("--batch", type=int, default=None, help="samples per step (default 512, DAFL's and DFAD's; "
                                                           "16 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="fit steps per timed call (default 4; 1 with --quick)")
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    args = parse_op_args(p, argv)
    if args.batch is None:
        args.batch = 16 if args.quick else 512
    if args.steps is None:
        args.steps = 1 if args.quick else 4
    if args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    t0 = time.perf_counter()
    env = environment(args.device, "generator fit precision")
    results = []
    for preset in args.presets:
        r = bench_preset(preset, args)
        print(f"  {r['case']}: " + ", ".join(f"{row['variant']} {row['ms']:.1f} ms ({row['speedup_vs_fp32']:.2f}x)"
                                             for row in r["rows"]), flush=True)
        results.append(r)
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line("bench_generator_precision.py", argv), "results": results}
    record(args.out, f"generator_precision_{args.device}{'_quick' if args.quick else ''}{args.suffix}", rec,
           to_markdown(rec))


if __name__ == "__main__":
    main()
