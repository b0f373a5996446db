"""`make gpu-perf`: the headline GPU measurements of issue 41, built once, in one command under 9 minutes.

gpu-check (benches/gpu_check.py) is the correctness run, and its benchmarks are smoke runs. This script
takes the performance figures: sizes that fill an H100, CUDA events, at least 5 rounds, true medians and
ranges, and the peer a careful user has (the public loop with the teacher frozen, in fp32 eager and in its
best form: bf16 autocast, channels_last and torch.compile), each side compared in the same precision:

  gpu                 torch (of the Python running this) sees a CUDA device; else it says so and exits 2
                      before building anything
  build               gpu-check's build step: pip install -e . for the visible GPU's arch, all cores
  synthesis-resnet18  bench_synthesis, CIFAR ResNet-18 at batch 256 (3 x 32 x 32): public frozen fp32 eager
                      against exml fp32; public frozen bf16 + channels_last + torch.compile in each of
                      --compile-modes (max-autotune and reduce-overhead; the faster kept) against exml bf16 +
                      channels_last + CUDA graph; and each loop without its BN term (the term's share)
  synthesis-resnet34  ResNet-34 at batch 256, the public best form in the compile mode that won on ResNet-18
                      (its record in --out, also one an earlier call left there; else reduce-overhead)
  synthesis-resnet50  the ImageNet ResNet-50 at 224 px, batch 64, likewise
  ops-bn_stats        bench_bn_stats at batch 256: the op rows (1.9 GB per call; GB/s against the copy
                      bandwidth; against torch.compile(reference)) and the BN term's share of a hand-written
                      step with the public hooks and with exml_fast's matcher
  ops-<op>            the other op benchmarks at their GPU sizes (rows that move >= 100 MB per call), with
                      torch.compile(reference)
  ttq-resnet18        the time-to-quality race at ResNet-18 batch 256 against the fp32 frozen peer (whose
                      batch after --ttq-steps steps sets the bar) and the best one. It starts only with
                      >= 150 s of budget left; its measurements stay in <out>/ttq_state (--ttq-state), so a
                      later call with the same folder resumes it. Its teacher is trained on Fashion-MNIST when
                      the files are found (EXML_FAST_DATA, else runs/gpu-data: `make gpu-data` here, carry it)

The steps run in that order, each with its own timeout cut to what is left of the budget (--budget-s,
default 530 s, so that a 600 s device command ends cleanly); a step that fails does not stop the next.

Writes to --out (default $GPU_PERF_OUT, else benches/results/gpu/perf/):
  summary.md, summary.json   device, driver, torch, CUDA, commit, the exact command; each step's status,
                             seconds and headline figures
  logs/<step>.log            the full output of each step
  benches/                   the recorded runs (<bench>_cuda*.{json,md})
  ttq_state/                 the time-to-quality race's measurements (resumable)
--tar PATH packs the whole folder into one .tgz at the end, whatever happened.

Usage (from the repository root, with the GPU machine's own python and torch):
    python3 benches/gpu_perf.py [--out DIR] [--tar PATH] [--budget-s 530] [--steps build,synthesis-resnet18,...]
        [--compile-modes max-autotune reduce-overhead] [--k2 45] [--rounds 5] [--ttq-steps 2000] [--ttq-variants 1]
Exit status: 0 every step passed, 1 a step failed, timed out or found no time, 2 no usable GPU, 130 interrupted.

Standard library only, as gpu_check.py (whose runner, build step and summary pieces it uses).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

import gpu_check as gc

ROOT = gc.ROOT
DEFAULT_OUT = ROOT / "benches" / "results" / "gpu" / "perf"
DATA = ROOT / "runs" / "gpu-data"

#: The synthesis nets: (net, batch). CIFAR shapes at 256 fill an H100; ResNet-50 at 224 px, 64.
NETS = {"resnet18": 256, "resnet34": 256, "resnet50": 64}
#: The op benchmarks: (name, script, arguments, recorded stem). Each runs at its GPU sizes, with
#: torch.compile(reference); bn_stats first (its step-level rows are the BN term's share of a hand-written step).
OPS = (
    ("bn_stats", "bench_bn_stats.py",
     ["--batches", "256", "--step-batch", "256", "--min-run-time", "0.5", "--step-run-time", "3"], "bn_stats_cuda"),
    ("image_priors", "bench_image_priors.py", ["--min-run-time", "0.3"], "image_priors_cuda"),
    ("soft_target_losses", "bench_soft_target_losses.py", ["--min-run-time", "0.3"], "soft_target_losses_cuda"),
    ("augment", "bench_augment.py", ["--min-run-time", "0.3"], "augment_cuda_float32"),
    ("dirichlet", "bench_dirichlet.py", ["--min-run-time", "0.3"], "dirichlet_cuda"),
    ("window_pool", "bench_window_pool.py", ["--min-run-time", "0.3"], "window_pool_cuda"),
    ("tanh", "bench_tanh.py", ["--min-run-time", "0.3"], "tanh_cuda"),
    ("upsample_conv", "bench_upsample_conv.py", ["--min-run-time", "0.3"], "upsample_conv_cuda"),
)
STEPS = ("build", "synthesis-resnet18", "synthesis-resnet34", "synthesis-resnet50", *(f"ops-{o[0]}" for o in OPS),
         "ttq-resnet18")

#: Seconds each step may take at most (the budget may leave less). Expected on an H100 with 16 cores, not yet
#: measured: build 65-100 s (the H200's pip build took 65 s); ResNet-18 130-200 s (two torch.compile modes of
#: the public loop, max-autotune's autotuning the longer, then 5 rounds of 8 loops x 50 steps, ~20 s); ResNet-34
#: 75-130 s and ResNet-50 90-190 s (one compile each, 4 loops); bn_stats 60-100 s, the other op benchmarks
#: 30-100 s each (torch.compile(reference) per case); the race 150-500 s (the fp32 peer's 2000 steps ~45 s,
#: then a search of several times the engine's answer, fp32 and best form).
TIMEOUTS = {"build": 300, "synthesis-resnet18": 270, "synthesis-resnet34": 180, "synthesis-resnet50": 210,
            "ops": 120, "ttq-resnet18": 600}
#: Budget seconds a step needs to be started at all (else it is "not run"): a synthesis step cut short
#: records nothing, and the race's first measurement, the peer's run, takes about a minute.
MIN_START = {"synthesis-resnet18": 90, "synthesis-resnet34": 60, "synthesis-resnet50": 60, "ttq-resnet18": 150}
#: The compile mode of the public best form where ResNet-18's record does not say which won.
FALLBACK_MODE = "reduce-overhead"

#: What the figures are (the summary says it above them).
METHOD = ("CUDA events around rounds of back-to-back calls, at least 5 rounds, true medians [min–max]; "
          "synthesis steps as (t(K2) - t(K1)) / (K2 - K1) of whole calls, interleaved rounds; exml fp32 against "
          "the public loop with the teacher frozen in fp32 eager, the engine's best form (bf16 + channels_last "
          "+ CUDA graph) against the public loop's (bf16 autocast + channels_last + torch.compile, the faster "
          "mode); op rows against the reference and torch.compile(reference), GB/s against the copy bandwidth")


def synthesis_stem(net: str) -> str:
    return f"synthesis_cuda_perf_{net}"


TTQ_STEM = "synthesis_cuda_perf_ttq"


def best_mode(out: Path) -> str | None:
    """The compile mode of the public best form that won on ResNet-18, from its record in ``out``."""
    rec = out / "benches" / f"{synthesis_stem('resnet18')}.json"
    try:
        results = json.loads(rec.read_text())["results"]
    except (OSError, ValueError, KeyError):
        return None
    return next((r.get("best_peer_mode") for r in results if r.get("net") == "resnet18"), None)


def peer_modes(net: str, args) -> list[str]:
    """The compile modes of the public best form for ``net``: every one of --compile-modes on ResNet-18 (the
    faster is kept), then the one that won there."""
    if net == "resnet18" or len(args.compile_modes) == 1:
        return list(args.compile_modes)
    won = best_mode(args.out_path)
    return [won or (FALLBACK_MODE if FALLBACK_MODE in args.compile_modes else args.compile_modes[0])]


def synthesis_args(net: str, args) -> list[str]:
    a = ["--nets", net, "--batch", str(NETS[net]), "--k1", str(args.k1), "--k2", str(args.k2),
         "--rounds", str(args.rounds), "--check-iterations", "0", "--ttq-steps", "0", "--best",
         "--compile-modes", *peer_modes(net, args), "--suffix", f"_perf_{net}"]
    return a + (["--bn-share"] if net == "resnet18" else [])


def ttq_args(args) -> list[str]:
    return ["--nets", "resnet18", "--batch", str(NETS["resnet18"]), "--ttq-only", "--ttq-steps", str(args.ttq_steps),
            "--ttq-variants", str(args.ttq_variants), "--ttq-rel-tol", str(args.ttq_rel_tol), "--best",
            "--compile-modes", *peer_modes("ttq", args), "--ttq-state", str(args.ttq_state), "--suffix", "_perf_ttq"]


def step_env() -> dict:
    """The benchmarks' environment: the race's data from runs/gpu-data when EXML_FAST_DATA is not set."""
    if "EXML_FAST_DATA" not in os.environ and DATA.is_dir():
        return {"EXML_FAST_DATA": str(DATA)}
    return {}


def synthesis_summary(r: gc.StepResult) -> str:
    """A step's one-line result: each exml row against its peer of the same precision."""
    heads = [h for h in r.details.get("headlines", []) if ", exml " in h and "] vs " in h]
    return "; ".join(h.split(", ", 1)[1] for h in heads) or r.summary


def run_perf(c: gc.Check, args, results: list[gc.StepResult]) -> list[gc.StepResult]:
    """The steps of --steps in order, appended to ``results``; the summary is rewritten after each."""
    env = step_env()

    def done(r: gc.StepResult) -> gc.StepResult:
        results.append(r)
        print(f"[gpu-perf] {r.name}: {r.status} ({r.seconds:.0f} s) {r.summary}"
              + "".join(f"\n    {n}" for n in r.notes), flush=True)
        c.env["wall_s"] = c.env["budget_s"] - c.budget.left()
        gc.write_summary(c.out, c.env, results, finished=False, summary=summary_dict, markdown=summary_markdown)
        return r

    ops = {f"ops-{o[0]}": o for o in OPS}
    for step in (s for s in STEPS if s in args.steps):
        if step == "build":
            done(gc.build_step(c))
        elif step.startswith("synthesis-"):
            net = step.removeprefix("synthesis-")
            r = gc.bench_step(c, "synthesis", "bench_synthesis.py", synthesis_args(net, args), synthesis_stem(net),
                              smoke=False, step=step, timeout_key=step, env=env)
            r.summary = synthesis_summary(r)
            done(r)
        elif step in ops:
            name, script, a, stem = ops[step]
            done(gc.bench_step(c, name, script, a, stem, smoke=False, step=step, timeout_key="ops", env=env))
        elif step == "ttq-resnet18":
            done(gc.bench_step(c, "synthesis", "bench_synthesis.py", ttq_args(args), TTQ_STEM, smoke=False,
                               step=step, timeout_key=step, env=env))
    return results


# -- the summary ------------------------------------------------------------------------------------


def summary_dict(env: dict, results: list[gc.StepResult], *, finished: bool) -> dict:
    return {"ok": finished and gc.overall(results), "finished": finished, "env": env, "command": env.get("command"),
            "method": METHOD, "steps": [dataclasses.asdict(r) for r in results],
            "failed_steps": [r.name for r in results if not r.ok],
            "figures": {r.name: r.details["headlines"] for r in results if r.details.get("headlines")}}


def summary_markdown(env: dict, results: list[gc.StepResult], *, finished: bool, out: Path) -> str:
    lines = gc.header_lines(env, f"gpu-perf: {gc.verdict(results, finished=finished)}")
    lines += gc.step_table(results, out)
    figures = (gc.bench_lines(results, out, prefix="synthesis-") + gc.bench_lines(results, out, prefix="ops-")
               + gc.bench_lines(results, out, prefix="ttq-"))
    if figures:
        lines += ["", "## Figures", "", f"How they were taken: {METHOD}.", "", *figures]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("GPU_PERF_OUT") or str(DEFAULT_OUT),
                   help="folder of the summary, logs, records and race state (default $GPU_PERF_OUT, else "
                        "%(default)s)")
    p.add_argument("--tar", default=None,
                   help="at the end (also after a failure, a timeout or an interruption) pack --out into this .tgz")
    p.add_argument("--budget-s", type=float, default=530.0,
                   help="seconds for the whole run, shared by the steps (default %(default)s)")
    p.add_argument("--steps", default=",".join(STEPS),
                   help="comma-separated subset of the steps, run in the default order (default: all: %(default)s)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter whose torch builds and runs everything (default: this one)")
    p.add_argument("--compile-modes", nargs="+", default=["max-autotune", "reduce-overhead"],
                   help="torch.compile modes of the public best form tried on ResNet-18 (default: %(default)s)")
    p.add_argument("--k1", type=int, default=5, help="steps of the short synthesis call (default %(default)s)")
    p.add_argument("--k2", type=int, default=45, help="steps of the long synthesis call (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the synthesis timing (default 5)")
    p.add_argument("--ttq-steps", type=int, default=2000,
                   help="the fp32 peer's steps in the race, whose batch sets the bar (default %(default)s)")
    p.add_argument("--ttq-variants", type=int, default=1,
                   help="the engine's race settings run, from bench_synthesis's list (default %(default)s: "
                        "cosine lr 0.1, one draw per batch)")
    p.add_argument("--ttq-rel-tol", type=float, default=0.1,
                   help="the engine's search stops within this fraction of its answer (default %(default)s)")
    p.add_argument("--ttq-state", default=None, help="the race's resumable measurements (default <out>/ttq_state)")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        p.error(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    if args.rounds < 5:
        p.error(f"--rounds: at least 5; got {args.rounds}")
    if not 1 <= args.k1 < args.k2:
        p.error(f"--k1/--k2: need 1 <= k1 < k2; got {args.k1}, {args.k2}")
    args.out_path = Path(args.out).resolve()
    args.ttq_state = Path(args.ttq_state).resolve() if args.ttq_state else args.out_path / "ttq_state"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    budget = gc.Budget(args.budget_s)
    env, reason = gc.machine_facts(args.python, args.budget_s)
    if reason is not None:
        print(gc.no_gpu_message("gpu-perf", reason, "times the CUDA kernels"), file=sys.stderr)
        return gc.EXIT_NO_GPU
    out = args.out_path
    env["command"] = shlex.join(["python3", "benches/gpu_perf.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"[gpu-perf] {env['device_name']} (sm {env['arch']}), torch {env['torch']}, {env['cores']} cores; "
          f"writing to {out}; budget {args.budget_s:.0f} s", flush=True)
    c = gc.Check(python=args.python, out=out, budget=budget, env=env, build_env=gc.build_env(env),
                 timeouts=TIMEOUTS, min_start=MIN_START, label="gpu-perf")
    return gc.session(c, lambda results: run_perf(c, args, results), tar=args.tar, summary=summary_dict,
                      markdown=summary_markdown)


if __name__ == "__main__":
    sys.exit(main())
