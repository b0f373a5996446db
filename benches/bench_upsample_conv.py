"""Benchmark of upsample2x_conv3x3 (nearest 2x upsampling + 3x3 convolution as four 2x2 convolutions) vs the
reference F.interpolate + F.conv2d, and of what it buys SKD's Table IV generator.

Ops: the two upsample + convolution pairs of the "skd-small" generator at 32 px ((B, 128, 8, 8) -> 128 and
(B, 128, 16, 16) -> 64 channels) and of "skd-narrow" (a quarter of the widths), forward and forward + backward,
each against the reference (the peer: what the generator's nn.Upsample and nn.Conv2d layers run) and
torch.compile of it. Then the whole "skd-small" generator (forward; forward + backward), with
SKDGenerator.fuse_upsample_conv on ("exml_fast") and off ("reference"), and one explore step of a DFAD fit
(five student steps, each drawing a batch, then the generator's step) at the dfkd-mnist paper budget's batch.
Calls are timed round-robin; each speed-up is the median of per-round ratios. ``--precision bf16`` (or fp16)
runs every case, the reference's included, under ``torch.autocast`` of that dtype, with the op-level inputs
in it and the weights in float32, as an autocast forward hands them over (records ``..._bf16``).

Usage:
    python benches/bench_upsample_conv.py [--device cpu|cuda] [--threads N] [--quick] [--no-compile]
        [--batch B] [--precision fp32|bf16|fp16] [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, interleaved_samples, op_parser,
                      parse_op_args, record, timing_cells, true_median)

from exml_fast._utils.dtypes import PRECISIONS, autocast_to
from exml_fast.models import LeNet5, LeNet5Half
from exml_fast.models.generators import SKDGenerator, build_generator
from exml_fast.ops.upsample_conv import upsample2x_conv3x3
from exml_fast.reference.upsample_conv import upsample2x_conv3x3 as reference
from exml_fast.synth import GenerativeSynthesizer

#: (generator, input channels, input side, output channels) of Table IV's pairs at 32 px.
PAIRS = [("skd-small", 128, 8, 128), ("skd-small", 128, 16, 64), ("skd-narrow", 32, 8, 32),
         ("skd-narrow", 32, 16, 16)]


def _under(args, fn):
    """fn, run under the --precision autocast."""
    def run():
        with autocast_to(torch.device(args.device).type, PRECISIONS[args.precision]):
            return fn()
    return run


def _rows(samples) -> list[dict]:
    ref = samples["reference"]
    rows = []
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(ref, s, strict=True)]
        rows.append({"variant": name, **samples.fields(name), "speedup_vs_reference": true_median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios)})
    return rows


def bench_pair(pair, direction: str, args) -> dict:
    arch, cin, side, cout = pair
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cin, side, side, generator=g).to(args.device, PRECISIONS[args.precision])
    w = (torch.randn(cout, cin, 3, 3, generator=g) * (cin * 9) ** -0.5).to(args.device)
    b = torch.randn(cout, generator=g).to(args.device)
    gy = torch.randn(args.batch, cout, 2 * side, 2 * side, generator=g).to(args.device,
                                                                            PRECISIONS[args.precision])
    if direction == "forward":
        def wrap(fn):
            def run():
                with torch.no_grad():
                    fn(x, w, b)
            return run
    else:
        leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]

        def wrap(fn):
            return lambda: torch.autograd.grad(fn(*leaves), leaves, gy)
    variants = {"reference": _under(args, wrap(reference)), "exml_fast": _under(args, wrap(upsample2x_conv3x3))}
    if not args.no_compile:
        torch._dynamo.reset()
        variants["compile(reference)"] = _under(args, wrap(torch.compile(reference)))
    samples = interleaved_samples(variants, device=args.device, min_run_time=args.min_run_time)
    return {"case": f"{arch} ({args.batch}, {cin}, {side}, {side}) -> {cout}", "direction": direction,
            "rows": _rows(samples)}


def _fused(flag: bool, fn):
    def run():
        before = SKDGenerator.fuse_upsample_conv
        SKDGenerator.fuse_upsample_conv = flag
        try:
            fn()
        finally:
            SKDGenerator.fuse_upsample_conv = before
    return run


def bench_generator(direction: str, args) -> dict:
    torch.manual_seed(0)
    gen = build_generator("skd-small", (1, 32, 32)).to(args.device).train()
    z = torch.randn(args.batch, gen.latent_dim, device=args.device)
    if direction == "forward":
        def fn():
            with torch.no_grad():
                gen(z)
    else:
        params = list(gen.parameters())

        def fn():
            torch.autograd.grad(gen(z).float().square().mean(), params)
    fn = _under(args, fn)
    samples = interleaved_samples({"reference": _fused(False, fn), "exml_fast": _fused(True, fn)},
                                  device=args.device, min_run_time=args.min_run_time)
    return {"case": f"skd-small generator, batch {args.batch}", "direction": direction, "rows": _rows(samples)}


def bench_fit_step(args) -> dict:
    torch.manual_seed(0)
    teacher = LeNet5(num_classes=10, in_channels=1).to(args.device).eval()
    synth = GenerativeSynthesizer(teacher, input_shape=(1, 32, 32), mean=(0.1307,), std=(0.3081,), preset="dfad",
                                  generator_arch="skd-small", student=LeNet5Half(num_classes=10, in_channels=1),
                                  device=args.device)

    def fn():
        synth.fit(1, batch_size=args.batch, generator=0, progress=False)
    fn = _under(args, fn)
    samples = interleaved_samples({"reference": _fused(False, fn), "exml_fast": _fused(True, fn)},
                                  device=args.device, min_run_time=args.min_run_time, min_rounds=3)
    return {"case": f"DFAD fit step (5 student steps + 1 generator step), skd-small, batch {args.batch}",
            "direction": "fit step", "rows": _rows(samples)}


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "upsample2x_conv3x3", rec["command"])
    precision = rec.get("precision", "fp32")
    if precision != "fp32":
        lines += [f"Every case, the reference's included, ran under `torch.autocast` of {precision}: the op-level "
                  f"inputs in {precision}, the weights in float32, as an autocast forward hands them over.", ""]
    lines += ["\"reference\": `F.interpolate` (nearest, 2x) then `F.conv2d`, as the generator's layers run it; "
              "\"exml_fast\": `upsample2x_conv3x3` (for the generator and the fit step: "
              "`SKDGenerator.fuse_upsample_conv` on). \"speed-up\" is the median of per-round time ratios "
              "reference / variant [min–max] (> 1: faster than the reference).", "",
              f"| case | direction | variant | ms | speed-up vs reference | {TIMING_HEADER} |",
              "|---|---|---|---:|---:|---|---|"]
    for key in ("op_level", "generator"):
        for row in rec[key]:
            lines.append(f"| {row['case']} | {row['direction']} | {row['variant']} | {row['ms']:.2f} | "
                         f"{row['speedup_vs_reference']:.2f}x [{row['speedup_min']:.2f}–{row['speedup_max']:.2f}] | "
                         f"{timing_cells(row, '.2f')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = op_parser(__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=None, help="batch of every case (default 256; 32 with --quick)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                   help="run every case under torch.autocast of this dtype (default fp32: no autocast)")
    args = parse_op_args(p, argv)
    if args.batch is None:
        args.batch = 32 if args.quick else 256
    t0 = time.perf_counter()
    env = environment(args.device, "upsample2x_conv3x3")

    def show(r):
        print(f"  {r['direction']} {r['case']}: " + ", ".join(
            f"{row['variant']} {row['ms']:.2f} ms ({row['speedup_vs_reference']:.2f}x)" for row in r["rows"]),
            flush=True)
        return r

    ops = [show(bench_pair(pair, d, args)) for pair in PAIRS for d in ("forward", "forward+backward")]
    gens = [show(bench_generator(d, args)) for d in ("forward", "forward+backward")] + [show(bench_fit_step(args))]
    env["wall_s"] = time.perf_counter() - t0
    flat = {key: [{**row, "case": r["case"], "direction": r["direction"]} for r in rs for row in r["rows"]]
            for key, rs in (("op_level", ops), ("generator", gens))}
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line("bench_upsample_conv.py", argv), "precision": args.precision,
           "op_level": flat["op_level"],
           "generator": flat["generator"]}
    tag = "" if args.precision == "fp32" else f"_{args.precision}"
    record(args.out, f"upsample_conv_{args.device}{'_quick' if args.quick else ''}{tag}{args.suffix}", rec,
           to_markdown(rec))


if __name__ == "__main__":
    main()
