"""Benchmark of the row-wise distillation losses: fused exml_fast vs the reference.

Forward + backward through autograd (`torch.autograd.grad`) of each loss at the
logit shapes of the workloads that use them:
- (5000, 10): a 5000-sample synthetic buffer of a 10-class expert (ExML, MNIST/CIFAR-10);
- (1216, 1000): one DeepInversion ImageNet batch (1216 images, 1000 classes).
Ops: soft-target cross-entropy at T = 20 (Data Impressions; grad w.r.t. the
logits), KD at T = 2 (grad w.r.t. the student), JS divergence at T = 3 with
clamp (0.01, 0.99) (Adaptive DeepInversion; grads w.r.t. both logits), and
the Ex-Model Distillation loss (slice targets, centred; grad w.r.t. the student).
Variants: exml_fast, the reference (exml_fast.reference: the plain composite a
user would write, e.g. `-(t * F.log_softmax(x / T, 1)).sum(1).mean()` for the
soft-target CE, `F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1),
reduction="batchmean") * T**2` for KD) and torch.compile(reference), timed
round-robin in one run; the ratios are medians of same-round ratios, robust to
a shared machine's drift. GB/s counts the minimum traffic (forward reads the
inputs; backward reads them again and writes the gradients) against the
measured copy bandwidth.

On CPU the recorded header says whether the machine has AVX-512 and which ISA
caps were set: run once as is and once as on a CPU without AVX-512,

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 EXML_FAST_CPU_ISA=avx2 \
        python benches/bench_soft_target_losses.py --device cpu --suffix _avx2

Usage:
    python benches/bench_soft_target_losses.py [--device cpu|cuda] [--quick] [--no-compile]
        [--dtype float32] [--threads N] [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, interleaved_samples, op_parser,
                      parse_op_args, record, timing_cells, true_median)

from exml_fast.ops import soft_target_losses as fused
from exml_fast.ops.ed_loss import ed_loss as fused_ed_loss
from exml_fast.reference import soft_target_losses as ref
from exml_fast.reference.ed_loss import ed_loss as ref_ed_loss

SIZES = [(5000, 10), (1216, 1000)]
#: On a GPU: the ImageNet batch, and 16384 rows of 1000 classes (65.5 MB a tensor; the soft-target CE moves
#: 328 MB per call, KD 328 MB, JS 393 MB).
GPU_SIZES = [(1216, 1000), (16384, 1000)]


@dataclass
class OpSpec:
    """One benchmarked loss: `make(batch, classes, device, dtype)` returns the
    input tensors (those to differentiate have requires_grad); `fused` and
    `reference` map them to a scalar loss."""

    name: str
    make: Callable[..., tuple]
    fused: Callable[..., torch.Tensor]
    reference: Callable[..., torch.Tensor]


def _logits(batch, classes, device, dtype, gen, scale=3.0):
    return (torch.randn(batch, classes, generator=gen) * scale).to(device=device, dtype=dtype)


def make_soft_ce(batch, classes, device, dtype):
    g = torch.Generator().manual_seed(0)
    logits = _logits(batch, classes, device, dtype, g).requires_grad_(True)
    target = torch.distributions.Dirichlet(torch.full((classes,), 0.5)).sample((batch,))
    return logits, target.to(device=device, dtype=dtype)


def make_kd(batch, classes, device, dtype):
    g = torch.Generator().manual_seed(1)
    return (_logits(batch, classes, device, dtype, g).requires_grad_(True),
            _logits(batch, classes, device, dtype, g))


def make_js(batch, classes, device, dtype):
    g = torch.Generator().manual_seed(2)
    return (_logits(batch, classes, device, dtype, g).requires_grad_(True),
            _logits(batch, classes, device, dtype, g).requires_grad_(True))


OPS: list[OpSpec] = [
    OpSpec("soft_target_cross_entropy T=20", make_soft_ce,
           lambda z, t: fused.soft_target_cross_entropy(z, t, temperature=20.0),
           lambda z, t: ref.soft_target_cross_entropy(z, t, temperature=20.0)),
    OpSpec("kd_loss T=2", make_kd,
           lambda s, t: fused.kd_loss(s, t, temperature=2.0),
           lambda s, t: ref.kd_loss(s, t, temperature=2.0)),
    OpSpec("js_divergence T=3 clamp(0.01,0.99)", make_js,
           lambda a, b: fused.js_divergence(a, b, temperature=3.0, clamp=(0.01, 0.99)),
           lambda a, b: ref.js_divergence(a, b, temperature=3.0, clamp=(0.01, 0.99))),
]


def make_ed(batch, classes, device, dtype):
    """Ex-Model Distillation at a later experience: the newest classes come from the
    expert, the rest from the previous model (5000x10: split MNIST's 2nd experience,
    expert 5..9 / previous 0..4; 1216x1000: expert 900..999 / previous 0..899);
    teachers full width (B, C) as models output them."""
    g = torch.Generator().manual_seed(3)
    split = classes // 2 if classes <= 10 else classes - classes // 10
    return (_logits(batch, classes, device, dtype, g, scale=1.0).requires_grad_(True),
            torch.randint(0, classes, (batch,), generator=g).to(device),
            _logits(batch, classes, device, dtype, g, scale=1.0),
            _logits(batch, classes, device, dtype, g, scale=1.0),
            torch.arange(split, classes, device=device), torch.arange(0, split, device=device))


def _ed(impl):
    return lambda z, y, e, p, ec, pc: impl(z, y, expert_logits=e, expert_classes=ec,
                                           prev_logits=p, prev_classes=pc,
                                           target_mode="slice", normalize="center")


# The Ex-Model Distillation loss, slice targets, centred (the reference code's defaults).
EXTRA_OPS: list[OpSpec] = [OpSpec("ed_loss slice/center", make_ed, _ed(fused_ed_loss),
                                  _ed(ref_ed_loss))]


def fwd_bwd(loss_fn, inputs):
    wrt = [t for t in inputs if t.requires_grad]

    def step():
        torch.autograd.grad(loss_fn(*inputs), wrt)
    return step


def traffic_bytes(inputs) -> int:
    """Forward reads every input; backward reads them again and writes each gradient."""
    n = sum(t.numel() * t.element_size() for t in inputs)
    grads = sum(t.numel() * t.element_size() for t in inputs if t.requires_grad)
    return 2 * n + grads


def run(device, dtype, *, use_compile, min_run_time, copy_bw, ops, sizes=SIZES):
    rows = []
    for spec in ops:
        for batch, classes in sizes:
            inputs = spec.make(batch, classes, device, dtype)
            variants = {"reference": fwd_bwd(spec.reference, inputs),
                        "exml_fast": fwd_bwd(spec.fused, inputs)}
            if use_compile:
                torch._dynamo.reset()
                variants["compile(reference)"] = fwd_bwd(
                    torch.compile(spec.reference, dynamic=False), inputs)
                variants["compile(reference)"]()  # compile outside the timed rounds
            samples = interleaved_samples(variants, device=device, min_run_time=min_run_time)
            nbytes = traffic_bytes(inputs)
            ours = samples["exml_fast"]
            for name, vals in samples.items():
                sec = true_median(vals)
                # exml_fast's speed-up over this variant, from same-round pairs.
                ratios = [v / o for v, o in zip(vals, ours)]
                speedup = true_median(ratios)
                rows.append({"op": spec.name, "batch": batch, "classes": classes, "variant": name,
                             **samples.fields(name), "MB": nbytes / 1e6, "exml_fast_speedup": speedup,
                             "exml_fast_speedup_min": min(ratios), "exml_fast_speedup_max": max(ratios),
                             "GB/s": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / copy_bw})
                print(f"  {spec.name:36s} ({batch:4d}, {classes:4d}) {name:19s} "
                      f"{sec * 1e3:8.3f} ms  exml_fast x{speedup:6.2f} faster  "
                      f"{nbytes / sec / 1e9:6.2f} GB/s ({100 * nbytes / sec / copy_bw:5.1f}% of copy)",
                      flush=True)
    return rows


def to_markdown(rec: dict, command: str) -> str:
    lines = env_markdown(rec["env"], "soft_target_losses", command) + [
        f"Forward + backward through autograd, dtype {rec['dtype']}. `reference` is the plain",
        "composite a user would write (soft-target CE: `-(t * F.log_softmax(x / T, 1)).sum(1).mean()`;",
        "KD: `F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction=\"batchmean\") * T**2`;",
        "JS and ED: exml_fast.reference's), `compile(reference)` torch.compile of it. `exml_fast",
        "faster`: median over rounds of (variant time / exml_fast time, same round) [min–max].",
        "",
        f"| op | (B, K) | variant | ms | exml_fast faster | GB/s | % of copy bw | MB moved | {TIMING_HEADER} |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["rows"]:
        lines.append(f"| {r['op']} | ({r['batch']}, {r['classes']}) | {r['variant']} | "
                     f"{r['ms']:.3f} | {r['exml_fast_speedup']:.2f}x [{r['exml_fast_speedup_min']:.2f}–"
                     f"{r['exml_fast_speedup_max']:.2f}] | {r['GB/s']:.2f} | "
                     f"{r['pct_copy_bw']:.1f}% | {r['MB']:.1f} | {timing_cells(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = op_parser(__doc__, quick_help="short smoke run (0.2 s per variant)",
                  default_run_time="2 s on CPU, 1 s on CUDA")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    args = parse_op_args(p, argv, cpu_run_time=2.0)
    min_run_time = args.min_run_time
    dtype = getattr(torch, args.dtype)

    env = environment(args.device, "soft_target_losses")
    t0 = time.perf_counter()
    rows = run(args.device, dtype, use_compile=not args.no_compile, min_run_time=min_run_time,
               copy_bw=env["copy_bandwidth_GBps"] * 1e9, ops=OPS + EXTRA_OPS,
               sizes=GPU_SIZES if args.device == "cuda" and not args.quick else SIZES)
    env["wall_s"] = time.perf_counter() - t0
    command = command_line("bench_soft_target_losses.py", argv)
    rec = {"env": env, "command": command, "dtype": args.dtype, "rows": rows}
    stem = f"soft_target_losses_{args.device}{args.suffix}" + ("_quick" if args.quick else "")
    record(args.out, stem, rec, to_markdown(rec, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
