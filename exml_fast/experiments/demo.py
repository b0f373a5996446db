"""``exml-fast demo`` / ``make demo``: Ex-Model CL on Split MNIST at a reduced budget, every strategy; then the
class-incremental strategies, which learn from the tasks' data, on the same scenario."""

from __future__ import annotations

import os
import pathlib
import time

import torch

from exml_fast._utils.checks import check_choice
from exml_fast._utils.io import atomic_write
from exml_fast.cl.experts import ExpertStream, default_weights_format
from exml_fast.cl.metrics import plot_stream_accuracy, summary_table
from exml_fast.cl.scenarios import split_mnist, train_experts
from exml_fast.cl.strategies import run_named_strategy
from exml_fast.cl.strategies.registry import options_read_by
from exml_fast.experiments.budgets import BUDGETS
from exml_fast.experiments.cil import CIL_BUDGETS, DEMO_CIL_STRATEGIES

__all__ = ["DEMO_BUDGETS", "DEMO_STRATEGIES", "run_demo"]

#: The strategies the demo runs, in its table's order.
DEMO_STRATEGIES = ("mi-ed", "di-ed", "aux-ed", "param-avg", "ensemble-avg", "min-entropy", "oracle")


#: The budgets ``exml-fast demo --budget`` takes: keys of both BUDGETS and CIL_BUDGETS ("smoke": seconds, to check
#: the pipeline; "paper" is left to ``exml-fast reproduce``).
DEMO_BUDGETS = ("demo", "smoke")


def run_demo(*, out: str | os.PathLike = "runs/demo", seed: int = 0, device: torch.device | str = "cpu",
             data_root: str | os.PathLike | None = None, progress: bool = False, cil: bool = True,
             budget: str = "demo") -> list:
    """Split MNIST, 5 LeNet-5 experts (trained once, reused), then every strategy of :data:`DEMO_STRATEGIES` at
    the demo budget (:data:`~exml_fast.experiments.budgets.BUDGETS` ``["demo"]``); with ``cil``, every
    class-incremental strategy of :data:`~exml_fast.experiments.cil.DEMO_CIL_STRATEGIES` (all but skd, for
    time) on the same scenario's data at its demo budget. Prints the tables, writes ``<out>/report.md``,
    ``stream_accuracy.png`` and each run's folder. Returns the results (ExML first).

    ``budget`` (one of :data:`DEMO_BUDGETS`): "smoke" runs the same pipeline on 500 images per experience at
    the smoke budgets in seconds, under ``<out>/smoke`` so that its experts and runs are never read back as
    the demo's."""
    check_choice(budget, "budget", "run_demo", DEMO_BUDGETS)
    device = torch.device(device)
    out = pathlib.Path(out)
    if budget != "demo":
        out = out / budget
    t_start = time.perf_counter()
    spec = BUDGETS[budget]
    scenario = split_mnist(5, seed=seed, root=data_root, **spec.get("scenario", {}))
    experts_dir = out / f"experts_seed{seed}"
    done = (experts_dir / "stream.json").exists() and len(ExpertStream(experts_dir)) == len(scenario.experiences)
    print(f"[demo] Split MNIST, classes per experience {[list(e.classes) for e in scenario.experiences]}")
    print(f"[demo] experts: {'reusing ' if done else 'training (once) '}{experts_dir}")
    t0 = time.perf_counter()
    stream = train_experts(scenario, experts_dir, arch="lenet5", epochs=spec["expert_epochs"]["split_mnist"],
                           seed=seed, device=device,
                           progress=progress, weights_format=default_weights_format())
    accs = [round(e.meta.get("test_accuracy_head", float("nan")), 4) for e in stream]
    print(f"[demo] {len(stream)} LeNet-5 experts ready ({time.perf_counter() - t0:.1f} s): test accuracy on their "
          f"own classes {accs}")
    results = []
    for name in DEMO_STRATEGIES:
        t0 = time.perf_counter()
        result = run_named_strategy(name, stream, scenario, options=spec["run"], seed=seed, device=device,
                                    out=out / f"{name}_seed{seed}", progress=progress,
                                    data_root=data_root)
        results.append(result)
        print(f"[demo] {name:13s} final stream accuracy {100 * result.final_stream_accuracy:6.2f} % "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    table = summary_table(results)
    print("\n" + table)
    report = f"## Demo: Split MNIST, reduced budget {spec['run']}\n\n" + table + "\n"
    cil_results = []
    if cil:
        run = CIL_BUDGETS[budget]["run"]
        print(f"[demo] class-incremental strategies (they learn from each task's data) at {run}", flush=True)
        for name in DEMO_CIL_STRATEGIES:
            t0 = time.perf_counter()
            result = run_named_strategy(name, None, scenario, options=options_read_by(name, run), seed=seed,
                                        device=device, out=out / f"{name}_seed{seed}", progress=progress,
                                        data_root=data_root)
            cil_results.append(result)
            print(f"[demo] {name:19s} final accuracy {100 * result.final_stream_accuracy:6.2f} % "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
        cil_table = summary_table(cil_results)
        print("\n" + cil_table)
        report += f"\n## Class-incremental learning from data, reduced budget {run}\n\n" + cil_table + "\n"
    atomic_write(out / "report.md", lambda f: f.write(report.encode()))
    plot_stream_accuracy(results + cil_results, out / "stream_accuracy.png")
    print(f"\n[demo] wrote {out / 'report.md'}, {out / 'stream_accuracy.png'} and per-strategy plots in "
          f"{out}/<strategy>_seed{seed}/ ({time.perf_counter() - t_start:.0f} s in all)")
    return results + cil_results
