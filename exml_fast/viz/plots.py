"""Line and matrix plots and per-group image grids, drawn with matplotlib (imported when called).

Nothing here touches pyplot's global state: figures are ``matplotlib.figure.Figure`` objects, written
atomically as PNG by :func:`save_png`. Every line of a :func:`curves_figure` gets its own (colour, line
style) pair (:func:`line_styles`), so no two lines look alike however many there are (up to
``len(COLOURS) * len(LINE_STYLES)``).

Example::

    curves = [Curve("mi-ed", [99.5, 80.1, 60.2]), Curve("finetune", [99.6, 49.0, 33.0], panel="from data")]
    plot_curves(curves, "runs/stream.png", xlabel="after expert", ylabel="stream accuracy (%)")
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from exml_fast._utils.io import atomic_write
from exml_fast.viz.grids import to_unit_range

__all__ = ["COLOURS", "LINE_STYLES", "Curve", "accuracy_matrix_figure", "curves_figure", "line_styles",
           "plot_curves", "plot_sample_grids", "round_robin", "save_png"]

#: matplotlib's default colour cycle ("tab10"), the colours of :func:`line_styles` in order.
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")
#: The line styles :func:`line_styles` moves to once the colours are used up, each with its own marker.
LINE_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def _figure(owner: str, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{owner} needs matplotlib: pip install matplotlib") from e
    return Figure(**kwargs)


def save_png(fig, path: str | os.PathLike) -> None:
    """Writes the matplotlib figure ``fig`` as a PNG at ``path`` (atomically; parent folders are created)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write(path, lambda f: f.write(buf.getbuffer()))


# ------------------------------------------------------------------------------------------------- curves


@dataclass(frozen=True)
class Curve:
    """One line of a :func:`curves_figure`.

    Attributes:
        label: its legend entry.
        y: the values at x = 0, 1, ..., len(y) - 1.
        spread: a band of ± ``spread[i]`` around ``y[i]`` (e.g. one std over runs); None: no band.
        panel: the title of the panel (subplot) the line goes in; curves with the same panel share one.
    """

    label: str
    y: Sequence[float]
    spread: Sequence[float] | None = None
    panel: str = ""


def line_styles(n: int) -> list[tuple[str, str, str]]:
    """``n`` distinct (colour, line style, marker) triples: the ten :data:`COLOURS` with solid lines, then the
    ten with dashed lines, and so on through :data:`LINE_STYLES` (so at most 40 lines)."""
    most = len(COLOURS) * len(LINE_STYLES)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= most:
        raise ValueError(f"line_styles: n must be an int in 0..{most} (distinct colour and line style pairs); "
                         f"got {n!r}")
    return [(COLOURS[i % len(COLOURS)], LINE_STYLES[i // len(COLOURS)], _MARKERS[i // len(COLOURS)])
            for i in range(n)]


def _check_curves(curves: Sequence[Curve], owner: str) -> list[Curve]:
    curves = list(curves)
    if not curves:
        raise ValueError(f"{owner}: curves must not be empty")
    for c in curves:
        if not isinstance(c, Curve):
            raise TypeError(f"{owner}: curves must be Curve objects; got {type(c).__name__}")
        if len(c.y) == 0:
            raise ValueError(f"{owner}: the curve {c.label!r} has no values")
        if c.spread is not None and len(c.spread) != len(c.y):
            raise ValueError(f"{owner}: the curve {c.label!r} has {len(c.y)} values but {len(c.spread)} spreads")
    return curves


def curves_figure(curves: Sequence[Curve], *, xlabel: str | Mapping[str, str], ylabel: str,
                  title: str | None = None, ylim: tuple[float, float] | None = None):
    """A matplotlib ``Figure`` with one line per curve, one panel (side by side, in order of first
    appearance) per distinct :attr:`Curve.panel`, and each panel's legend below it, off the lines.

    Every line has its own (colour, line style) pair over the whole figure (:func:`line_styles`, in the
    order of ``curves``); a curve's band, when it has one, takes its line's colour. The x axis is the index
    0 .. n - 1 of the longest curve. ``xlabel``: one label for every panel, or one per panel (a mapping from
    each :attr:`Curve.panel` to its label).
    """
    owner = "curves_figure"
    curves = _check_curves(curves, owner)
    panels = list(dict.fromkeys(c.panel for c in curves))
    if isinstance(xlabel, Mapping):
        missing = [p for p in panels if p not in xlabel]
        if missing:
            raise ValueError(f"{owner}: xlabel has no label for the panels {missing}")
    elif not isinstance(xlabel, str):
        raise TypeError(f"{owner}: xlabel must be a str or a mapping of panel to str, got {type(xlabel).__name__}")
    styles = line_styles(len(curves))
    longest = max(len(c.y) for c in curves)
    fig = _figure(owner, figsize=(6.0 * len(panels), 4.0 + 0.2 * math.ceil(len(curves) / len(panels) / 2)),
                  layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False, sharey=True)[0]
    for ax, panel in zip(axes, panels):
        for c, (colour, style, marker) in zip(curves, styles):
            if c.panel != panel:
                continue
            x = range(len(c.y))
            ax.plot(x, list(c.y), color=colour, linestyle=style, marker=marker, markersize=4, label=c.label)
            if c.spread is not None:
                ax.fill_between(x, [m - s for m, s in zip(c.y, c.spread)], [m + s for m, s in zip(c.y, c.spread)],
                                color=colour, alpha=0.15)
        ax.set_xticks(range(longest))
        ax.set_xlim(-0.2, longest - 0.8)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[panel])
        ax.grid(alpha=0.3)
        if panel:
            ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    axes[0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_curves(curves: Sequence[Curve], path: str | os.PathLike, **kwargs) -> None:
    """Writes :func:`curves_figure` ``(curves, **kwargs)`` as a PNG at ``path``."""
    save_png(curves_figure(curves, **kwargs), path)


# ------------------------------------------------------------------------------------------------ matrices


def accuracy_matrix_figure(values: Sequence[Sequence[float]], *, title: str):
    """A heatmap ``Figure`` of an n x n matrix of percentages in [0, 100] (nan allowed), the numbers in the
    cells. Rows: after expert i; columns: test set of experience j."""
    n = len(values)
    side = max(3.0, 0.7 * n + 1.5)
    fig = _figure("accuracy_matrix_figure", figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=100.0, cmap="viridis")
    for i in range(n):
        for j in range(n):
            v = values[i][j]
            ax.text(j, i, "nan" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="black" if v >= 60.0 else "white")
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xlabel("test set of experience")
    ax.set_ylabel("after expert")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    return fig


# ------------------------------------------------------------------------------------- image grids by group


def round_robin(y: torch.Tensor, k: int) -> torch.Tensor:
    """Up to k positions of ``y`` taking classes in turn (first of each class, then second, ...), by class."""
    order = torch.sort(y, stable=True).indices
    ys = y[order]
    first = torch.searchsorted(ys, ys, side="left")
    rank = torch.arange(ys.numel()) - first
    classes = torch.unique(ys, sorted=True)
    cls_pos = torch.searchsorted(classes, ys)
    key = rank * classes.numel() + cls_pos
    chosen = order[torch.sort(key, stable=True).indices[:k]]
    # Shown grouped by class, each class in buffer order.
    return chosen[torch.sort(y[chosen] * (y.numel() + 1) + chosen, stable=True).indices]


def _check_grid_inputs(x, y, experience, per_experience, ncol, owner: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] == 0:
        raise ValueError(f"{owner}: x must be a non-empty (N, C, H, W) tensor; got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{owner}: images must have 1 (grey) or 3 (RGB) channels; got C = {x.shape[1]}")
    n = x.shape[0]
    for name, v in (("y", y), ("experience", experience)):
        if not isinstance(v, torch.Tensor) or v.shape != (n,) or v.dtype.is_floating_point or v.dtype == torch.bool:
            raise ValueError(f"{owner}: {name} must be an integer tensor of shape ({n},); got "
                             f"{f'{v.dtype} {tuple(v.shape)}' if isinstance(v, torch.Tensor) else type(v).__name__}")
    for name, v in (("per_experience", per_experience), ("ncol", ncol)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{owner}: {name} must be an int >= 1; got {v!r}")


def plot_sample_grids(
    x: torch.Tensor,
    y: torch.Tensor,
    experience: torch.Tensor,
    path: str | os.PathLike,
    *,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    per_experience: int = 32,
    ncol: int = 16,
) -> None:
    """Writes ONE PNG at ``path`` with a block of image rows per experience (e.g. a buffer's content).

    Blocks go top to bottom in ascending experience index, each titled with
    the experience, its classes and how many of its samples are shown. A block
    shows up to ``per_experience`` samples chosen deterministically and
    class-balanced (the first sample of each class, then the second, ...),
    grouped by class, ``ncol`` per row (blank cells fill the last row).

    Args:
        x: (N, C, H, W) images, C = 1 or 3 (e.g. ``buffer.x``).
        y: (N,) integer labels (``buffer.y``).
        experience: (N,) integer experience index (``buffer.experience``).
        path: the PNG to write (atomically).
        mean, std: the normalisation to undo (as :func:`exml_fast.viz.to_unit_range`);
            neither: all shown images are min-max scaled together.
        per_experience: most images per experience (>= 1).
        ncol: images per row (>= 1).
    """
    owner = "plot_sample_grids"
    _check_grid_inputs(x, y, experience, per_experience, ncol, owner)
    try:
        from torchvision.utils import make_grid
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{owner} needs torchvision: pip install 'exml_fast[vision]'") from e
    y = y.detach().to("cpu", torch.int64)
    experience = experience.detach().to("cpu", torch.int64)

    blocks = []  # (experience, classes, chosen positions, total in experience)
    for e in torch.unique(experience, sorted=True).tolist():
        members = torch.nonzero(experience == e, as_tuple=False).flatten()
        chosen = members[round_robin(y[members], per_experience)]
        blocks.append((e, torch.unique(y[members]).tolist(), chosen, members.numel()))
    shown = torch.cat([b[2] for b in blocks])
    # One to_unit_range call: min-max scaling (no mean/std) is shared by all blocks.
    images = to_unit_range(x.detach()[shown], mean=mean, std=std)
    h, w = x.shape[2], x.shape[3]
    rows = [math.ceil(b[2].numel() / ncol) for b in blocks]
    cell = 0.4 * max(h, w, 16) / 32  # inches per image: 0.4 for 32 x 32, never below 0.2
    fig = _figure(owner, figsize=(max(3.5, cell * ncol * w / max(h, w)), sum(cell * r + 0.3 for r in rows)),
                  layout="constrained")
    axes = fig.subplots(len(blocks), 1, squeeze=False, gridspec_kw={"height_ratios": rows})[:, 0]
    start = 0
    for ax, (e, classes, chosen, total), r in zip(axes, blocks, rows):
        k = chosen.numel()
        block = images[start : start + k]
        start += k
        blank = torch.ones(r * ncol - k, *block.shape[1:])
        grid = make_grid(torch.cat([block, blank]), nrow=ncol, padding=2, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0.0, vmax=1.0)
        ax.set_axis_off()
        ax.set_title(f"experience {e}: classes {classes} ({k} of {total} shown)", fontsize=8, loc="left")
    save_png(fig, path)
