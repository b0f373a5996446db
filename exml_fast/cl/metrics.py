"""Results of a continual-learning run (ExML or class-incremental): the accuracy matrix, stream accuracy,
forgetting, tables and plots.

A run over a stream of ``n`` experts gives the accuracy matrix ``R`` (n x n):
``R[i][j]`` is the accuracy of the learner after expert ``i`` (0-based) on
the test set of experience ``j`` — every ``j``, future ones too. From it
(and the test-set sizes ``n_j``):

- stream accuracy (Eq. 2 of the ExML paper) after expert ``i``: the accuracy
  over the union of the test sets seen so far,
  ``sum_{j<=i} R[i][j] n_j / sum_{j<=i} n_j``; the headline number is its last
  value (all test sets; class-incremental papers call it the last accuracy);
- average incremental accuracy (Rebuffi et al.): the mean of the stream
  accuracies after each experience;
- average forgetting, max over history (Chaudhry et al.):
  ``mean_{j<n-1} max_{j<=i<=n-2} R[i][j] - R[n-1][j]``;
- Avalanche's forgetting (what the ExML paper's experiments report):
  ``mean_{j<n-1} R[j][j] - R[n-1][j]``, the accuracy on j just after learning it
  minus the final one (equal to ``-bwt``; the two forgettings differ when the
  accuracy on j rose after expert j);
- backward transfer: ``mean_{j<n-1} R[n-1][j] - R[j][j]``.

Example::

    result = StreamResult(strategy="ed-di", scenario="split_mnist", seed=0,
                          acc_matrix=R, test_sizes=sizes, per_class_accuracy=pc)
    result.save_json("runs/ed-di/result.json")
    print(summary_table([StreamResult.load_json(p) for p in paths]))
    plot_accuracy_matrix(result, "runs/ed-di/matrix.png")

The plots are drawn by :mod:`exml_fast.viz` (matplotlib, imported when
called); this module only turns results into the curves and matrices drawn
there. :func:`plot_sample_grids` is :func:`exml_fast.viz.plot_sample_grids`,
re-exported here where it always was.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from exml_fast._utils.io import atomic_write
from exml_fast.viz.plots import Curve, accuracy_matrix_figure, curves_figure, plot_sample_grids, save_png

__all__ = ["PANELS", "StreamResult", "accuracy_counts", "learned_from_data", "plot_accuracy_matrix",
           "plot_sample_grids", "plot_stream_accuracy", "stream_accuracy_curves", "stream_accuracy_figure",
           "summary_table"]

FORMAT = "exml_fast.stream_result"
VERSION = 1

_FIELDS = ("strategy", "scenario", "seed", "acc_matrix", "test_sizes", "per_class_accuracy", "meta")
_DERIVED = ("stream_accuracy", "final_stream_accuracy", "average_forgetting", "avalanche_forgetting", "bwt")


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rate(v: Any, where: str, *, allow_nan: bool) -> float:
    """``v`` as a float in [0, 1] (or nan when allowed); None reads as nan (JSON has no nan)."""
    if v is None:
        v = math.nan
    if not _is_real(v) and hasattr(v, "item"):  # 1-element tensors, numpy scalars
        try:
            v = v.item()
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"StreamResult: {where} must be a number in [0, 1]; got {v!r}") from e
    if not _is_real(v):
        raise ValueError(f"StreamResult: {where} must be a number in [0, 1]; got {v!r}")
    v = float(v)
    if math.isnan(v):
        if not allow_nan:
            raise ValueError(f"StreamResult: {where} is nan, allowed only where there are no test samples "
                             "or for a future experience")
        return v
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"StreamResult: {where} must be an accuracy in [0, 1] (not %); got {v!r}")
    return v


def _pct(v: float, digits: int = 2) -> str:
    return "nan" if math.isnan(v) else f"{100.0 * v:.{digits}f}"


@dataclasses.dataclass
class StreamResult:
    """What one run of a strategy over an expert stream measured.

    Attributes:
        strategy: name of the strategy (e.g. "ed-mi", "oracle").
        scenario: name of the scenario (e.g. "split_mnist").
        seed: the run's seed, or None.
        acc_matrix: n x n accuracies in [0, 1]: ``acc_matrix[i][j]`` after
            expert ``i`` (0-based) on the test set of experience ``j``. An entry
            may be nan only for an experience with no test samples, or for a
            future experience (j > i) the strategy could not be asked about
            yet (the oracle and multi-task heads need a task seen); no metric
            reads those.
        test_sizes: n test-set sizes ``|D_test^j|`` (ints >= 0), the weights of
            the stream accuracy.
        per_class_accuracy: accuracy per class index after the last expert, in
            [0, 1]; nan for a class without test samples.
        meta: JSON-able extras (config, timings, ...).

    Lists are normalised to plain Python floats/ints on construction (tensors
    and numpy numbers are accepted) and checked; a bad value raises ValueError.
    """

    strategy: str
    scenario: str
    seed: int | None
    acc_matrix: list[list[float]]
    test_sizes: list[int]
    per_class_accuracy: list[float]
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("strategy", "scenario"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"StreamResult: {name} must be a non-empty string; got {getattr(self, name)!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"StreamResult: seed must be an int or None; got {self.seed!r}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"StreamResult: meta must be a dict; got {type(self.meta).__name__}")
        sizes = self.test_sizes.tolist() if isinstance(self.test_sizes, torch.Tensor) else self.test_sizes
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"StreamResult: test_sizes must be a non-empty list of ints (one per experience); "
                             f"got {self.test_sizes!r}")
        out_sizes = []
        for j, s in enumerate(sizes):
            if hasattr(s, "item") and not isinstance(s, (int, float)):
                s = s.item()
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"StreamResult: test_sizes[{j}] must be an int >= 0; got {s!r}")
            out_sizes.append(int(s))
        n = len(out_sizes)
        rows = self.acc_matrix.tolist() if isinstance(self.acc_matrix, torch.Tensor) else self.acc_matrix
        if not isinstance(rows, (list, tuple)) or len(rows) != n:
            raise ValueError(f"StreamResult: acc_matrix must be {n} x {n} (one row per expert, one column per "
                             f"experience, n = len(test_sizes)); got "
                             f"{len(rows) if isinstance(rows, (list, tuple)) else type(rows).__name__} rows")
        matrix = []
        for i, row in enumerate(rows):
            if isinstance(row, torch.Tensor):
                row = row.tolist()
            if not isinstance(row, (list, tuple)) or len(row) != n:
                raise ValueError(f"StreamResult: acc_matrix row {i} must have {n} entries (one per experience); "
                                 f"got {len(row) if isinstance(row, (list, tuple)) else row!r}")
            matrix.append([_rate(v, f"acc_matrix[{i}][{j}]", allow_nan=out_sizes[j] == 0 or j > i)
                           for j, v in enumerate(row)])
        pc = self.per_class_accuracy
        if isinstance(pc, torch.Tensor):
            pc = pc.tolist()
        if not isinstance(pc, (list, tuple)):
            raise ValueError(f"StreamResult: per_class_accuracy must be a list of floats; got {type(pc).__name__}")
        self.acc_matrix = matrix
        self.test_sizes = out_sizes
        self.per_class_accuracy = [_rate(v, f"per_class_accuracy[{c}]", allow_nan=True) for c, v in enumerate(pc)]

    # --------------------------------------------------------------- metrics
    @property
    def num_experiences(self) -> int:
        return len(self.test_sizes)

    @property
    def stream_accuracy(self) -> list[float]:
        """Eq. 2 after each expert i: accuracy over the union of test sets 0..i (nan if they are all empty)."""
        out = []
        for i, row in enumerate(self.acc_matrix):
            num = sum(row[j] * self.test_sizes[j] for j in range(i + 1) if self.test_sizes[j])
            den = sum(self.test_sizes[: i + 1])
            out.append(num / den if den else math.nan)
        return out

    @property
    def final_stream_accuracy(self) -> float:
        """Accuracy of the final learner over the union of all test sets."""
        return self.stream_accuracy[-1]

    @property
    def average_incremental_accuracy(self) -> float:
        """The mean of :attr:`stream_accuracy` over the experiences (iCaRL's average incremental accuracy;
        nan entries — all test sets so far empty — left out)."""
        vals = [v for v in self.stream_accuracy if not math.isnan(v)]
        return sum(vals) / len(vals) if vals else math.nan

    def _past(self) -> list[int]:
        return [j for j in range(self.num_experiences - 1) if self.test_sizes[j]]

    @property
    def average_forgetting(self) -> float:
        """Forgetting, max over history (Chaudhry et al.): mean over past experiences j of the best earlier
        accuracy on j minus the final one (0.0 for n = 1).

        Experiences without test samples are left out. See :attr:`avalanche_forgetting` for the form the
        ExML paper's experiments (Avalanche) report.
        """
        r, last, past = self.acc_matrix, self.num_experiences - 1, self._past()
        if not past:
            return 0.0
        return sum(max(r[i][j] for i in range(j, last)) - r[last][j] for j in past) / len(past)

    @property
    def avalanche_forgetting(self) -> float:
        """Forgetting as Avalanche reports it (the ExML paper's experiments): mean over past experiences j of
        the accuracy on j right after expert j minus the final one, ``R[j][j] - R[n-1][j]`` (0.0 for n = 1).

        Experiences without test samples are left out. Never above :attr:`average_forgetting`.
        """
        r, last, past = self.acc_matrix, self.num_experiences - 1, self._past()
        if not past:
            return 0.0
        return sum(r[j][j] - r[last][j] for j in past) / len(past)

    @property
    def bwt(self) -> float:
        """Backward transfer: mean over past j of R[n-1][j] - R[j][j] (0.0 for n = 1; negative = forgetting)."""
        r, last, past = self.acc_matrix, self.num_experiences - 1, self._past()
        if not past:
            return 0.0
        return sum(r[last][j] - r[j][j] for j in past) / len(past)

    # ----------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: the fields (nan written as None) plus the derived metrics under "summary"."""

        def nn(v: float) -> float | None:
            return None if math.isnan(v) else v

        return {
            "format": FORMAT,
            "version": VERSION,
            "strategy": self.strategy,
            "scenario": self.scenario,
            "seed": self.seed,
            "acc_matrix": [[nn(v) for v in row] for row in self.acc_matrix],
            "test_sizes": list(self.test_sizes),
            "per_class_accuracy": [nn(v) for v in self.per_class_accuracy],
            "meta": self.meta,
            "summary": {
                "stream_accuracy": [nn(v) for v in self.stream_accuracy],
                "final_stream_accuracy": nn(self.final_stream_accuracy),
                "average_incremental_accuracy": nn(self.average_incremental_accuracy),
                "average_forgetting": nn(self.average_forgetting),
                "avalanche_forgetting": nn(self.avalanche_forgetting),
                "bwt": nn(self.bwt),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StreamResult:
        """Rebuilds a result from :meth:`to_dict`'s dict, checking it ("summary" is recomputed, not read, so
        files written before a summary entry existed, e.g. "avalanche_forgetting", load and gain it).

        Raises:
            ValueError: another format or version, missing or unknown keys, bad values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"StreamResult.from_dict: expected a dict; got {type(d).__name__}")
        if "format" in d and d["format"] != FORMAT:
            raise ValueError(f"StreamResult.from_dict: not a stream result (format {d['format']!r}, "
                             f"expected {FORMAT!r})")
        if "version" in d and d["version"] != VERSION:
            raise ValueError(f"StreamResult.from_dict: unknown version {d['version']!r}; this exml_fast reads "
                             f"version {VERSION}")
        missing = [k for k in ("strategy", "scenario", "acc_matrix", "test_sizes", "per_class_accuracy")
                   if k not in d]
        if missing:
            raise ValueError(f"StreamResult.from_dict: missing keys {missing}")
        unknown = sorted(set(d) - set(_FIELDS) - {"format", "version", "summary"})
        if unknown:
            raise ValueError(f"StreamResult.from_dict: unknown keys {unknown}; expected {list(_FIELDS)}")
        return cls(**{k: d[k] for k in _FIELDS if k in d})

    def save_json(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dict` as JSON (strict: no NaN literals) to ``path``, atomically."""
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"StreamResult.save_json: meta must be JSON-able (finite numbers, strings, lists, "
                             f"dicts): {e}") from e
        atomic_write(path, lambda f: f.write(text.encode()))

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> StreamResult:
        """Reads a file written by :meth:`save_json` (ValueError naming the file if it is not one)."""
        path = os.fspath(path)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"StreamResult.load_json: {path}: not valid JSON: {e}") from e
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"StreamResult.load_json: {path}: {e}") from e

    def to_markdown(self) -> str:
        """The accuracy matrix (%) as a Markdown table, then the summary lines."""
        n = self.num_experiences
        seed = "" if self.seed is None else f" (seed {self.seed})"
        lines = [
            f"### {self.strategy} on {self.scenario}{seed}",
            "",
            "Accuracy (%) on the test set of each experience (columns) after each expert (rows):",
            "",
            "| after expert | " + " | ".join(f"exp {j}" for j in range(n)) + " |",
            "|---|" + "---:|" * n,
        ]
        for i, row in enumerate(self.acc_matrix):
            lines.append(f"| {i} | " + " | ".join(_pct(v) for v in row) + " |")
        lines += [
            "",
            f"- stream accuracy: {_pct(self.final_stream_accuracy)} %",
            f"- stream accuracy after each expert: {', '.join(_pct(v) for v in self.stream_accuracy)} %",
            f"- average incremental accuracy: {_pct(self.average_incremental_accuracy)} %",
            f"- average forgetting (max over history): {_pct(self.average_forgetting)} %",
            f"- forgetting, Avalanche's (R[j][j] − R[T][j]): {_pct(self.avalanche_forgetting)} %",
            f"- BWT: {_pct(self.bwt)} %",
            f"- test sizes: {', '.join(str(s) for s in self.test_sizes)}",
        ]
        if "ex_model" in self.meta:
            lines.append("- ex-model (no data of the experiences, no past expert kept): "
                         + ("yes" if self.meta["ex_model"] else "no"))
        if "keeps_data" in self.meta:
            lines.append("- keeps real data of past experiences: " + ("yes" if self.meta["keeps_data"] else "no"))
        if self.per_class_accuracy:
            pcs = ", ".join(f"{c}: {_pct(v, 1)}" for c, v in enumerate(self.per_class_accuracy))
            lines.append(f"- per-class accuracy after the last expert (%): {pcs}")
        return "\n".join(lines) + "\n"


def _groups(results: Sequence[StreamResult], owner: str) -> dict[tuple[str, str], list[StreamResult]]:
    results = list(results)
    if not results:
        raise ValueError(f"{owner}: results must not be empty")
    groups: dict[tuple[str, str], list[StreamResult]] = {}
    for r in results:
        if not isinstance(r, StreamResult):
            raise TypeError(f"{owner}: results must be StreamResult objects; got {type(r).__name__}")
        groups.setdefault((r.strategy, r.scenario), []).append(r)
    return groups


def mean_std(values: list[float], ddof: int) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) <= ddof:
        return m, math.nan
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - ddof))


def summary_table(results: Sequence[StreamResult], *, ddof: int = 1) -> str:
    """A Markdown table, one row per (strategy, scenario) in order of first appearance.

    Each row gives whether the strategy keeps real data of past experiences
    (``meta["keeps_data"]``; "?" where the results do not say), the number of
    runs (e.g. seeds) and, over them, mean ± std of the final stream accuracy,
    the average incremental accuracy, the average forgetting (max over history),
    Avalanche's forgetting (``R[j][j] − R[T][j]``) and the BWT, in %.
    ``ddof`` is the std's delta degrees of freedom: 1 (default) is the sample
    std over runs, 0 the population std (``numpy.std``'s default). With too
    few runs for the std (one run, ddof 1) only the mean is shown.
    """
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ValueError(f"summary_table: ddof must be 0 or 1; got {ddof!r}")
    groups = _groups(results, "summary_table")

    def cell(values: list[float]) -> str:
        m, s = mean_std(values, ddof)
        return _pct(m) if math.isnan(s) else f"{_pct(m)} ± {_pct(s)}"

    lines = ["| strategy | keeps data | scenario | runs | stream accuracy (%) | average incremental (%) "
             "| forgetting, max (%) | forgetting, Avalanche (%) | BWT (%) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (strategy, scenario), rs in groups.items():
        keeps = {r.meta.get("keeps_data") for r in rs}
        keeps_cell = "yes" if keeps == {True} else "no" if keeps == {False} else "?"
        lines.append(f"| {strategy} | {keeps_cell} | {scenario} | {len(rs)} | "
                     f"{cell([r.final_stream_accuracy for r in rs])} | "
                     f"{cell([r.average_incremental_accuracy for r in rs])} | "
                     f"{cell([r.average_forgetting for r in rs])} | {cell([r.avalanche_forgetting for r in rs])} | "
                     f"{cell([r.bwt for r in rs])} |")
    return "\n".join(lines) + "\n"


def accuracy_counts(
    logits_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    batch_size: int = 1000,
    task_ids: torch.Tensor | None = None,
    device: str | torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class top-1 counts of a classifier on ``(x, y)``.

    Args:
        logits_fn: ``logits_fn(xb, tb)`` -> (B, num_classes) logits for a
            minibatch ``xb`` (B, ...) and its task ids ``tb`` (B,) int64 or None
            (e.g. ``strategy.predict``). Called under ``torch.no_grad``.
        x: (N, ...) inputs.
        y: (N,) integer labels in [0, num_classes).
        num_classes: K, the number of outputs.
        batch_size: minibatch size (>= 1).
        task_ids: (N,) integer task label of each sample, or None.
        device: where minibatches of ``x`` and ``task_ids`` are moved before
            the call (None: left where they are).

    Returns:
        ``(correct, total)``: two (num_classes,) int64 CPU tensors; per class,
        how many samples were predicted right (argmax) and how many there are.
    """
    owner = "accuracy_counts"
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{owner}: num_classes must be an int >= 1; got {num_classes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"{owner}: batch_size must be an int >= 1; got {batch_size!r}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{owner}: x must be a tensor (N, ...); got {type(x).__name__}")
    n = x.shape[0]

    def labels(v, name):
        if not isinstance(v, torch.Tensor) or v.shape != (n,) or v.dtype.is_floating_point or v.dtype.is_complex \
                or v.dtype == torch.bool:
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"{owner}: {name} must be an integer tensor of shape ({n},) (one per sample of x); "
                             f"got {got}")
        return v.detach().to("cpu", torch.int64)

    y = labels(y, "y")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{owner}: y must hold classes in [0, {num_classes}); got values in "
                         f"[{int(y.min())}, {int(y.max())}]")
    if task_ids is not None:
        task_ids = labels(task_ids, "task_ids")
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.bincount(y, minlength=num_classes)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size]
            tb = None if task_ids is None else task_ids[start : start + batch_size]
            if device is not None:
                xb = xb.to(device)
                tb = None if tb is None else tb.to(device)
            logits = logits_fn(xb, tb)
            if not isinstance(logits, torch.Tensor) or logits.shape != (xb.shape[0], num_classes):
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise ValueError(f"{owner}: logits_fn must return ({xb.shape[0]}, {num_classes}) logits for a "
                                 f"minibatch of {xb.shape[0]}; got {got}")
            yb = y[start : start + batch_size]
            hit = logits.argmax(1).cpu() == yb
            correct += torch.bincount(yb[hit], minlength=num_classes)
    return correct, total


# -------------------------------------------------------------------- plots
# The drawing lives in exml_fast.viz; here results become the curves and matrices it draws.

#: The panel titles of :func:`stream_accuracy_figure` when results of both kinds are drawn.
PANELS = ("Ex-Model CL: learning from experts", "class-incremental: learning from the tasks' data")


def learned_from_data(result: StreamResult) -> bool:
    """Whether ``result`` is a class-incremental run (its strategy learned from the experiences' data) rather
    than an Ex-Model one (from experts): ``meta["learns_from"] == "data"`` where the run records it, else
    whether its strategy config records ``keeps_data``, which only the data strategies' configs hold."""
    learns = result.meta.get("learns_from")
    if learns is not None:
        return learns == "data"
    config = result.meta.get("config")
    return isinstance(config, dict) and "keeps_data" in config


def stream_accuracy_curves(results: Sequence[StreamResult]) -> list[Curve]:
    """One :class:`~exml_fast.viz.Curve` of stream accuracy (%) per (strategy, scenario), in order of first
    appearance: the mean over its results (e.g. seeds), with ± one sample std as its spread when there are
    several. Ex-Model and class-incremental results (:func:`learned_from_data`) go in the two
    :data:`PANELS` when there are both. The legend names the scenario too when there are several."""
    owner = "plot_stream_accuracy"
    groups = _groups(results, owner)
    several = len({sc for _, sc in groups}) > 1
    both = len({learned_from_data(rs[0]) for rs in groups.values()}) > 1
    curves = []
    for (strategy, scenario), rs in groups.items():
        lengths = {r.num_experiences for r in rs}
        if len(lengths) != 1:
            raise ValueError(f"{owner}: the runs of {strategy!r} on {scenario!r} have different "
                             f"numbers of experiences {sorted(lengths)}")
        n = lengths.pop()
        runs = [[100.0 * v for v in r.stream_accuracy] for r in rs]
        stats = [mean_std([c[i] for c in runs], 1) for i in range(n)]
        label = f"{strategy} ({scenario})" if several else strategy
        if len(rs) > 1:
            label += f", {len(rs)} runs"
        panel = PANELS[learned_from_data(rs[0])] if both else ""
        curves.append(Curve(label, [m for m, _ in stats], [s for _, s in stats] if len(rs) > 1 else None,
                            panel=panel))
    return curves


def stream_accuracy_figure(results: Sequence[StreamResult], *, title: str | None = None):
    """The matplotlib ``Figure`` :func:`plot_stream_accuracy` writes (see there)."""
    curves = stream_accuracy_curves(results)
    # an Ex-Model run learns from an expert per experience, a class-incremental one from a task's data
    after = {False: "after expert (experience index)", True: "after task (experience index)"}
    kinds = {learned_from_data(r) for r in results}
    xlabel = after[kinds.pop()] if len(kinds) == 1 else {PANELS[k]: label for k, label in after.items()}
    return curves_figure(curves, xlabel=xlabel, ylabel="stream accuracy (%)", title=title,
                         ylim=(0.0, 102.0))  # room for markers at 100 %


def plot_stream_accuracy(results: Sequence[StreamResult], path: str | os.PathLike, *,
                         title: str | None = None) -> None:
    """Writes a PNG of stream accuracy (%) after each expert, one line per strategy, at ``path``.

    Results with the same strategy and scenario (e.g. seeds) are one line:
    their mean, with a band of ± one std (sample std) when there are several.
    They must have the same number of experiences. The legend names the
    scenario too when ``results`` hold more than one. Ex-Model and
    class-incremental runs are drawn in two panels side by side when there are
    both (:func:`learned_from_data`), and no two lines share a colour and line
    style (:func:`exml_fast.viz.line_styles`).
    """
    save_png(stream_accuracy_figure(results, title=title), path)


def plot_accuracy_matrix(result: StreamResult, path: str | os.PathLike, *, title: str | None = None) -> None:
    """Writes the accuracy matrix of ``result`` as a PNG heatmap (%, numbers in the cells) at ``path``.

    Rows: after expert i; columns: test set of experience j. ``title``
    defaults to "strategy on scenario: stream accuracy x %".
    """
    if not isinstance(result, StreamResult):
        raise TypeError(f"plot_accuracy_matrix: result must be a StreamResult; got {type(result).__name__}")
    values = [[100.0 * v for v in row] for row in result.acc_matrix]
    title = title or f"{result.strategy} on {result.scenario}: stream accuracy {_pct(result.final_stream_accuracy)} %"
    save_png(accuracy_matrix_figure(values, title=title), path)
