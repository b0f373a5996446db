"""Benchmark of the Ex-Model Distillation loss: fused exml_fast vs the reference.

Forward + backward (through autograd, `torch.autograd.grad` w.r.t. the
student's logits) of `ed_loss` at the issue's sizes, target_mode "slice",
normalize "center" (the reference code's defaults), teachers given full width
(B, C) as models output them:
- (5000, 10): split MNIST, 2nd experience of 5 classes each: expert 5..9, previous model 0..4;
- (1216, 1000): ImageNet-sized head, expert 900..999 (the newest 100 classes), previous 0..899.
Variants: exml_fast, the reference (plain PyTorch as the public code writes
it), torch.compile(reference), and the fused forward kernel alone. GB/s counts
the minimum traffic (read logits, expert and prev logits; write the gradient)
against the machine's copy bandwidth.

Usage:
    python benches/bench_ed_loss.py [--device cpu|cuda] [--quick] [--no-compile]
        [--out benches/results]
`bench_rows(device, sizes, min_run_time=..., use_compile=...)` is importable.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import exml_fast
from exml_fast.ops.ed_loss import ed_class_table, ed_loss
from exml_fast.reference.ed_loss import ed_loss as ref_ed_loss

from benchlib import RESULTS, env_markdown, environment, median_seconds, record

# (B, C, expert classes, previous classes)
SIZES = {
    "5000x10": (5000, 10, (5, 10), (0, 5)),
    "1216x1000": (1216, 1000, (900, 1000), (0, 900)),
}


def _inputs(device, b, c, eset, pset):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(b, c, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, c, (b,), generator=g).to(device)
    kw = dict(expert_logits=torch.randn(b, c, generator=g).to(device),
              expert_classes=torch.arange(*eset, device=device),
              prev_logits=torch.randn(b, c, generator=g).to(device),
              prev_classes=torch.arange(*pset, device=device))
    return z, y, kw


def bench_rows(device: str, sizes=tuple(SIZES), *, min_run_time: float,
               use_compile: bool, copy_bw: float | None = None) -> list[dict]:
    """Forward + backward timings of every variant at each size (rows of dicts)."""
    rows = []
    for size in sizes:
        b, c, eset, pset = SIZES[size]
        z, y, kw = _inputs(device, b, c, eset, pset)

        def fwd_bwd(fn):
            def step():
                loss = fn(z, y, **kw)
                torch.autograd.grad(loss, z)
            return step

        variants = {"reference": fwd_bwd(ref_ed_loss), "exml_fast": fwd_bwd(ed_loss)}
        if use_compile:
            torch._dynamo.reset()
            variants["compile(reference)"] = fwd_bwd(torch.compile(ref_ed_loss, dynamic=False))
        table = ed_class_table(kw["expert_classes"], kw["prev_classes"], c, device=device)
        zd = z.detach()
        variants["exml_fast kernel only"] = lambda: torch.ops.exml_fast.ed_loss(
            zd, y, kw["expert_logits"], kw["prev_logits"], table, None, None, "slice",
            "center", 1.0, True)
        times = {name: median_seconds(fn, min_run_time=min_run_time)
                 for name, fn in variants.items()}
        nbytes = 4 * b * c * 4  # read z, expert, prev; write the gradient (fp32)
        for name, sec in times.items():
            row = {"size": size, "B": b, "C": c, "expert": f"{eset[0]}..{eset[1] - 1}",
                   "prev": f"{pset[0]}..{pset[1] - 1}", "variant": name, "ms": sec * 1e3,
                   "speedup_vs_reference": times["reference"] / sec, "GB/s": nbytes / sec / 1e9}
            if copy_bw:
                row["pct_copy_bw"] = 100 * nbytes / sec / copy_bw
            rows.append(row)
            print(f"  {size:10s} {name:22s} {sec * 1e3:9.3f} ms  "
                  f"x{times['reference'] / sec:6.2f} vs reference  {nbytes / sec / 1e9:7.2f} GB/s",
                  flush=True)
    return rows


def to_markdown(rec: dict) -> str:
    e = rec["env"]
    lines = env_markdown(e, "ed_loss", rec["command"]) + [
        "## Forward + backward of ed_loss (slice, center, full-width teachers)",
        "",
        "| size | expert | prev | variant | ms | speed-up vs reference | GB/s | % of copy bw |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rec["rows"]:
        lines.append(f"| {r['size']} | {r['expert']} | {r['prev']} | {r['variant']} | "
                     f"{r['ms']:.3f} | {r['speedup_vs_reference']:.2f}x | {r['GB/s']:.2f} | "
                     f"{r.get('pct_copy_bw', float('nan')):.1f}% |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="short smoke run (0.2 s per timing)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--min-run-time", type=float, default=None)
    p.add_argument("--out", default=str(RESULTS),
                   help="directory for the recorded run ('' to not record)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if not exml_fast.has_ops():
        p.error("exml_fast._C is not built: the benchmark would time the reference twice")
    min_run_time = args.min_run_time or (0.2 if args.quick else 2.0)
    env = environment(args.device, "ed_loss")
    t0 = time.perf_counter()
    rows = bench_rows(args.device, min_run_time=min_run_time, use_compile=not args.no_compile,
                      copy_bw=env["copy_bandwidth_GBps"] * 1e9)
    env["wall_s"] = time.perf_counter() - t0
    command = "python benches/bench_ed_loss.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rec = {"env": env, "command": command.strip(), "rows": rows}
    record(args.out, f"ed_loss_{args.device}", rec, to_markdown(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
