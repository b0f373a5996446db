"""exml_fast.viz.plots: distinct line styles, curve figures, per-experience image grids."""

from __future__ import annotations

import struct

import pytest
import torch

from exml_fast.viz import COLOURS, LINE_STYLES, Curve, curves_figure, line_styles, plot_curves, plot_sample_grids
from exml_fast.viz.plots import round_robin


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_line_styles_are_distinct_pairs():
    most = len(COLOURS) * len(LINE_STYLES)
    styles = line_styles(most)
    assert len({(c, s) for c, s, _ in styles}) == most
    assert [c for c, _, _ in styles[:10]] == list(COLOURS) and {s for _, s, _ in styles[:10]} == {"-"}
    assert styles[10][:2] == (COLOURS[0], "--")
    for bad in (-1, most + 1, 2.0, True):
        with pytest.raises(ValueError, match="line_styles: n must be an int"):
            line_styles(bad)


def test_curves_figure_panels_bands_and_errors(tmp_path):
    pytest.importorskip("matplotlib")
    curves = [Curve("a", [1.0, 2.0, 3.0], [0.5, 0.5, 0.5], panel="left"), Curve("b", [2.0, 1.0], panel="right"),
              Curve("c", [3.0, 3.0, 1.0], panel="left")]
    fig = curves_figure(curves, xlabel="x", ylabel="y", title="t")
    assert [ax.get_title() for ax in fig.axes] == ["left", "right"]
    assert [[line.get_label() for line in ax.get_lines()] for ax in fig.axes] == [["a", "c"], ["b"]]
    assert len(fig.axes[0].collections) == 1  # a's band only
    plot_curves(curves, tmp_path / "c.png", xlabel="x", ylabel="y")
    assert min(_png_size(tmp_path / "c.png")) > 100
    fig = curves_figure(curves, xlabel={"left": "x1", "right": "x2"}, ylabel="y")
    assert [ax.get_xlabel() for ax in fig.axes] == ["x1", "x2"]
    with pytest.raises(ValueError, match=r"xlabel has no label for the panels \['right'\]"):
        curves_figure(curves, xlabel={"left": "x1"}, ylabel="y")
    with pytest.raises(TypeError, match="xlabel must be a str or a mapping"):
        curves_figure(curves, xlabel=3, ylabel="y")
    with pytest.raises(ValueError, match="must not be empty"):
        curves_figure([], xlabel="x", ylabel="y")
    with pytest.raises(ValueError, match="3 values but 2 spreads"):
        curves_figure([Curve("a", [1.0, 2.0, 3.0], [0.1, 0.1])], xlabel="x", ylabel="y")
    with pytest.raises(TypeError, match="Curve objects"):
        curves_figure([[1.0, 2.0]], xlabel="x", ylabel="y")


def test_plot_sample_grids(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torchvision")
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    n = 70
    x = torch.randn(n, 1, 8, 8, generator=g)
    experience = torch.tensor([0] * 40 + [1] * 25 + [3] * 5)
    y = torch.cat([torch.arange(40) % 2, 2 + torch.arange(25) % 3, torch.full((5,), 9)])
    path = tmp_path / "grid.png"
    plot_sample_grids(x, y, experience, path, mean=0.5, std=0.25, per_experience=12, ncol=6)
    w, h = _png_size(path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (w, h)
    # Three blocks (2 + 2 + 1 rows of 6 cells) against one block of 2 rows: each
    # experience gets its own rows, so the image is taller.
    plot_sample_grids(x[:40], y[:40], experience[:40], tmp_path / "one.png", per_experience=12, ncol=6)
    assert _png_size(tmp_path / "one.png")[1] < h
    with pytest.raises(ValueError, match="channels"):
        plot_sample_grids(torch.zeros(2, 2, 4, 4), y[:2], experience[:2], tmp_path / "c.png")
    with pytest.raises(ValueError, match=r"experience must be an integer tensor of shape \(2,\)"):
        plot_sample_grids(x[:2], y[:2], experience[:3], tmp_path / "e.png")
    with pytest.raises(ValueError, match="per_experience"):
        plot_sample_grids(x[:2], y[:2], experience[:2], tmp_path / "p.png", per_experience=0)


def test_round_robin_selection_is_class_balanced():
    y = torch.tensor([4, 4, 4, 4, 4, 1, 7, 1, 4, 7])
    sel = round_robin(y, 5)
    # First of each class (4, 1, 7), then second of each: classes 1, 4 by class value.
    assert sorted(y[sel].tolist()) == [1, 1, 4, 4, 7]
    assert y[sel].tolist() == sorted(y[sel].tolist())  # grouped by class
    assert sel.tolist() == [5, 7, 0, 1, 6]
    assert round_robin(y, 100).numel() == 10
