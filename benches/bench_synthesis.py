"""End-to-end DeepInversion synthesis speed: exml_fast.synth.DeepInversion against
the public DeepInversion CIFAR-10 loop, as a careful user already has it.

This script runs the four synthesis benchmarks together, as the recorded runs
did; each is also a script of its own, where its code lives:
  bench_synthesis_step.py       per-step cost (variants, BN share, floor)
  bench_synthesis_loss.py       equal final loss
  bench_synthesis_ttq.py        time to quality (--ttq-steps, --ttq-only)
  bench_synthesis_generator.py  a trained generator against DeepInversion (--generator-fit)
What they share (teachers, the two loops, the command line) is synthesislib.py.

Teachers: CIFAR ResNet-18 and ResNet-34 (exml_fast.models), random init, with
a few train-mode forwards on N(0, 1)-like data first so the BatchNorm running
statistics are not the defaults (the BN loss then has something to match), at
batch 64 on the CPU and 256 on a GPU (CIFAR shapes, 3 x 32 x 32); LeNet-5-BN
trained for one epoch on MNIST (when the files are found; else calibrated like
the ResNets) at batch 256; on request (--nets resnet50) the ImageNet ResNet-50
(torchvision's, random init, calibrated the same way) at 224 px, batch 64. The
objective (the issue's): CE + 10 · R_BN (every BN layer, l2 form, no first-layer
multiplier) + 2.5e-5 · TV-l2, Adam lr 0.05 at a constant rate, a 2-px roll, no
flips, no clipping (mean/std None), no l2 term.

Variants, each with its own deep copy of the teacher:
  public as shipped   exml_fast.reference.public.deepinversion.public_deepinversion
                      with the teacher's parameters still requiring grad (as the
                      public script leaves them): every backward also computes
                      the weight gradients. Kept for reference only: it is
                      avoidable waste, not the peer.
  public frozen       the same loop with one line added, the teacher frozen
                      (requires_grad_(False)): THE PEER every ratio is against.
  public frozen+compile  the frozen teacher wrapped in torch.compile, the next
                      peer a user reaches for.
  exml fp32           exml_fast.synth.DeepInversion at its defaults (on the CPU:
                      channels_last picked for the ResNets, fused frozen-BN
                      statistics, the input-gradient swap on 1-channel layers;
                      on a GPU: fused frozen-BN statistics, the step captured in
                      a CUDA graph).
  exml fp32 eager     on a GPU, listed: the same without the CUDA graph
                      (cuda_graph=False), what the graph brings.
  exml fp32 cl        on a GPU, listed: the defaults with channels_last=True,
                      to choose the GPU's default memory format by measurement.
The engine runs with the public loop's objective and optimiser (see
exml_runner), so only the implementation differs.

With --best (the default on a GPU) each side also runs in its best form, and the
comparisons pair precision with precision:
  public frozen bf16+cl+compile(<mode>)  the frozen peer as a careful GPU user
                      runs it: bf16 autocast (the loop's use_amp), the teacher's
                      weights in channels_last, and the teacher — its forward
                      with the public BN hooks, which dynamo inlines into one
                      graph — under torch.compile(mode=<mode>), for each of
                      --compile-modes (default max-autotune and reduce-overhead);
                      the faster is "the best peer".
  exml bf16+cl+graph  the engine with precision="bf16", channels_last=True and
                      cuda_graph=True (the whole step in one CUDA graph); with
                      --exml-compile also that with compile=True.
exml fp32 is compared with public frozen (fp32 eager), the engine's best form
with the best peer; public frozen at fp32 is every row's second ratio.
--bn-share adds each side's step without the BN term (the public loop with no BN
hooks; the engine at bn_weight 0): the term's share of a step.

How a step is timed (the honest per-iteration cost, set-up removed): each
variant runs a whole synthesis call through its public API for K1 and for K2
iterations from the same seed, and a step costs (t(K2) - t(K1)) / (K2 - K1).
Set-up that does not scale with the iterations cancels. On a GPU each call
is timed with CUDA events. Calls are timed round-robin with the order rotated each round, so the per-round ratios cancel
the drift of a shared machine; the speed-up printed is the median of the
per-round ratios against "public frozen" (min-max in brackets), and each
median is the true median (mean of the middle two for an even count). One call
of each variant warms up first (torch.compile compiles there).

Time to quality (--ttq-steps N): the frozen peer runs N steps on one batch; the
quality bar is the BN term of the batch it returns, measured by one clean
forward of that batch (no augmentation), and 95 % teacher agreement. The peer's
time to quality is read off that one run: its best batch so far is measured
every N/40 steps with the clock paused (a call of k steps returns exactly the
batch the run has after step k: the loop's step size is constant and its draws
come from the seed). The engine's is the wall time of the shortest whole call
(step counts on a grid of N/40, found by a galloping search and bisection)
whose returned batch meets the bar, measured the same way: its cosine step size
depends on the call's length. (The per-step loss terms are no measure of the
batch: they are taken on an augmented copy, and the peer's one roll for the
whole batch makes its BN term jump from step to step — its lowest-loss step is
a lucky draw, not a better batch.) The ResNets' teachers for the race are
trained (one pass over 10000 Fashion-MNIST images as 3-channel 32 x 32 copies,
ttq_teacher); every measurement is logged under --ttq-state and read back by a
rerun, so a race of hours resumes where it stopped. The issue asks for the
peer's 2000 steps at batch 256: on a 2-core CPU that is hours for a ResNet.

Equal final loss: both loops run --check-iterations from the same seeds and
report the total loss of the batch they return. The initial batches are drawn
differently and the augmentations differ (the public loop draws one roll for
the whole batch, the engine one per sample; the engine takes the TV prior on
the un-augmented x), so the losses agree only statistically: the check passes
when the mean losses differ by at most max(3 x the peer's spread over the
seeds, 2 % of the loss).

With --ttq-best (default with --best) the race is also run by the best forms:
the best peer (its compile mode: the winner of this run's timing, else the
first of --compile-modes), warmed up (compiled) before its run, is followed
along its own N steps against the same bar, and the engine's best form races it.

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
