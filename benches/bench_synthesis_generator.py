"""Synthesis benchmark 4 of 4: a trained generator network's images/s against DeepInversion's, both at the
agreement bar (the teachers: synthesislib.py). See bench_generator.

Usage:
    python benches/bench_synthesis_generator.py [--device cpu|cuda] [--nets lenet5_bn] [--generator-fit 200]
        [--generator-arch skd-narrow] [--generator-di-steps 200] [--rounds N] [--suffix S] [--out benches/results]
        (recorded as synthesis_<device>_generator, the name bench_synthesis.py --suffix _generator gives it)
"""

from __future__ import annotations

import copy
import time

from benchlib import environment, timed_call, true_median
from synthesislib import (AGREEMENT, SHAPES, calibrated_teacher, clean_quality, exml_synth, header_markdown,
                          net_title, parse, parser, write)
from torch import nn


def bench_generator(teacher: nn.Module, name: str, args) -> dict:
    """A trained generator's images/s against DeepInversion's, both at >= AGREEMENT teacher agreement.

    The generator (GenerativeSynthesizer, preset skd, --generator-arch) is fitted for --generator-fit steps
    of the net's batch (a one-off cost, timed); then class-balanced batches of 4x the batch are drawn (the
    teacher labels every kept draw, so agreement is 1 by construction; the rejected draws are in the time).
    DeepInversion (the engine, exml fp32) runs --generator-di-steps steps on one batch, doubled (up to 8x)
    until the returned batch reaches the agreement bar; its images/s is the batch over that call's wall time.
    Break-even: the images after which fit + sampling is cheaper than DeepInversion.
    """
    from exml_fast.synth import GenerativeSynthesizer

    batch, dev = args.batch_of[name], args.device
    print(f"  trained generator ({args.generator_arch}, preset skd): fit {args.generator_fit} steps of {batch}",
          flush=True)
    synth = GenerativeSynthesizer(copy.deepcopy(teacher), input_shape=SHAPES[name], mean=None, std=None,
                                  num_classes=10, device=dev, preset="skd", generator_arch=args.generator_arch)
    t0 = time.perf_counter()
    synth.fit(args.generator_fit, batch_size=batch, generator=0, progress=False)
    fit_s = time.perf_counter() - t0
    n = 4 * batch
    out = {"arch": args.generator_arch, "fit_steps": args.generator_fit, "fit_s": fit_s, "n": n}
    try:
        synth.synthesize(batch, classes=range(10), generator=1, progress=False)  # warm-up
        walls, agree, accept = [], [], []
        for r in range(args.rounds):
            got = []
            walls.append(timed_call(lambda r=r: got.append(synth.synthesize(n, classes=range(10), generator=2 + r,
                                                                             progress=False)), dev))
            b = got[0]
            agree.append(clean_quality(teacher, b.x, b.y)[0])
            accept.append(float(b.losses["acceptance"].mean()))
    except RuntimeError as err:  # the teacher never labels some class as such: no balanced batch
        out["failed"] = str(err)
        print(f"    sampling failed: {err}", flush=True)
        return out
    out.update(images_per_s=n / true_median(walls), agreement=min(agree), acceptance=true_median(accept))
    di = exml_synth(teacher, name, dev, precision="fp32")
    steps = args.generator_di_steps
    for attempt in range(4):  # double DeepInversion's steps until its batch reaches the agreement bar
        got = []
        di_wall = timed_call(lambda: got.append(di.synthesize(batch, iterations=steps, batch_size=batch,
                                                              generator=0, progress=False)), dev)
        di_agreement = clean_quality(teacher, got[0].x, got[0].y)[0]
        print(f"    DeepInversion {steps} steps: {batch / di_wall:.1f} img/s, agreement {di_agreement:.0%}",
              flush=True)
        if di_agreement >= AGREEMENT or attempt == 3:
            break
        steps *= 2
    out.update(di_steps=steps, di_images_per_s=batch / di_wall, di_agreement=di_agreement)
    gain = 1 / out["di_images_per_s"] - 1 / out["images_per_s"]
    out["break_even_images"] = fit_s / gain if gain > 0 else None
    print(f"    generator: fit {fit_s:.1f} s, {out['images_per_s']:.0f} img/s (agreement {out['agreement']:.0%}, "
          f"acceptance {out['acceptance']:.0%}); DeepInversion {out['di_steps']} steps: "
          f"{out['di_images_per_s']:.1f} img/s (agreement {out['di_agreement']:.0%}); break-even after "
          f"{out['break_even_images'] or float('nan'):.0f} images", flush=True)
    return out



def generator_markdown(net: dict) -> list[str]:
    """The generator's comparison for one net's record."""
    lines = []
    g = net.get("generator")
    if g:
        lines += ["", f"Trained generator (`GenerativeSynthesizer`, preset skd, `{g['arch']}`): fitted "
                  f"{g['fit_steps']} steps of {net['batch']} in {g['fit_s']:.1f} s, then class-balanced "
                  f"batches of {g['n']} drawn (the teacher labels each kept draw; rejected draws are in the "
                  "time). DeepInversion: the engine, one call on one batch.", ""]
        if "failed" in g:
            lines.append(f"Sampling failed: {g['failed']}")
        else:
            be = g["break_even_images"]
            lines += ["| synthesis | images / s | teacher agreement | one-off cost |", "|---|---:|---:|---:|",
                      f"| trained generator (acceptance {g['acceptance']:.0%}) | {g['images_per_s']:.0f} | "
                      f"{g['agreement']:.0%} | fit {g['fit_s']:.1f} s |",
                      f"| DeepInversion, {g['di_steps']} steps | {g['di_images_per_s']:.1f} | "
                      f"{g['di_agreement']:.0%} | — |", "",
                      f"Sampling is {g['images_per_s'] / g['di_images_per_s']:.0f}x DeepInversion's rate; "
                      + (f"fit + sampling is cheaper beyond {be:.0f} images." if be is not None else
                         "sampling is not faster, so the fit never pays off.")]
    return lines


SCRIPT = "bench_synthesis_generator.py"


def to_markdown(rec: dict) -> str:
    lines = header_markdown(rec, SCRIPT)
    for net in rec["results"]:
        lines += [f"## {net['net']}, batch {net['batch']}", *generator_markdown(net), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.set_defaults(nets=["lenet5_bn"], generator_fit=200)
    args = parse(p, argv)
    if args.generator_fit < 1:
        p.error(f"--generator-fit: the generator needs >= 1 fit step; got {args.generator_fit}")
    t0 = time.perf_counter()
    env = environment(args.device, "synthesis (DeepInversion): trained generator")
    results = []
    for name in args.nets:
        net_title(name, args, f"trained generator ({args.generator_fit} fit steps)")
        teacher = calibrated_teacher(name, args.device)
        results.append({"net": name, "batch": args.batch_of[name], "generator": bench_generator(teacher, name, args)})
        print(flush=True)
    env["wall_s"] = time.perf_counter() - t0
    args.suffix = "_generator" + (args.suffix or "")
    write(args, argv, SCRIPT, "synthesis", results, to_markdown, env)


if __name__ == "__main__":
    main()
