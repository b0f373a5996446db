"""Benchmark of tanh: exml_fast.ops.tanh vs torch.tanh (what nn.Tanh runs), and a LeNet-5 step with it.

Ops: forward, and forward + backward through autograd, on LeNet-5's activations: (32, 6, 28, 28),
(32, 16, 10, 10), (32, 120) and (32, 84) (a distillation batch) and (256, 6, 28, 28) (a synthesis batch);
each against torch.tanh (the reference and the peer) and torch.compile of it, with the effective
bandwidth (forward: read x, write y) beside the machine's copy bandwidth. Then one SGD step of
LeNet-5 at batch 32 (a teacher forward under no_grad, the learner's forward + backward), its pooling on
exml_fast's window_pool either way (fast_pooling), with and without fast_tanh. Last, Ex-Model
Distillation's own distillation loop (ExModelDistillation on LeNet-5, the second experience: an expert and
a previous model forward and the learner's step, as benches/profile_exml.py times it) with PyTorch's
layers, with fast_pooling only, and with fast_layers (pooling and tanh), per step from the difference of a
400- and a 100-step run. Calls are timed round-robin; the speed-up is the median of per-round ratios.

Usage:
    python benches/bench_tanh.py [--device cpu|cuda] [--threads N] [--quick] [--no-compile]
        [--suffix S] [--out benches/results]
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import time

import torch
from benchlib import (TIMING_HEADER, RandomSource, StubExpert, command_line, env_markdown, environment,
                      Samples, interleaved_samples, op_parser, parse_op_args, record, timing_cells, true_median)

from exml_fast.cl.strategies import ExModelDistillation
from exml_fast.models import build_model
from exml_fast.ops.tanh import fast_tanh, tanh
from exml_fast.ops.window_pool import fast_pooling
from exml_fast.reference.tanh import tanh as ref_tanh

SHAPES = [(32, 6, 28, 28), (32, 16, 10, 10), (32, 120), (32, 84), (256, 6, 28, 28)]
#: On a GPU: the synthesis batch, and (256, 64, 56, 56): 411 MB per forward, 1 GB forward + backward.
GPU_SHAPES = [(256, 6, 28, 28), (256, 64, 56, 56)]
#: Bytes per element each direction moves at least: forward reads x and writes y; forward + backward also
#: reads the output gradient and y and writes dx.
BYTES_PER_ELEMENT = {"forward": 8, "forward+backward": 20}


def _rows(samples, nbytes: int | None = None) -> list[dict]:
    rows = []
    for name, s in samples.items():
        ratios = [a / b for a, b in zip(s, samples["exml_fast"], strict=True)]
        row = {"variant": name, **samples.fields(name), "vs_exml": true_median(ratios), "vs_exml_min": min(ratios),
               "vs_exml_max": max(ratios)}
        if nbytes is not None:
            row["MB"] = nbytes / 1e6
            row["GBps"] = nbytes / true_median(s) / 1e9
        rows.append(row)
    return rows


def bench_op(shape, direction, args) -> dict:
    x = torch.randn(*shape, device=args.device) * 2
    g = torch.randn(*shape, device=args.device)
    if direction == "forward":
        def wrap(fn):
            return lambda: fn(x)
    else:
        xg = x.clone().requires_grad_(True)

        def wrap(fn):
            return lambda: torch.autograd.grad(fn(xg), xg, g)
    variants = {"reference": wrap(ref_tanh), "exml_fast": wrap(tanh)}
    if not args.no_compile:
        torch._dynamo.reset()  # one lambda's code object for every case: past 8 recompiles dynamo runs eager
        variants["compile(reference)"] = wrap(torch.compile(ref_tanh))
    samples = interleaved_samples(variants, device=args.device, min_run_time=args.min_run_time)
    return {"shape": list(shape), "direction": direction,
            "rows": _rows(samples, BYTES_PER_ELEMENT[direction] * x.numel())}


def bench_lenet_step(args) -> dict:
    torch.manual_seed(0)
    learner, teacher = build_model("lenet5").to(args.device), build_model("lenet5").to(args.device).eval()
    x = torch.randn(32, 1, 32, 32, device=args.device)
    opt = torch.optim.SGD(learner.parameters(), lr=1e-3, momentum=0.9)

    def step(swap_tanh):
        def run():
            with fast_pooling(learner, teacher), (fast_tanh(learner, teacher) if swap_tanh else
                                                  contextlib.nullcontext()):
                with torch.no_grad():
                    target = teacher(x)
                loss = (learner(x) - target).square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return run

    samples = interleaved_samples({"reference": step(False), "exml_fast": step(True)}, device=args.device,
                                  min_run_time=args.min_run_time)
    return {"case": "LeNet-5 SGD step, batch 32 (teacher forward + learner forward/backward)",
            "rows": _rows(samples)}


def bench_ed_step(args, rounds: int) -> dict:
    pool_mod = importlib.import_module("exml_fast.ops.window_pool")
    tanh_mod = importlib.import_module("exml_fast.ops.tanh")
    dev = torch.device(args.device)
    expert = build_model("lenet5").to(dev).eval()

    def distil(k):
        ed = ExModelDistillation(build_model("lenet5"), source=RandomSource(), buffer_size=1000, iterations=k,
                                 device=dev, progress=False)
        ed.train(StubExpert(expert, [0, 1], 0))
        ed.train(StubExpert(expert, [2, 3], 1))
        return ed.history[-1]["distill_s"]

    variants = {"PyTorch layers": (False, False), "fast_pooling": (True, False), "exml_fast": (True, True)}
    k1, k2 = (20, 80) if args.quick else (100, 400)
    samples = Samples({n: [] for n in variants})
    samples.inner = {n: k2 - k1 for n in variants}  # steps per sample
    samples.timer = f"the loop's own distill_s, (t({k2} steps) - t({k1})) / {k2 - k1}"
    distil(k1)  # warm-up
    try:
        for r in range(rounds):
            names = list(variants)
            for name in names[r % 3:] + names[:r % 3]:
                pool_mod.FAST_POOLING, tanh_mod.FAST_TANH = variants[name]
                samples[name].append((distil(k2) - distil(k1)) / (k2 - k1))
    finally:
        pool_mod.FAST_POOLING = tanh_mod.FAST_TANH = True
    return {"case": "Ex-Model Distillation step (batch 32, LeNet-5 learner, expert and previous model)",
            "rows": _rows(samples)}


def _step_table(step: dict, caption: str, unit: str) -> list[str]:
    lines = ["", f"**{step['case']}**, {caption}", "", f"| variant | {unit} | time / exml_fast | {TIMING_HEADER} |",
             "|---|---:|---:|---|---|"]
    return lines + [f"| {row['variant']} | {row['ms']:.3f} | {row['vs_exml']:.2f}x [{row['vs_exml_min']:.2f}–"
                    f"{row['vs_exml_max']:.2f}] | {timing_cells(row)} |" for row in step["rows"]]


def to_markdown(rec: dict) -> str:
    lines = env_markdown(rec["env"], "tanh", rec["command"])
    lines += ["\"time / exml_fast\" is the median of per-round ratios [min–max] (> 1: exml_fast is faster). GB/s: "
              "bytes read + written per second (forward: 8 per element, x and y; forward + backward: 20, adding the "
              "output gradient, y and dx), beside the copy bandwidth above.", "",
              f"| direction | shape | variant | ms | GB/s | time / exml_fast | {TIMING_HEADER} |",
              "|---|---|---|---:|---:|---:|---|---|"]
    for r in rec["results"]:
        for row in r["rows"]:
            gbps = f"{row['GBps']:.1f}" if "GBps" in row else ""
            lines.append(f"| {r['direction']} | {tuple(r['shape'])} | {row['variant']} | {row['ms']:.4f} | {gbps} | "
                         f"{row['vs_exml']:.2f}x [{row['vs_exml_min']:.2f}–{row['vs_exml_max']:.2f}] | "
                         f"{timing_cells(row, '.4f')} |")
    lines += _step_table(rec["lenet_step"], "pooling on `fast_pooling` in both rows; \"reference\": nn.Tanh as "
                         "PyTorch runs it, \"exml_fast\": under `fast_tanh`.", "ms")
    lines += _step_table(rec["ed_step"], "ExModelDistillation's loop; \"fast_pooling\": only the pooling layers "
                         "swapped; \"exml_fast\": `fast_layers` (pooling and tanh), as the library runs it.",
                         "ms per step")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = op_parser(__doc__.split("\n\n")[0])
    args = parse_op_args(p, argv)
    t0 = time.perf_counter()
    env = environment(args.device, "tanh")
    results = []
    for shape in GPU_SHAPES if args.device == "cuda" and not args.quick else SHAPES:
        for direction in ("forward", "forward+backward"):
            r = bench_op(shape, direction, args)
            results.append(r)
            print(f"  {direction} {shape}: " + ", ".join(
                f"{row['variant']} {row['ms']:.4f} ms ({row['vs_exml']:.2f}x)" for row in r["rows"]), flush=True)
    step = bench_lenet_step(args)
    print(f"  {step['case']}: " + ", ".join(f"{row['variant']} {row['ms']:.3f} ms ({row['vs_exml']:.2f}x)"
                                           for row in step["rows"]), flush=True)
    ed = bench_ed_step(args, rounds=2 if args.quick else 5)
    print(f"  {ed['case']}: " + ", ".join(f"{row['variant']} {row['ms']:.3f} ms ({row['vs_exml']:.2f}x)"
                                         for row in ed["rows"]), flush=True)
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line("bench_tanh.py", argv), "results": results,
           "lenet_step": step, "ed_step": ed}
    record(args.out, f"tanh_{args.device}{'_quick' if args.quick else ''}{args.suffix}", rec, to_markdown(rec))


if __name__ == "__main__":
    main()
