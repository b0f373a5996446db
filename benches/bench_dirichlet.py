"""Benchmark of the Data-Impression target ops: exml_fast vs the reference.

1. dirichlet_targets: one Dirichlet sample per row of beta * class_similarity(W)[y],
   at (24000, 10) (the paper's MNIST DI set, LeNet-5 head) and (1216, 1000)
   (an ImageNet-size batch, ResNet head), beta 10 (ExML) and 0.1 (peaky).
   exml_fast (Philox + Marsaglia-Tsang kernel) vs the reference
   (torch._sample_dirichlet, what torch.distributions.Dirichlet.sample calls)
   vs torch.compile(reference) when it compiles. Rows/s and gamma draws/s.
2. class_similarity forward + backward at K = 10, H = 84 (LeNet-5) and
   K = 1000, H = 512 (ResNet): exml_fast vs reference vs torch.compile(reference).

Every ratio is measured in this one run. Usage:
    python benches/bench_dirichlet.py [--device cpu|cuda] [--quick] [--no-compile]
        [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from benchlib import (TIMING_HEADER, command_line, env_markdown, environment, op_parser, parse_op_args, record,
                      time_fn, timing_cells)

from exml_fast.ops.class_similarity import class_similarity
from exml_fast.ops.dirichlet import dirichlet_targets
from exml_fast.reference.class_similarity import class_similarity as ref_class_similarity
from exml_fast.reference import dirichlet as ref

DIRICHLET_SHAPES = [(24000, 10, 84), (1216, 1000, 512)]  # (B, K, H of the head)
#: On a GPU: the MNIST DI set and 32768 rows of 1000 classes (reads and writes 262 MB per call).
GPU_DIRICHLET_SHAPES = [(24000, 10, 84), (32768, 1000, 512)]
BETAS = [10.0, 0.1]
SIM_SHAPES = [(10, 84), (1000, 512)]


def try_compile(fn, probe):
    """torch.compile(fn), or (None, why) when it fails to compile or run."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=False)
    try:
        probe(compiled)
    except Exception as e:  # noqa: BLE001  (reported in the output)
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return compiled, ""


def bench_dirichlet(device, *, use_compile, min_run_time, copy_bw, shapes=DIRICHLET_SHAPES):
    """GB/s counts reading the concentrations and writing the sample (2 B K floats)."""
    rows = []
    for b, k, h in shapes:
        g0 = torch.Generator().manual_seed(0)
        w = torch.randn(k, h, generator=g0).to(device)
        y = torch.randint(0, k, (b,), generator=g0).to(device)
        sim = ref_class_similarity(w)
        for beta in BETAS:
            conc = (beta * sim[y]).contiguous()
            gen = torch.Generator(device).manual_seed(1)
            variants = {
                "reference": lambda: ref.dirichlet_targets(conc, generator=gen),
                "exml_fast": lambda: dirichlet_targets(conc, generator=gen),
            }
            note = ""
            if use_compile:
                # A compiled region cannot take a torch.Generator: the peer a user
                # would compile is the generator-free reference.
                fn, why = try_compile(lambda c: ref.dirichlet_targets(c), lambda f: f(conc))
                if fn is None:
                    note = f"torch.compile(reference) failed: {why}"
                else:
                    variants["compile(reference)"] = lambda fn=fn: fn(conc)
            timings = {n: time_fn(f, device=device, min_run_time=min_run_time) for n, f in variants.items()}
            nbytes = 2 * conc.numel() * conc.element_size()
            for name, t in timings.items():
                sec = t.median_s
                rows.append({"B": b, "K": k, "beta": beta, "variant": name, **t.fields(),
                             "speedup_vs_reference": timings["reference"].median_s / sec,
                             "rows_per_s": b / sec, "gammas_per_s": b * k / sec, "MB": nbytes / 1e6,
                             "GB/s": nbytes / sec / 1e9, "pct_copy_bw": 100 * nbytes / sec / copy_bw})
                print(f"  ({b:5d}, {k:4d}) beta {beta:4.1f} {name:19s} {sec * 1e3:9.3f} ms  "
                      f"x{timings['reference'].median_s / sec:6.2f} vs reference  {b / sec / 1e6:7.3f} M rows/s  "
                      f"{b * k / sec / 1e6:8.2f} M gammas/s", flush=True)
            if note:
                print(f"  ({b:5d}, {k:4d}) beta {beta:4.1f} {note}")
                rows.append({"B": b, "K": k, "beta": beta, "variant": "compile(reference)",
                             "note": note})
    return rows


def bench_class_similarity(device, *, use_compile, min_run_time):
    rows = []
    for k, h in SIM_SHAPES:
        w = (torch.randn(k, h, generator=torch.Generator().manual_seed(0)) * 0.1).to(device)
        w.requires_grad_(True)
        gout = torch.randn(k, k, device=device)

        def fwd_bwd(fn):
            def step():
                out = fn(w)
                torch.autograd.grad(out, w, gout)
            return step

        variants = {"reference": fwd_bwd(ref_class_similarity), "exml_fast": fwd_bwd(class_similarity)}
        if use_compile:
            fn, why = try_compile(ref_class_similarity, lambda f: fwd_bwd(f)())
            if fn is not None:
                variants["compile(reference)"] = fwd_bwd(fn)
            else:
                print(f"  K {k}: torch.compile(reference) failed: {why}")
        timings = {n: time_fn(f, device=device, min_run_time=min_run_time) for n, f in variants.items()}
        for name, t in timings.items():
            sec = t.median_s
            rows.append({"K": k, "H": h, "variant": name, **t.fields(),
                         "speedup_vs_reference": timings["reference"].median_s / sec})
            print(f"  K {k:4d} H {h:4d} {name:19s} {sec * 1e3:9.3f} ms  "
                  f"x{timings['reference'].median_s / sec:6.2f} vs reference", flush=True)
    return rows


def to_markdown(rec: dict, command: str) -> str:
    lines = env_markdown(rec["env"], "dirichlet", command) + [
        "## dirichlet_targets (one sample per row of beta * class_similarity(W)[y])",
        "",
        "GB/s: reading the concentrations and writing the sample, against the copy bandwidth.",
        "",
        f"| B | K | beta | variant | ms | speed-up vs reference | M rows/s | M gammas/s | GB/s | % of copy bw | "
        f"{TIMING_HEADER} |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rec["dirichlet"]:
        if "note" in r:
            lines.append(f"| {r['B']} | {r['K']} | {r['beta']} | {r['variant']} | – | {r['note']} | | | | | | |")
            continue
        lines.append(f"| {r['B']} | {r['K']} | {r['beta']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {r['rows_per_s'] / 1e6:.3f} | "
                     f"{r['gammas_per_s'] / 1e6:.2f} | {r['GB/s']:.1f} | {r['pct_copy_bw']:.0f}% | "
                     f"{timing_cells(r)} |")
    lines += ["", "## class_similarity forward + backward", "",
              f"| K | H | variant | ms | speed-up vs reference | {TIMING_HEADER} |",
              "|---:|---:|---|---:|---:|---|---|"]
    for r in rec["class_similarity"]:
        lines.append(f"| {r['K']} | {r['H']} | {r['variant']} | {r['ms']:.3f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {timing_cells(r)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = op_parser(__doc__)
    args = parse_op_args(p, argv)
    min_run_time = args.min_run_time
    env = environment(args.device, "dirichlet")
    t0 = time.perf_counter()
    print("1. dirichlet_targets")
    shapes = GPU_DIRICHLET_SHAPES if args.device == "cuda" and not args.quick else DIRICHLET_SHAPES
    d_rows = bench_dirichlet(args.device, use_compile=not args.no_compile, min_run_time=min_run_time,
                             copy_bw=env["copy_bandwidth_GBps"] * 1e9, shapes=shapes)
    print("\n2. class_similarity forward + backward")
    s_rows = bench_class_similarity(args.device, use_compile=not args.no_compile,
                                    min_run_time=min_run_time)
    env["wall_s"] = time.perf_counter() - t0
    command = command_line("bench_dirichlet.py", argv)
    rec = {"env": env, "command": command, "dirichlet": d_rows, "class_similarity": s_rows}
    record(args.out, f"dirichlet_{args.device}" + ("_quick" if args.quick else ""), rec,
           to_markdown(rec, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
