"""benches/bench_synthesis.py's search and floor, which its recorded figures rest on: the time-to-quality
search finds the fewest steps for every position of the answer, at a cost of a few times the answer, and
the floor times the network's own layers. Nothing here times anything that is asserted."""

from __future__ import annotations

import pytest
from _util import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_synthesis") as mod:
        yield mod


@pytest.mark.parametrize("n", [1, 2, 7, 40, 120])
def test_smallest_steps_finds_the_first_grid_point_that_meets_the_bar(bench, n):
    grid = [50 * (i + 1) for i in range(n)]
    for answer in [*range(n), None]:  # the index of the first step count that meets the bar; None: none does
        bar = grid[answer] if answer is not None else float("inf")
        calls = []

        def run(steps):
            calls.append(steps)
            return steps, 0.01 * steps

        def meets(x):
            return x >= bar, 1.0, 0.0

        steps, wall, probes = bench.smallest_steps(run, grid, meets)
        assert [p["steps"] for p in probes] == calls
        if answer is None:
            assert (steps, wall) == (None, None)
            assert calls[-1] == grid[-1]
        else:
            assert steps == grid[answer]
            assert wall == pytest.approx(0.01 * grid[answer])
            # galloping then bisection: about 2 log2 probes, none longer than twice the answer (plus one grid
            # step), so the search costs a few times the answer whatever the grid's end
            assert len(calls) <= 2 * (answer + 1).bit_length() + 1
            assert max(calls) <= 2 * grid[answer] + grid[0]


def test_conv_floor_times_every_conv_and_linear_layer(bench):
    floor = bench.conv_floor("lenet5_bn", 4, step_s=1.0)
    assert floor["layers"] == 5  # LeNet-5-BN: two convolutions, three linear layers
    assert floor["floor_s"] > 0 and floor["fraction_of_floor"] == pytest.approx(floor["floor_s"])
    assert floor["gflop_per_step"] == pytest.approx(4 * floor["gflop_per_image"])
    assert floor["conv_gflops"] > 0 and floor["sgemm_gflops"] > 0
