"""Where the time of the whole Table 2 reproduction goes, on this device.

`exml-fast reproduce exml-mnist --runs 5` (the paper's budget) is, per
expert stream, a fixed amount of four kinds of work:

  expert training  Split MNIST: 5 experts x 20 epochs x ~12 000 images;
                   Joint MNIST: 1 expert x 100 epochs x 60 000 images
                   (SGD steps of 32, weight gradients);
  synthesis        MI ED and DI ED: sum_i N/i = 11 416 images (Split, N 5000,
                   5 experts) and 5000 images (Joint) x 3000 Adam steps each
                   (input gradients only);
  distillation     MI, DI and Aux ED: 30 000 steps of 32 per experience (5 Split,
                   1 Joint), each one forward of the expert and the previous model
                   and a forward-backward of the learner;
  evaluation       every strategy, after every experience, on every test set.

This script measures the cost of one unit of each on --device with the
library's own code paths (train_experts' loop, ModelInversion /
DataImpressions.synthesize, ExModelDistillation's distillation loop,
Strategy.predict), each as the difference of two calls of different lengths
so set-up cancels, multiplies by the counts above, and prints the projected
wall time of the whole five-run table with each stage's share, then the
top operators of one synthesis and one distillation step (torch.profiler).
A projection, not a measurement of the whole job: it says which stage to make
faster. Records benches/results/exml_profile_<device>.{json,md}.

Usage:
    python benches/profile_exml.py [--device cpu|cuda] [--synth-batch 256] [--quick] [--out benches/results]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from exml_fast.models import build_model  # noqa: E402
from exml_fast.synth import DataImpressions, ModelInversion  # noqa: E402

RUNS = 5
N = 5000
SPLIT_SIZES = [N // i for i in range(1, 6)]  # images synthesised per Split MNIST experience
#: Units of work in one expert stream of the paper-budget Table 2 (see the module docstring).
COUNTS = {
    "expert training (image-steps)": 5 * 20 * 12000 + 100 * 60000,
    "synthesis MI (image-steps)": (sum(SPLIT_SIZES) + N) * 3000,
    "synthesis DI (image-steps)": (sum(SPLIT_SIZES) + N) * 3000,
    "distillation (steps of 32)": 3 * (5 * 30000 + 30000),
    "evaluation (images)": 7 * 15 * 10000 + 4 * 10000,  # Split: 7 strategies x 15 (after i, on j <= i)
}


def _synth(cls, expert, dev, batch, **kw):
    """A synthesizer at the paper's MNIST settings (Appendix B), quiet about LeNet-5's missing BatchNorm."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*has no BatchNorm layer.*")
        return cls(expert, input_shape=(1, 32, 32), mean=0.1307, std=0.3081, num_classes=10, device=dev,
                   batch_size=batch, **kw)


def _seconds(fn, device):
    return benchlib.timed_call(fn, device)


def per_unit(device: str, synth_batch: int, k1: int, k2: int) -> dict[str, float]:
    """Seconds per unit of each kind of work (difference of a k2 and a k1 call)."""
    dev = torch.device(device)
    torch.manual_seed(0)
    expert = build_model("lenet5").to(dev)
    out = {}

    # Expert training: train_experts' step (SGD, momentum, weight decay, batch 32, CE).
    model = build_model("lenet5").to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(32, 1, 32, 32, device=dev), torch.randint(0, 10, (32,), device=dev)

    def train(k):
        for _ in range(k):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    train(k1)
    out["expert training (image-steps)"] = (_seconds(lambda: train(k2 * 4), device) -
                                            _seconds(lambda: train(k1 * 4), device)) / ((k2 - k1) * 4 * 32)

    # Synthesis at the paper's settings (ExML Appendix B), one batch of synth_batch images.
    synths = {"synthesis MI (image-steps)": _synth(ModelInversion, expert, dev, synth_batch, lr=0.01),
              "synthesis DI (image-steps)": _synth(DataImpressions, expert, dev, synth_batch, lr=0.01, beta=10.0,
                                                   bn_weight=1.0, blur_weight=1e-3, l2_sq_weight=1e-3)}
    for name, synth in synths.items():
        def run(k, synth=synth):
            synth.synthesize(synth_batch, classes=[0, 1], iterations=k, generator=0, progress=False)
        run(k1)
        out[name] = (_seconds(lambda: run(k2), device) - _seconds(lambda: run(k1), device)) / ((k2 - k1) *
                                                                                                synth_batch)

    # The same MI synthesis with PyTorch's convolution backward (the input-gradient swap off), to record
    # what exml_fast.synth.input_grad_conv saves; interleaved with the swap on, so the ratio is of one run.
    from exml_fast.synth import input_grad_conv as _conv

    synth = synths["synthesis MI (image-steps)"]

    def mi(k, fast):
        _conv.FAST_INPUT_GRAD = fast
        try:
            synth.synthesize(synth_batch, classes=[0, 1], iterations=k, generator=0, progress=False)
        finally:
            _conv.FAST_INPUT_GRAD = True
    ratios = []
    for _ in range(3):
        on = _seconds(lambda: mi(k2, True), device) - _seconds(lambda: mi(k1, True), device)
        off = _seconds(lambda: mi(k2, False), device) - _seconds(lambda: mi(k1, False), device)
        ratios.append(off / on)
    out["input-gradient swap: speed-up of an MI step"] = benchlib.true_median(ratios)

    # Distillation: ExModelDistillation's loop on the second experience (a previous model exists).
    from exml_fast.cl.strategies import ExModelDistillation

    def distil(k):
        ed = ExModelDistillation(build_model("lenet5"), source=benchlib.RandomSource(), buffer_size=1000, iterations=k,
                                 device=dev, progress=False)
        ed.train(benchlib.StubExpert(expert, [0, 1], 0))
        t0 = time.perf_counter()
        ed.train(benchlib.StubExpert(expert, [2, 3], 1))
        return ed.history[-1]["distill_s"], time.perf_counter() - t0
    distil(k1)
    out["distillation (steps of 32)"] = (distil(k2 * 4)[0] - distil(k1 * 4)[0]) / ((k2 - k1) * 4)

    xs = torch.randn(10000, 1, 32, 32, device=dev)
    ed = ExModelDistillation(build_model("lenet5"), source=benchlib.RandomSource(), buffer_size=10, iterations=1,
                             device=dev, progress=False)
    ed.train(benchlib.StubExpert(expert, [0, 1], 0))
    ed.predict(xs[:100])
    out["evaluation (images)"] = _seconds(lambda: ed.predict(xs), device) / 10000
    return out


def top_ops(device: str, synth_batch: int) -> dict[str, str]:
    """torch.profiler tables (self time) of 20 synthesis steps and 100 distillation steps."""
    from torch.profiler import ProfilerActivity, profile

    from exml_fast.cl.strategies import ExModelDistillation

    dev = torch.device(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    expert = build_model("lenet5").to(dev)
    synth = _synth(ModelInversion, expert, dev, synth_batch)
    synth.synthesize(synth_batch, classes=[0, 1], iterations=2, generator=0, progress=False)
    with profile(activities=acts) as prof:
        synth.synthesize(synth_batch, classes=[0, 1], iterations=20, generator=0, progress=False)
    tables = {"synthesis": prof.key_averages().table(sort_by=key, row_limit=12)}
    ed = ExModelDistillation(build_model("lenet5"), source=benchlib.RandomSource(), buffer_size=1000, iterations=100,
                             device=dev, progress=False)
    ed.train(benchlib.StubExpert(expert, [0, 1], 0))
    with profile(activities=acts) as prof:
        ed.train(benchlib.StubExpert(expert, [2, 3], 1))
    tables["distillation"] = prof.key_averages().table(sort_by=key, row_limit=12)
    return tables


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--synth-batch", type=int, default=256, help="images per synthesis batch (default: 256)")
    p.add_argument("--quick", action="store_true", help="short calls (a smoke run)")
    p.add_argument("--out", default=str(benchlib.RESULTS), help="'' to record nothing")
    args = p.parse_args(argv)
    device = args.device
    t_start = time.perf_counter()
    env = benchlib.environment(device, "ExML Table 2 profile")
    k1, k2 = (2, 6) if args.quick else (10, 60)
    unit = per_unit(device, args.synth_batch, k1, k2)
    stages = {name: RUNS * COUNTS[name] * unit[name] for name in COUNTS}
    total = sum(stages.values())
    lines = ["| stage | units per stream | seconds per unit | projected, 5 streams | share |",
             "|---|---:|---:|---:|---:|"]
    for name, sec in sorted(stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {name} | {COUNTS[name]:,} | {unit[name]:.3g} | {sec / 3600:.2f} h | "
                     f"{100 * sec / total:.1f} % |")
    lines.append(f"| **total** | | | **{total / 3600:.2f} h** | |")
    swap = unit.pop("input-gradient swap: speed-up of an MI step")
    lines.append("")
    lines.append(f"Synthesis with PyTorch's own convolution backward instead of the input-gradient convolution "
                 f"(exml_fast.synth.input_grad_conv) costs {swap:.2f}x as much per MI step (median of 3 interleaved "
                 "rounds).")
    table = "\n".join(lines)
    print(table)
    tables = top_ops(device, args.synth_batch)
    for k, v in tables.items():
        print(f"\n{k}: top operators by self time\n{v}")
    env["wall_s"] = time.perf_counter() - t_start
    command = "python benches/profile_exml.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = benchlib.env_markdown(env, "ExML Table 2 profile", command)
    md += [f"Projected wall time of `exml-fast reproduce exml-mnist --runs 5` at the paper's budget, from the "
           f"measured cost of one unit of each stage (synthesis batch {args.synth_batch}):", "", table, ""]
    for k, v in tables.items():
        md += [f"## {k}: top operators by self time", "", "```", v, "```", ""]
    rec = {"env": env, "synth_batch": args.synth_batch, "seconds_per_unit": unit, "units_per_stream": COUNTS,
           "input_grad_swap_speedup": swap,
           "projected_s": stages, "projected_total_s": total}
    benchlib.record(args.out, f"exml_profile_{device.split(':')[0]}", rec, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
