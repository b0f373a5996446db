"""exml_fast.viz.grids (save_grid, to_unit_range): PNG grids of (synthetic) batches."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402  (torchvision's dependency)

from exml_fast.viz import save_grid, to_unit_range  # noqa: E402


def _read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def _cell(grid: np.ndarray, k: int, *, nrow: int, h: int, w: int, pad: int = 2) -> np.ndarray:
    """The k-th image of a torchvision grid (row-major), channel 0."""
    r, c = divmod(k, nrow)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    return grid[top : top + h, left : left + w, 0]


def test_unnormalises_with_the_batch_stats_and_sorts_by_class(tmp_path):
    mean, std = 0.25, 0.5
    pix = torch.tensor([0.0, 0.2, 0.6, 1.0])  # one constant image per value
    x = ((pix.view(4, 1, 1, 1).expand(4, 1, 5, 7)) - mean) / std
    y = torch.tensor([3, 1, 2, 0])
    batch = SimpleNamespace(x=x, y=y, mean=(mean,), std=(std,))
    path = tmp_path / "g.png"
    out = save_grid(batch, path, nrow=2)
    grid = _read_png(path)
    assert grid.shape == (2 + 2 * (5 + 2), 2 + 2 * (7 + 2), 3)
    # Sorted by label 0, 1, 2, 3 -> the images of pixel values 1.0, 0.2, 0.6, 0.0.
    expected = [255, round(0.2 * 255), round(0.6 * 255), 0]
    for k, v in enumerate(expected):
        cell = _cell(grid, k, nrow=2, h=5, w=7)
        assert np.abs(cell.astype(int) - v).max() <= 1, (k, cell.min(), cell.max(), v)
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([1.0, 0.2, 0.6, 0.0]), atol=1e-6)


def test_no_sort_keeps_order_and_arguments_override_batch_stats(tmp_path):
    x = torch.zeros(3, 1, 4, 4)
    x[1] = 1.0
    batch = SimpleNamespace(x=x, y=torch.tensor([2, 1, 0]), mean=(0.0,), std=(1.0,))
    out = save_grid(batch, tmp_path / "a.png", sort_by_class=False, mean=0.5, std=0.25)
    # x * 0.25 + 0.5: 0 -> 0.5, 1 -> 0.75 (the batch's own stats would give 0 and 1).
    assert torch.allclose(out[:, 0, 0, 0], torch.tensor([0.5, 0.75, 0.5]))


def test_clamps_to_unit_range():
    x = torch.tensor([-10.0, 0.0, 10.0]).view(3, 1, 1, 1)
    out = to_unit_range(x, mean=0.5, std=0.5)
    assert out.flatten().tolist() == [0.0, 0.5, 1.0]


def test_minmax_scale_for_a_plain_tensor_rgb(tmp_path):
    x = torch.linspace(-3, 5, 2 * 3 * 4 * 4).view(2, 3, 4, 4)
    path = tmp_path / "t.png"
    out = save_grid(x, path)
    assert out.min().item() == 0.0 and out.max().item() == 1.0
    grid = _read_png(path)
    assert grid.shape == (2 + 1 * 6, 2 + 2 * 6, 3)  # nrow = ceil(sqrt(2)) = 2
    assert torch.equal(to_unit_range(torch.full((1, 1, 2, 2), 7.0)), torch.full((1, 1, 2, 2), 0.5))


def test_per_channel_stats_and_bf16_input(tmp_path):
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    x = torch.zeros(4, 3, 3, 3, dtype=torch.bfloat16)
    out = save_grid(SimpleNamespace(x=x, y=None, mean=mean, std=std), tmp_path / "c.png")
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(mean))


def test_writes_png_whatever_the_extension_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "grid.jpg"
    save_grid(torch.rand(5, 1, 8, 8), path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path / "sub") == ["grid.jpg"]


@pytest.mark.parametrize(
    "batch, kwargs, match",
    [
        (torch.rand(1, 8, 8), {}, "4-D"),
        (torch.rand(0, 1, 8, 8), {}, "empty"),
        (torch.rand(2, 2, 8, 8), {}, "1 \\(grey\\) or 3"),
        (torch.rand(2, 3, 8, 8), {"mean": (0.1, 0.2), "std": (1.0, 1.0)}, "mean must have one value per .*1 or 3"),
        (torch.rand(2, 1, 8, 8), {"mean": 0.5}, "both mean and std"),
        (torch.rand(2, 1, 8, 8), {"mean": 0.5, "std": 0.0}, "std must be > 0"),
        (torch.rand(2, 1, 8, 8), {"nrow": 0}, "nrow"),
        (SimpleNamespace(x=torch.rand(3, 1, 4, 4), y=torch.tensor([0, 1]), mean=None, std=None), {}, "2 labels"),
    ],
)
def test_errors(tmp_path, batch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        save_grid(batch, tmp_path / "e.png", **kwargs)
    assert not os.listdir(tmp_path)


def test_rejects_other_objects(tmp_path):
    with pytest.raises(TypeError, match="SyntheticBatch"):
        save_grid([1, 2, 3], tmp_path / "e.png")
