"""benches/bench_synthesis.py's search and floor, which its recorded figures rest on: the time-to-quality
search finds the fewest steps for every position of the answer, at a cost of a few times the answer, and
the floor times the network's own layers. Nothing here times anything that is asserted."""

from __future__ import annotations

import pytest
import torch
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

        def measure(steps):
            calls.append(steps)
            return {"steps": steps, "wall_s": 0.01 * steps, "agreement": 1.0, "bn": 0.0, "meets": steps >= bar}

        steps, wall, probes = bench.smallest_steps(measure, grid)
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


@pytest.mark.parametrize("rel_tol", [0.1, 0.25])
def test_smallest_steps_with_a_tolerance_answers_a_call_that_meets_the_bar_within_it(bench, rel_tol):
    grid = [50 * (i + 1) for i in range(40)]
    for true in grid:
        calls = []

        def measure(steps, true=true):
            calls.append(steps)
            return {"steps": steps, "wall_s": 0.01 * steps, "agreement": 1.0, "bn": 0.0, "meets": steps >= true}

        steps, _, _ = bench.smallest_steps(measure, grid, rel_tol=rel_tol)
        assert steps >= true and steps - true <= rel_tol * steps
        exact = []
        bench.smallest_steps(lambda k, exact=exact, true=true: exact.append(k) or
                             {"steps": k, "wall_s": 0.0, "agreement": 1.0, "bn": 0.0, "meets": k >= true}, grid)
        assert len(calls) <= len(exact)


def test_conv_floor_times_every_conv_and_linear_layer(bench):
    floor = bench.conv_floor("lenet5_bn", 4, step_s=1.0)
    assert floor["layers"] == 5  # LeNet-5-BN: two convolutions, three linear layers
    assert floor["floor_s"] > 0 and floor["fraction_of_floor"] == pytest.approx(floor["floor_s"])
    assert floor["gflop_per_step"] == pytest.approx(4 * floor["gflop_per_image"])
    assert floor["conv_gflops"] > 0 and floor["sgemm_gflops"] > 0


def test_peer_trajectory_measures_what_shorter_calls_return(bench):
    # The peer's time to quality is read off one run: each point must be the quality of a call of that length.
    from exml_fast.models import LeNet5BN
    from exml_fast.reference.public.deepinversion import public_deepinversion

    torch.manual_seed(0)
    teacher = LeNet5BN(10).eval()
    y = bench.targets_for(8, "cpu")
    points = bench.peer_trajectory(teacher, "lenet5_bn", y, 5, 2, 7, "cpu")
    assert [p["steps"] for p in points] == [2, 4, 5]
    assert all(p["wall_s"] > 0 for p in points) and points[0]["wall_s"] < points[-1]["wall_s"]
    for p in points:
        x = public_deepinversion(teacher, y, iterations=p["steps"], lr=bench.LR, bn_reg_scale=bench.BN_WEIGHT,
                                 tv_l2_scale=bench.TV_L2_WEIGHT, l2_scale=bench.L2_WEIGHT, jitter=bench.JITTER,
                                 flip=bench.FLIP, generator=7, input_shape=(1, 32, 32), all_bn=True)[0]
        assert (p["agreement"], p["bn"]) == bench.clean_quality(teacher, x, y)


def test_race_log_resumes_the_same_race_and_sets_another_aside(bench, tmp_path):
    path = tmp_path / "race.json"
    log = bench.RaceLog(path, {"net": "resnet18", "steps": 2000})
    log.put("peer", {"points": [1, 2]})
    log.put("exml | 50", {"wall_s": 3.0})
    again = bench.RaceLog(path, {"net": "resnet18", "steps": 2000})
    assert again.get("peer")["points"] == [1, 2] and again.get("exml | 50")["wall_s"] == 3.0
    assert "commit" in again.get("peer") and again.get("exml | 100") is None
    other = bench.RaceLog(path, {"net": "resnet18", "steps": 1000})  # other settings: never mixed in
    assert other.get("peer") is None
    assert (tmp_path / "race.stale.json").exists() and not path.exists()
    other.put("peer", {"points": []})
    assert bench.RaceLog(path, {"net": "resnet18", "steps": 1000}).get("peer")["points"] == []


def test_the_lenet_teacher_of_the_race_is_kept_and_read_back(bench, tmp_path, monkeypatch):
    # A GPU trains it afresh, not bit-identically, on every run: its hash (in the race's key) then changed and
    # a rerun started over. The first run's weights are kept and a rerun races the same teacher.
    import exml_fast.data.datasets as datasets
    from exml_fast.models import LeNet5BN
    monkeypatch.setattr(datasets, "find_data_root", lambda name: tmp_path if name == "mnist" else None)
    first = LeNet5BN(num_classes=10, in_channels=1)
    model, info = bench.ttq_teacher("lenet5_bn", "cpu", tmp_path, first)
    assert model is first and info["teacher"] == "trained one epoch on MNIST"
    assert (tmp_path / "teacher_lenet5_bn_mnist_s0.pt").exists()
    torch.manual_seed(1)
    retrained = LeNet5BN(num_classes=10, in_channels=1)  # another run's (different) weights
    model, _ = bench.ttq_teacher("lenet5_bn", "cpu", tmp_path, retrained)
    for a, b in zip(model.state_dict().values(), first.state_dict().values()):
        assert torch.equal(a, b)
    # read into a copy: the caller's teacher, which serves the run's other benchmarks, is left as it was
    assert model is not retrained and not torch.equal(retrained.state_dict()["features.0.weight"],
                                                      first.state_dict()["features.0.weight"])
    assert not model.training
