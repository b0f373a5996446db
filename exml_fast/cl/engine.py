"""The run loop of ExML and class-incremental learning: a strategy meets a stream of experiences (experts, or
the scenario's data), is evaluated after each, and checkpoints.

:func:`run_stream` feeds the experts of an :class:`~exml_fast.cl.experts.ExpertStream`
to a :class:`~exml_fast.cl.strategies.Strategy` one at a time (only the current
expert in memory) — or, with no stream, the scenario's experiences with their
training data (class-incremental strategies, :mod:`exml_fast.cl.strategies.cil`) —,
evaluates the strategy on every experience's test set after each (the accuracy
matrix), and — with ``out`` — writes an atomic
checkpoint after every experience, so a killed run resumes (``resume=True``)
to the same final numbers as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import time
import warnings
from typing import Any

import torch

from exml_fast._utils.dist import all_reduce_sum, barrier, broadcast_object, resolve_world, shard_rows
from exml_fast._utils.io import atomic_write, check_writable, load_torch_file
from exml_fast._utils.provenance import config_diff
from exml_fast.cl.metrics import StreamResult, accuracy_counts

__all__ = ["CHECKPOINT", "RESULT", "RunError", "evaluate_strategy", "run_stream"]

CHECKPOINT = "checkpoint.pt"
RESULT = "result.json"
_VERSION = 1


class RunError(ValueError):
    """A run folder that cannot be used as asked (another job in it, a finished run, a damaged checkpoint)."""


def _task_ids_for(strategy, scenario, j: int, n: int) -> torch.Tensor | None:
    exp = scenario.experiences[j]
    if scenario.multi_task:
        return torch.full((n,), int(exp.task_id), dtype=torch.int64)
    if strategy.needs_task_labels:
        return torch.full((n,), j, dtype=torch.int64)
    return None


def _can_answer(strategy, scenario, j: int) -> bool:
    """Whether the strategy can be asked about experience j now (oracle / task heads: only tasks seen)."""
    if not (scenario.multi_task or strategy.needs_task_labels):
        return True
    if scenario.multi_task:
        return scenario.experiences[j].task_id in set(strategy.experience_tasks)
    return j < strategy.experiences_seen


def evaluate_strategy(strategy, scenario, *, batch_size: int = 1000) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Accuracy of ``strategy`` on each experience's test set.

    Returns (accuracy per experience — NaN where the strategy cannot answer
    yet, e.g. the oracle on a task it has not seen —, per-class correct
    counts, per-class totals) over the experiences it can answer. Under
    ``torch.distributed`` (the strategy's ``distributed``, see
    :mod:`exml_fast.cl.parallel`) each rank counts its share of every test set
    and the counts are summed over the ranks: every rank returns the same.
    """
    rank, world = resolve_world(getattr(strategy, "distributed", None), "evaluate_strategy")
    k = scenario.num_classes
    n = len(scenario.experiences)
    counts = torch.zeros(n, 2, k, dtype=torch.int64)  # per experience: correct, total
    answers = [_can_answer(strategy, scenario, j) for j in range(n)]
    for j, exp in enumerate(scenario.experiences):
        if not answers[j]:
            continue
        tids = _task_ids_for(strategy, scenario, j, exp.test_y.shape[0])
        lo, hi = shard_rows(int(exp.test_y.shape[0]), rank, world)
        counts[j, 0], counts[j, 1] = accuracy_counts(
            lambda xb, tb: strategy.predict(xb, task_ids=tb), exp.test_x[lo:hi], exp.test_y[lo:hi], num_classes=k,
            batch_size=batch_size, task_ids=None if tids is None else tids[lo:hi])
    if world > 1:
        counts = all_reduce_sum(counts)
    row = [float(counts[j, 0].sum()) / max(1, int(counts[j, 1].sum())) if answers[j] else float("nan")
           for j in range(n)]
    return row, counts[:, 0].sum(0), counts[:, 1].sum(0)


def _stream_fingerprint(stream) -> list[str]:
    return [e["sha256"] for e in stream.entries]


def _job(strategy, stream, scenario) -> dict[str, Any]:
    return json.loads(json.dumps({
        "version": _VERSION, "strategy": strategy.config(),
        "experts": _stream_fingerprint(stream) if stream is not None else None,
        "scenario": scenario.describe(),
    }, default=str))


def _save_checkpoint(path: pathlib.Path, payload: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(payload, f))


def _load_checkpoint(path: pathlib.Path) -> dict[str, Any]:
    ckpt = load_torch_file(path, what="run checkpoint (delete it to start the run again)", error=RunError)
    if not isinstance(ckpt, dict) or not {"job", "strategy", "rows", "timings"} <= set(ckpt):
        raise RunError(f"{path}: not a run checkpoint of exml_fast.cl.engine (delete it to start the run again)")
    return ckpt


def _resume_from(out: pathlib.Path, ckpt_path: pathlib.Path, resume: bool, job: dict[str, Any],
                 strategy) -> dict[str, Any] | None:
    """The checkpoint of the run in ``out`` to continue (None: no run there yet); RunError when there is one
    and ``resume`` is not set, or it is another run's."""
    if not ckpt_path.exists():
        return None
    if not resume:
        raise RunError(f"run_stream: {out} already holds a run ({CHECKPOINT}); pass resume=True "
                       "(--resume) to continue it, or choose another folder")
    ckpt = _load_checkpoint(ckpt_path)
    stored = ckpt.get("job", {})
    if isinstance(stored.get("strategy"), dict) and "generator" in stored["strategy"] \
            and "source" not in stored["strategy"]:
        # Written before ED's data source was renamed from "generator" to "source": the same setting.
        stored["strategy"]["source"] = stored["strategy"].pop("generator")
    if isinstance(stored.get("strategy"), dict) and "ex_model" not in stored["strategy"]:
        # Written before configs recorded ex_model, which follows from the strategy and its data
        # source (both compared): not a difference.
        stored["strategy"]["ex_model"] = job["strategy"].get("ex_model")
    if isinstance(stored.get("strategy"), dict) and \
            stored["strategy"].get("strategy") == job["strategy"].get("strategy"):
        # Written before the strategy recorded these settings: the value its runs had then.
        for key, value in type(strategy).config_added.items():
            stored["strategy"].setdefault(key, value)
    differ = config_diff(stored, job)
    if differ:
        raise RunError(f"run_stream: {out} holds a different run; these settings differ: "
                       f"{', '.join(differ[:8])}")
    return ckpt


def run_stream(
    strategy,
    stream,
    scenario,
    *,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    eval_batch_size: int = 1000,
    plots: bool = True,
    progress: bool = True,
    log=print,
) -> StreamResult:
    """Trains ``strategy`` on every expert of ``stream`` in order and evaluates it after each.

    Args:
        strategy: a :class:`~exml_fast.cl.strategies.Strategy`.
        stream: an :class:`~exml_fast.cl.experts.ExpertStream` (or any sequence
            of experts with ``entries``); its experts are loaded one at a time.
            None: the strategy learns from data (class-incremental) and is fed
            the scenario's experiences, each with its training data.
        scenario: the :class:`~exml_fast.cl.scenarios.Scenario` the experts were
            trained on: its test sets are the evaluation (an ExML strategy never
            sees its training data unless it is Replay ED).
        out: a folder for ``checkpoint.pt`` (after every experience, atomic),
            ``result.json`` and the plots. None: nothing is written.
        resume: continue the run in ``out`` after its last checkpoint (the
            strategy's config, the experts and the scenario must match the
            checkpoint's); without it an existing checkpoint is an error.
        stop_after: stop after this many experiences (a resumable checkpoint
            stays in ``out``); None: the whole stream.
        eval_batch_size: test minibatch size.
        plots: write the accuracy-matrix heatmap, the stream-accuracy curve and
            (for strategies with a buffer) a grid of buffer samples per experience.
        progress: progress bars (the strategy's own are set by its constructor).
        log: called with one line per experience (None: silent).

    Under ``torchrun`` (a default process group of K > 1 ranks, unless the
    strategy's ``distributed`` is False) every rank calls this with the same
    arguments: synthesis is split over the ranks, training runs
    DistributedDataParallel on each rank's share of every minibatch
    (:mod:`exml_fast.cl.parallel`), evaluation counts are summed over the
    ranks, and rank 0 alone logs, reads the folder (its checkpoint reaches the
    others) and writes checkpoints, results and plots. A checkpoint does not
    depend on K: a run resumes under any number of processes.

    Returns:
        The :class:`~exml_fast.cl.metrics.StreamResult` (partial when stopped early; the same on every rank).
    """
    n = len(scenario.experiences)
    wants_data = getattr(strategy, "learns_from", "experts") == "data"
    if stream is None and not wants_data:
        raise ValueError(f"run_stream: {type(strategy).__name__} learns from experts: pass their stream")
    if stream is not None and wants_data:
        raise ValueError(f"run_stream: {type(strategy).__name__} learns from the scenario's data: pass stream=None")
    if stream is not None and len(stream) != n:
        raise ValueError(f"run_stream: the stream has {len(stream)} experts but the scenario {scenario.name!r} "
                         f"has {n} experiences")
    for j, exp in enumerate(scenario.experiences if stream is not None else ()):
        if tuple(stream.classes(j)) != tuple(exp.classes):
            raise ValueError(f"run_stream: expert {j} covers classes {list(stream.classes(j))} but experience {j} of "
                             f"the scenario has {list(exp.classes)}: the stream was trained on another scenario")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"run_stream: stop_after must be an int >= 1 or None; got {stop_after!r}")
    rank, world = resolve_world(getattr(strategy, "distributed", None), "run_stream")
    log = log if log is not None and rank == 0 else (lambda *_: None)
    job = _job(strategy, stream, scenario)
    rows: list[list[float]] = []
    timings: list[dict[str, float]] = []
    ckpt_path = result_path = None
    if out is not None:
        out = pathlib.Path(out)
        ckpt_path, result_path = out / CHECKPOINT, out / RESULT
        # Sharded: rank 0 reads the folder and every rank gets its checkpoint (or its error).
        # The folder must take writes before the first experience is trained (hours, at a paper's budget).
        found = None
        if rank == 0:
            try:
                found = ("ok", _resume_from(out, ckpt_path, resume, job, strategy))
                check_writable(out, "run_stream: out")
            except RunError as e:
                found = ("error", str(e))
            except OSError as e:
                found = ("os-error", e.errno, e.strerror, e.filename)
        if world > 1:
            found = broadcast_object(found)
        if found[0] == "error":
            raise RunError(found[1])
        if found[0] == "os-error":
            raise OSError(found[1], found[2], found[3])
        ckpt = found[1]
        if ckpt is not None:
            strategy.load_state_dict(ckpt["strategy"])
            rows, timings = ckpt["rows"], ckpt["timings"]
            log(f"resuming {out} after experience {len(rows)}/{n}")

    sizes = [int(e.test_y.shape[0]) for e in scenario.experiences]
    start = len(rows)
    stop = n if stop_after is None else min(n, stop_after)
    if world > 1:
        log(f"[{strategy.name}] sharded over {world} processes (torch.distributed, "
            f"{torch.distributed.get_backend()}): rank 0 writes the checkpoints and the result")
    shown = strategy.progress if hasattr(strategy, "progress") else None
    if rank != 0 and shown is not None:
        strategy.progress = False  # progress bars on rank 0 only
    try:
        rows, timings, correct, total = _experiences(strategy, stream, scenario, job, rows, timings, start, stop,
                                                     ckpt_path if rank == 0 else None, sizes, eval_batch_size, log)
    finally:
        if shown is not None:
            strategy.progress = shown
    if correct is None:  # resumed a run whose experts were all done: evaluate the restored strategy once more
        _, correct, total = evaluate_strategy(strategy, scenario, batch_size=eval_batch_size)
    per_class = [float(c) / float(t) if t > 0 else float("nan") for c, t in zip(correct.tolist(), total.tolist())]
    # Stopped early: the result covers the first k experiences only (a k x k matrix).
    k = len(rows)
    result = StreamResult(
        strategy=strategy.name, scenario=scenario.name, seed=getattr(strategy, "seed", None),
        acc_matrix=[list(r[:k]) for r in rows], test_sizes=sizes[:k], per_class_accuracy=per_class,
        meta={"config": job["strategy"], "ex_model": bool(getattr(strategy, "ex_model", True)),
              "keeps_data": bool(getattr(strategy, "keeps_data", False)), "timings": timings,
              "complete": k == n,
              "history": getattr(strategy, "history", [])},
    )
    if out is not None and rank == 0:
        if len(rows) == n:
            result.save_json(result_path)
        if plots:
            if importlib.util.find_spec("matplotlib") is None:
                warnings.warn("run_stream: plots skipped: matplotlib is not installed (pip install matplotlib); "
                              f"{RESULT} holds every number", stacklevel=2)
            else:
                _plots(result, strategy, scenario, out)
    if world > 1:  # every rank returns once rank 0 has written: the folder is whole when any rank is done
        barrier()
    return result


def _experiences(strategy, stream, scenario, job, rows, timings, start, stop, ckpt_path, sizes, eval_batch_size,
                 log):
    """Experiences ``start`` to ``stop`` of the run: train, evaluate, checkpoint (when ``ckpt_path``), log.
    Returns the rows and timings so far and the last evaluation's per-class counts (None if none ran)."""
    n = len(scenario.experiences)
    correct = total = None
    for i in range(start, stop):
        experience = stream[i] if stream is not None else scenario.experiences[i]
        t0 = time.perf_counter()
        strategy.train(experience)
        del experience
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        row, correct, total = evaluate_strategy(strategy, scenario, batch_size=eval_batch_size)
        t_eval = time.perf_counter() - t0
        rows.append(row)
        timings.append({"train_s": round(t_train, 3), "eval_s": round(t_eval, 3)})
        seen = [j for j in range(i + 1) if not math.isnan(row[j])]
        acc = sum(row[j] * sizes[j] for j in seen) / max(1, sum(sizes[j] for j in seen))
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, {"job": job, "strategy": strategy.state_dict(), "rows": rows,
                                         "timings": timings})
        log(f"[{strategy.name}] experience {i + 1}/{n}: stream accuracy {100 * acc:.2f} % "
            f"(train {t_train:.1f} s, eval {t_eval:.1f} s)" + (" — checkpoint written" if ckpt_path else ""))
    return rows, timings, correct, total


def _plots(result: StreamResult, strategy, scenario, out: pathlib.Path) -> None:
    from exml_fast.cl.metrics import plot_accuracy_matrix, plot_sample_grids, plot_stream_accuracy

    plot_accuracy_matrix(result, out / "accuracy_matrix.png")
    plot_stream_accuracy([result], out / "stream_accuracy.png")
    buffer = getattr(strategy, "buffer", None)
    if buffer is not None and len(buffer):
        plot_sample_grids(buffer.x, buffer.y, buffer.experience, out / "buffer.png", mean=scenario.mean,
                          std=scenario.std)
