"""End-to-end DeepInversion synthesis speed: exml_fast.synth.DeepInversion against
the public DeepInversion CIFAR-10 loop, as a careful user already has it.

This script runs the four synthesis benchmarks together, as the recorded runs
did; each is also a script of its own, where its code lives:
  bench_synthesis_step.py       per-step cost (variants, BN share, floor)
  bench_synthesis_loss.py       equal final loss
  bench_synthesis_ttq.py        time to quality (--ttq-steps, --ttq-only)
  bench_synthesis_generator.py  a trained generator against DeepInversion (--generator-fit)
What they share (teachers, the two loops, the command line) is synthesislib.py.

What each one measures and how (teachers, variants, the peer, the bars) is in its own
script's docstring.

Usage:
    python benches/bench_synthesis.py [--device cpu|cuda] [--quick] [--nets resnet18 resnet34 lenet5_bn resnet50]
        [--best | --no-best] [--compile-modes max-autotune reduce-overhead] [--exml-compile] [--bn-share]
        [--batch N] [--k1 1|5] [--k2 4|105] [--rounds 3|5] [--check-iterations 10|200]
        [--seeds 0 1] [--no-compile] [--ttq-steps 200] [--ttq-only] [--ttq-cap 3] [--ttq-all-variants]
        [--ttq-best | --no-ttq-best] [--ttq-variants N] [--ttq-state runs/bench_synthesis] [--suffix S]
        [--out benches/results]
"""

from __future__ import annotations

import sys
import time

import torch
from bench_synthesis_generator import bench_generator, generator_markdown
from bench_synthesis_loss import check_markdown, equal_loss_check
from bench_synthesis_step import (best_peer_mode, bn_shares, conv_floor, pair_with_peers, step_timing, time_steps,
                                  timing_markdown, timing_rows, variants_for)
from bench_synthesis_ttq import (RaceLog, peer_trajectory, race_bn_weight, smallest_steps, time_to_quality,
                                 ttq_markdown, ttq_teacher, ttq_variants)
from benchlib import command_line, environment, record
from synthesislib import (AGREEMENT, BN_WEIGHT, CPU_BATCH, DEFAULT_NETS, FLIP, GPU_BATCH, JITTER, L2_WEIGHT, LR, NETS,
                          NO_BN, PEER, SHAPES, TTQ_STATE, TV_L2_WEIGHT, Variant, calibrated_teacher, clean_quality,
                          exml_best_forms, exml_runner, exml_synth, header_markdown, net_title, parse, parser,
                          public_best_label, public_runner, public_teacher, resnet50_imagenet, targets_for)

# The names other scripts and the tests import from here, where they always were.
__all__ = ["AGREEMENT", "BN_WEIGHT", "CPU_BATCH", "DEFAULT_NETS", "FLIP", "GPU_BATCH", "JITTER", "L2_WEIGHT", "LR",
           "NETS", "NO_BN", "PEER", "SHAPES", "TTQ_STATE", "TV_L2_WEIGHT", "RaceLog", "Variant", "bench_generator",
           "bench_net", "best_peer_mode", "bn_shares", "calibrated_teacher", "clean_quality", "conv_floor",
           "equal_loss_check", "exml_best_forms", "exml_runner", "exml_synth", "main", "pair_with_peers",
           "peer_trajectory", "public_best_label", "public_runner", "public_teacher", "race_bn_weight",
           "resnet50_imagenet", "smallest_steps", "step_timing", "targets_for", "time_steps", "time_to_quality",
           "timing_rows", "to_markdown", "ttq_teacher", "ttq_variants", "variants_for"]

SCRIPT = "bench_synthesis.py"


def bench_net(name: str, args) -> dict:
    """Every benchmark the arguments ask for, on one net: the step timing and the equal-loss check (unless
    --ttq-only), the race (--ttq-steps), the trained generator (--generator-fit)."""
    net_title(name, args, "time to quality" if args.ttq_only else
              f"timing (K1={args.k1}, K2={args.k2}, {args.rounds} rounds)")
    torch._dynamo.reset()  # each net's compiled peers start from an empty cache (ResNet-18 and -34 share code)
    teacher = calibrated_teacher(name, args.device)
    batch = args.batch_of[name]
    if args.ttq_only:
        ttq = time_to_quality(*ttq_teacher(name, args.device, args.ttq_state, teacher), name, args)
        print(flush=True)
        return {"net": name, "batch": batch, "timing": [], "floor": None, "check": [], "ttq": ttq}
    variants = variants_for(teacher, name, args)
    timing, failed = step_timing(name, variants, args)
    check = equal_loss_check(variants, failed, args) if args.check_iterations > 0 else []
    ttq = (time_to_quality(*ttq_teacher(name, args.device, args.ttq_state, teacher), name, args)
           if args.ttq_steps > 0 and not args.port_only else None)
    gen = (bench_generator(teacher, name, args) if args.generator_fit > 0 and not args.port_only else None)
    print(flush=True)
    return {"net": name, "batch": batch, **timing, "check": check, "ttq": ttq, "generator": gen}


def to_markdown(rec: dict) -> str:
    lines = header_markdown(rec, SCRIPT)
    for net in rec["results"]:
        lines += [f"## {net['net']}, batch {net['batch']}", ""]
        lines += timing_markdown(net)
        lines += check_markdown(net, rec["args"])
        lines += ttq_markdown(net)
        lines += generator_markdown(net)
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse(parser(__doc__), argv)
    t0 = time.perf_counter()
    env = environment(args.device, "synthesis (DeepInversion)")
    results = [bench_net(n, args) for n in args.nets]
    env["wall_s"] = time.perf_counter() - t0
    rec = {"env": env, "argv": sys.argv[1:] if argv is None else list(argv),
           "command": command_line(SCRIPT, argv),
           "args": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    suffix = ("_quick" if args.quick else "") + (args.suffix or "")
    record(args.out, f"synthesis_{args.device}{suffix}", rec, to_markdown(rec))


if __name__ == "__main__":
    main()
