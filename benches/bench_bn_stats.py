"""Benchmark of BatchNorm-statistic matching: fused exml_fast vs the reference.

1. Op level: forward + backward of bn_stats over the 20 BatchNorm-input
   activations of a CIFAR ResNet-18 (3x3 stem, no max-pool, 32x32 input), at
   batch 64 and 256; exml_fast vs the reference (mean + permute-contiguous var,
   as the public DeepInversion hook) vs torch.compile(reference), NCHW and
   channels_last, each through autograd; plus the fused kernels alone. GB/s
   counts the minimum traffic (read x forward; read x and write dx backward)
   against the machine's measured copy bandwidth.
2. Step level: one DeepInversion step (teacher forward + backward to the input,
   CE + TV + l2 + BN loss, Adam step) with the public forward hooks, with
   exml_fast.BNStatsMatcher, and with no BN loss at all.

Every ratio is measured in this one run. Usage:
    python benches/bench_bn_stats.py [--device cpu|cuda] [--batches 64 256]
        [--step-batch 64] [--no-compile] [--out benches/results]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from benchlib import (RESULTS, TIMING_HEADER, command_line, env_markdown, environment, interleaved_samples, record,
                      time_fn, timing_cells, true_median)

import exml_fast
from exml_fast import BNStatsMatcher, ops
from exml_fast import reference as ref
from exml_fast.models import resnet18_cifar
from exml_fast.ops.image_priors import image_priors
from exml_fast.reference.public.bn_hooks import deepinversion_bn_loss, deepinversion_bn_loss_hooks

# -- op level -------------------------------------------------------------------


def resnet18_bn_inputs(batch: int, device: str, channels_last: bool) -> list[torch.Tensor]:
    """The 20 BN-input activations of a CIFAR ResNet-18 on random input."""
    torch.manual_seed(0)
    model = resnet18_cifar().to(device).eval()
    acts: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: acts.append(args[0].detach()))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    assert len(acts) == 20, f"expected 20 BN inputs, got {len(acts)}"
    return [a.clone().requires_grad_(True) for a in acts]


def make_fwd_bwd(stats_fn, acts, grads):
    def step():
        outs = [stats_fn(a) for a in acts]
        total = sum((m * gm).sum() + (v * gv).sum() for (m, v), (gm, gv) in zip(outs, grads))
        torch.autograd.grad(total, acts)
    return step


def make_kernels_only(acts, grads):
    det = [a.detach() for a in acts]
    means = [torch.ops.exml_fast.bn_stats(a)[0] for a in det]

    def step():
        for a, (gm, gv), m in zip(det, grads, means):
            torch.ops.exml_fast.bn_stats(a)
            torch.ops.exml_fast._bn_stats_backward(gm, gv, a, m)
    return step


def bench_op_level(device, batches, *, use_compile, min_run_time, copy_bw):
    rows = []
    for batch in batches:
        for channels_last in (False, True):
            acts = resnet18_bn_inputs(batch, device, channels_last)
            grads = [(torch.randn(a.shape[1], device=device), torch.randn(a.shape[1], device=device))
                     for a in acts]
            nbytes = sum(a.numel() * a.element_size() for a in acts) * 3
            variants = {"reference": ref.bn_stats, "exml_fast": ops.bn_stats}
            if use_compile:
                torch._dynamo.reset()
                variants["compile(reference)"] = torch.compile(ref.bn_stats, dynamic=False)
            timings = {name: time_fn(make_fwd_bwd(fn, acts, grads), device=device, min_run_time=min_run_time)
                       for name, fn in variants.items()}
            # The fused kernels alone, without autograd or its fresh gradient buffers
            # (on CPU those cost first-touch page faults that every variant pays).
            timings["exml_fast kernels only"] = time_fn(make_kernels_only(acts, grads), device=device,
                                                       min_run_time=min_run_time)
            layout = "channels_last" if channels_last else "NCHW"
            ref_s = timings["reference"].median_s
            for name, t in timings.items():
                sec = t.median_s
                rows.append({
                    "batch": batch, "layout": layout, "variant": name, **t.fields(), "MB": nbytes / 1e6,
                    "speedup_vs_reference": ref_s / sec,
                    "GB/s": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / copy_bw,
                })
                print(f"  batch {batch:4d} {layout:13s} {name:23s} {sec * 1e3:9.2f} ms "
                      f"[{t.fields()['ms_min']:.2f}-{t.fields()['ms_max']:.2f}, {t.rounds} x {t.inner}]  "
                      f"x{ref_s / sec:6.2f} vs reference  "
                      f"{nbytes / sec / 1e9:7.2f} GB/s ({100 * nbytes / sec / copy_bw:5.1f}% of copy)",
                      flush=True)
            del acts
    return rows


# -- step level -------------------------------------------------------------------


def bench_step_level(device, batch, *, min_run_time):
    torch.manual_seed(0)
    teacher = resnet18_cifar().to(device)
    teacher.train()
    with torch.no_grad():  # give running statistics non-trivial values
        for _ in range(2):
            teacher(torch.randn(batch, 3, 32, 32, device=device))
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    y = torch.arange(batch, device=device) % 10
    x = torch.randn(batch, 3, 32, 32, device=device, requires_grad=True)
    opt = torch.optim.Adam([x], lr=0.05, betas=(0.5, 0.9))
    g = torch.Generator(device="cpu").manual_seed(0)

    def inputs():
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        xi = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        return torch.flip(xi, dims=(3,)) if torch.rand((), generator=g) < 0.5 else xi

    def step(bn_term):
        opt.zero_grad(set_to_none=True)
        logits = teacher(inputs())
        priors = image_priors(x)  # (tv_l1, tv_l2, blur, l2 = ||x||^2), one fused pass
        loss = F.cross_entropy(logits, y) + 2.5e-5 * priors[1] + 3e-8 * priors[3].sqrt()
        if bn_term is not None:
            loss = loss + 0.01 * bn_term()
        loss.backward()
        opt.step()

    matcher = BNStatsMatcher(teacher, form="l2", first_bn_multiplier=10.0)

    def with_reference_hooks():
        hooks = deepinversion_bn_loss_hooks(teacher)
        try:
            step(lambda: deepinversion_bn_loss(hooks, 10.0))
        finally:
            for h in hooks:
                h.remove()

    def with_matcher():
        with matcher:
            step(matcher.loss)

    variants = {"no BN loss": lambda: step(None), "reference hooks": with_reference_hooks,
                "exml_fast": with_matcher}
    samples = interleaved_samples(variants, device=device, min_run_time=min_run_time)
    base = samples["no BN loss"]
    rows = []
    for name, vals in samples.items():
        # Overhead and share from same-round pairs: robust to a machine whose speed drifts.
        ratios = [v / b for v, b in zip(vals, base)]
        overhead = 100 * (true_median(ratios) - 1)
        share = 100 * (1 - true_median([b / v for v, b in zip(vals, base)]))
        rows.append({"batch": batch, "variant": name, **samples.fields(name), "overhead_pct_vs_no_bn": overhead,
                     "overhead_pct_min": 100 * (min(ratios) - 1), "overhead_pct_max": 100 * (max(ratios) - 1),
                     "bn_share_pct": share})
        print(f"  batch {batch:4d} {name:16s} {true_median(vals) * 1e3:9.1f} ms/step (median of "
              f"{len(vals)} rounds x {samples.inner[name]})  BN loss adds {overhead:6.1f}% "
              f"[{100 * (min(ratios) - 1):.1f}-{100 * (max(ratios) - 1):.1f}], {share:.1f}% of the step",
              flush=True)
    return rows


# -- main -------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256],
                   help="batches of the op level (ResNet-18's BN inputs move 472 MB per call at 64, 1.9 GB at 256)")
    p.add_argument("--step-batch", type=int, default=None,
                   help="batch of the DeepInversion step (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timed runs per measurement (default 2 on CPU, 1 on CUDA)")
    p.add_argument("--step-run-time", type=float, default=None,
                   help="seconds of timed steps per variant (default 20 on CPU, 3 on CUDA)")
    p.add_argument("--out", default=str(RESULTS),
                   help="directory for the recorded run ('' to not record)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if not exml_fast.has_ops():
        p.error("exml_fast._C is not built: the benchmark would time the reference twice")
    min_run_time = args.min_run_time or (2.0 if args.device == "cpu" else 1.0)
    step_batch = args.step_batch or (64 if args.device == "cpu" else 256)

    env = environment(args.device, "bn_stats")
    copy_bw = env["copy_bandwidth_GBps"] * 1e9

    t0 = time.perf_counter()
    print("1. op level: bn_stats forward + backward over the 20 BN inputs of CIFAR ResNet-18")
    op_rows = bench_op_level(args.device, args.batches, use_compile=not args.no_compile,
                             min_run_time=min_run_time, copy_bw=copy_bw)
    print(f"\n2. step level: one DeepInversion step on CIFAR ResNet-18, batch {step_batch}")
    step_rows = bench_step_level(args.device, step_batch, min_run_time=args.step_run_time
                                 or (20.0 if args.device == "cpu" else 3.0))
    env["wall_s"] = time.perf_counter() - t0

    rec = {"env": env, "command": command_line("bench_bn_stats.py", argv), "op_level": op_rows,
           "step_level": step_rows}
    record(args.out, f"bn_stats_{args.device}", rec, to_markdown(rec))
    return 0


def to_markdown(rec: dict) -> str:
    e = rec["env"]
    lines = env_markdown(e, "bn_stats", rec["command"]) + [
        "## Op level: forward + backward over the 20 BN inputs of CIFAR ResNet-18",
        "",
        "Each variant runs through autograd (`torch.autograd.grad`), which allocates a",
        "fresh gradient buffer per activation; `exml_fast kernels only` calls the fused",
        "forward and backward ops directly, and is what the GB/s column measures best.",
        "",
        f"| batch | layout | variant | ms | speed-up vs reference | GB/s | % of copy bw | MB moved | {TIMING_HEADER} |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["op_level"]:
        lines.append(f"| {r['batch']} | {r['layout']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {r['GB/s']:.1f} | {r['pct_copy_bw']:.0f}% | "
                     f"{r['MB']:.0f} | {timing_cells(r, '.2f')} |")
    lines += [
        "",
        "## Step level: one DeepInversion step (CE + TV + l2 + BN loss, Adam)",
        "",
        "BN loss adds: median over rounds of (step with it / step without it, same round) − 1 [min–max]; "
        "its share of the step: 1 − median of (step without it / step with it).",
        "",
        f"| batch | variant | ms/step (median) | rounds | BN loss adds | share of the step | {TIMING_HEADER} |",
        "|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["step_level"]:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['ms']:.1f} | {r['rounds']} | "
                     f"{r['overhead_pct_vs_no_bn']:.1f}% [{r['overhead_pct_min']:.1f}–{r['overhead_pct_max']:.1f}] | "
                     f"{r['bn_share_pct']:.1f}% | {timing_cells(r, '.1f')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
