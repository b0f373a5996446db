"""Synthesis benchmark 2 of 4: equal final loss. The engine and the public loop, as timed by
bench_synthesis_step.py (the teachers and the objective: synthesislib.py), optimise the same objective.

Equal final loss: both loops run --check-iterations from the same seeds and
report the total loss of the batch they return. The initial batches are drawn
differently and the augmentations differ (the public loop draws one roll for
the whole batch, the engine one per sample; the engine takes the TV prior on
the un-augmented x), so the losses agree only statistically: the check passes
when the mean losses differ by at most max(3 x the peer's spread over the
seeds, 2 % of the loss).

Usage:
    python benches/bench_synthesis_loss.py [--device cpu|cuda] [--quick] [--nets ...] [--best | --no-best]
        [--check-iterations 10|200] [--seeds 0 1] [--suffix S] [--out benches/results]
        (recorded as synthesis_loss_<device>)
"""

from __future__ import annotations

import statistics
import time

import torch
from bench_synthesis_step import variants_for
from benchlib import environment
from synthesislib import (PEER, Variant, calibrated_teacher, header_markdown, net_title, parse, parser, write)


def equal_loss_check(variants: dict[str, Variant], failed: dict[str, str], args) -> list[dict]:
    """Each comparable variant's final losses over ``args.seeds`` after ``args.check_iterations`` steps, and
    whether their mean is within the noise of the first's (the peer's)."""
    print(f"  equal-loss check: {args.check_iterations} iterations, seeds {args.seeds}", flush=True)
    check = []
    for n, v in variants.items():
        # the public loop compiled, as shipped or without its BN term: the same loop as the peer's
        if n in failed or v.form == "listed" or not v.bn or (v.side == "public" and n != PEER):
            continue
        finals = [v.run(args.check_iterations, s) for s in args.seeds]
        check.append({"variant": n, "final_losses": finals})
        print(f"  {n:>24}: final loss " + ", ".join(f"{f:.4f}" for f in finals), flush=True)
    ref = check[0]["final_losses"]
    noise = statistics.pstdev(ref) if len(ref) > 1 else 0.0
    for c in check:
        diff = abs(statistics.fmean(c["final_losses"]) - statistics.fmean(ref))
        tol = max(3 * noise, 0.02 * abs(statistics.fmean(ref)))
        c.update(diff=diff, tolerance=tol, within_noise=diff <= tol)
        if c["variant"] != check[0]["variant"]:
            print(f"  {c['variant']:>24}: |mean diff| {diff:.4f} vs tolerance {tol:.4f} -> "
                  f"{'equal within noise' if c['within_noise'] else 'DIFFERENT'}", flush=True)
    return check


def check_markdown(net: dict, a: dict) -> list[str]:
    """The equal-loss table of one net's record (``a``: the run's arguments)."""
    if not net["check"]:
        return []
    lines = ["", f"Final loss after {a['check_iterations']} iterations, seeds {a['seeds']}:", "",
             "| variant | final losses | abs. mean diff | tolerance | equal |",
             "|---|---|---:|---:|---|"]
    for c in net["check"]:
        lines.append(f"| {c['variant']} | {', '.join(f'{v:.4f}' for v in c['final_losses'])} | "
                     f"{c['diff']:.4f} | {c['tolerance']:.4f} | "
                     f"{'yes' if c['within_noise'] else 'NO'} |")
    return lines


SCRIPT = "bench_synthesis_loss.py"


def to_markdown(rec: dict) -> str:
    lines = header_markdown(rec, SCRIPT)
    for net in rec["results"]:
        lines += [f"## {net['net']}, batch {net['batch']}", *check_markdown(net, rec["args"]), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__)
    args = parse(p, argv)
    if args.check_iterations < 1:
        p.error(f"--check-iterations: the check needs >= 1; got {args.check_iterations}")
    t0 = time.perf_counter()
    env = environment(args.device, "synthesis (DeepInversion): equal final loss")
    results = []
    for name in args.nets:
        net_title(name, args, f"equal final loss ({args.check_iterations} iterations)")
        torch._dynamo.reset()
        teacher = calibrated_teacher(name, args.device)
        check = equal_loss_check(variants_for(teacher, name, args), {}, args)
        results.append({"net": name, "batch": args.batch_of[name], "check": check})
        print(flush=True)
    env["wall_s"] = time.perf_counter() - t0
    write(args, argv, SCRIPT, "synthesis_loss", results, to_markdown, env)


if __name__ == "__main__":
    main()
