"""``exml-fast demo`` / ``make demo``: Ex-Model CL on Split MNIST at a reduced budget, every strategy; then the
class-incremental strategies, which learn from the tasks' data, on the same scenario."""

from __future__ import annotations

import os
import pathlib
import time

import torch

from exml_fast._utils.io import atomic_write
from exml_fast.cl.experts import ExpertStream, default_weights_format
from exml_fast.cl.metrics import plot_stream_accuracy, summary_table
from exml_fast.cl.scenarios import split_mnist, train_experts
from exml_fast.cl.strategies import run_named_strategy
from exml_fast.cl.strategies.registry import options_read_by
from exml_fast.experiments.budgets import BUDGETS
from exml_fast.experiments.cil import CIL_BUDGETS, DEMO_CIL_STRATEGIES

__all__ = ["DEMO_STRATEGIES", "run_demo"]

#: The strategies the demo runs, in its table's order.
DEMO_STRATEGIES = ("mi-ed", "di-ed", "aux-ed", "param-avg", "ensemble-avg", "min-entropy", "oracle")


def run_demo(*, out: str | os.PathLike = "runs/demo", seed: int = 0, device: torch.device | str = "cpu",
             data_root: str | os.PathLike | None = None, progress: bool = False, cil: bool = True) -> list:
    """Split MNIST, 5 LeNet-5 experts (trained once, reused), then every strategy of :data:`DEMO_STRATEGIES` at
    the demo budget (:data:`~exml_fast.experiments.budgets.BUDGETS` ``["demo"]``); with ``cil``, every
    class-incremental strategy of :data:`~exml_fast.experiments.cil.DEMO_CIL_STRATEGIES` (all but skd, for
    time) on the same scenario's data at its demo budget. Prints the tables, writes ``<out>/report.md``,
    ``stream_accuracy.png`` and each run's folder. Returns the results (ExML first)."""
    device = torch.device(device)
    out = pathlib.Path(out)
    t_start = time.perf_counter()
    scenario = split_mnist(5, seed=seed, root=data_root)
    experts_dir = out / f"experts_seed{seed}"
    done = (experts_dir / "stream.json").exists() and len(ExpertStream(experts_dir)) == len(scenario.experiences)
    print(f"[demo] Split MNIST, classes per experience {[list(e.classes) for e in scenario.experiences]}")
    print(f"[demo] experts: {'reusing ' if done else 'training (once) '}{experts_dir}")
    t0 = time.perf_counter()
    budget = BUDGETS["demo"]
    stream = train_experts(scenario, experts_dir, arch="lenet5", epochs=budget["expert_epochs"]["split_mnist"],
                           seed=seed, device=device,
                           progress=progress, weights_format=default_weights_format())
    accs = [round(e.meta.get("test_accuracy_head", float("nan")), 4) for e in stream]
    print(f"[demo] {len(stream)} LeNet-5 experts ready ({time.perf_counter() - t0:.1f} s): test accuracy on their "
          f"own classes {accs}")
    results = []
    for name in DEMO_STRATEGIES:
        t0 = time.perf_counter()
        result = run_named_strategy(name, stream, scenario, options=budget["run"], seed=seed, device=device,
                                    out=out / f"{name}_seed{seed}", progress=progress,
                                    data_root=data_root)
        results.append(result)
        print(f"[demo] {name:13s} final stream accuracy {100 * result.final_stream_accuracy:6.2f} % "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    table = summary_table(results)
    print("\n" + table)
    report = f"## Demo: Split MNIST, reduced budget {budget['run']}\n\n" + table + "\n"
    cil_results = []
    if cil:
        run = CIL_BUDGETS["demo"]["run"]
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
