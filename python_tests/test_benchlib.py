"""benches/benchlib.py's timing, which every recorded figure rests on: the true median, the event-timed
rounds (run here with a fake clock whose time advances by a known amount per call, so the counts and the
times are exact), and the CPU fallback. Nothing here asserts a measured time."""

from __future__ import annotations

import statistics

import pytest
import torch
from _util import bench_module


@pytest.fixture(scope="module")
def bl():
    with bench_module("benchlib") as mod:
        yield mod


class FakeTime:
    """A clock that advances only when a timed function says so, with events in torch.cuda.Event's interface."""

    def __init__(self):
        self.now = 0.0
        self.syncs = 0
        self.records = 0
        clock = self

        class Event:
            def __init__(self, enable_timing=True):
                self.t = None

            def record(self, stream=None):
                clock.records += 1
                self.t = clock.now

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3

        self.Event = Event

    def sync(self):
        self.syncs += 1

    def work(self, seconds):
        def fn():
            self.now += seconds
        return fn


def fake_clock(bl, ft):
    return bl.Clock(ft.Event, ft.sync, "fake events")


@pytest.mark.parametrize("values, expect", [([3.0], 3.0), ([2.0, 1.0], 1.5), ([4, 1, 3, 2], 2.5),
                                            ([5, 1, 3], 3.0), ([1, 1, 2, 10], 1.5)])
def test_true_median_is_the_mean_of_the_middle_two_for_an_even_count(bl, values, expect):
    assert bl.true_median(values) == expect == statistics.median(values)
    if len(values) % 2 == 0:  # torch.median, the old helper's, returned the lower of the two
        assert float(torch.tensor(values, dtype=torch.float64).median()) < expect


def test_true_median_of_nothing_raises(bl):
    with pytest.raises(ValueError, match="no values"):
        bl.true_median([])


def test_the_old_name_is_the_true_median(bl):
    assert bl.median is bl.true_median


def test_event_rounds_time_each_round_of_back_to_back_calls(bl):
    ft = FakeTime()
    per_call = bl.event_rounds(ft.work(0.002), inner=7, rounds=5, clock=fake_clock(bl, ft))
    assert per_call == pytest.approx([0.002] * 5)
    assert ft.records == 10 and ft.syncs == 2  # two events a round; synchronised before and once after


def test_time_fn_with_events_fills_rounds_of_at_least_a_millisecond(bl):
    ft = FakeTime()
    t = bl.time_fn(ft.work(20e-6), device="cuda", min_run_time=0.2, clock=fake_clock(bl, ft))
    # a 20 us call: rounds of max(1 ms, 0.2 s / 20) = 10 ms, i.e. 500 calls; 0.2 s / 10 ms = 20 rounds
    assert t.inner == 500 and t.rounds == 20 and t.timer == "fake events"
    assert t.median_s == pytest.approx(20e-6)
    f = t.fields()
    assert f["ms"] == pytest.approx(0.02) and f["ms_min"] <= f["ms"] <= f["ms_max"]
    assert (f["rounds"], f["inner"]) == (20, 500)


def test_time_fn_takes_at_least_five_rounds_of_a_long_call(bl):
    ft = FakeTime()
    t = bl.time_fn(ft.work(0.5), device="cuda", min_run_time=0.2, clock=fake_clock(bl, ft))
    assert (t.inner, t.rounds) == (1, 5) and t.median_s == pytest.approx(0.5)


def test_time_fn_on_the_cpu_uses_torch_utils_benchmark_with_five_rounds(bl):
    x = torch.randn(256)
    t = bl.time_fn(lambda: x.sum(), device="cpu", min_run_time=0.01)
    assert t.timer == "torch.utils.benchmark" and t.rounds >= 5 and t.inner >= 1
    assert min(t.per_call_s) <= t.median_s <= max(t.per_call_s)


def test_host_event_times_on_perf_counter(bl):
    clock = bl.device_clock("cpu")
    assert clock.event is bl.HostEvent and clock.name.startswith("host clock")
    assert bl.timed_call(lambda: torch.randn(64).sum(), "cpu") > 0


def test_interleaved_samples_rotate_and_time_rounds_with_events(bl):
    ft = FakeTime()
    order = []

    def variant(name, seconds):
        work = ft.work(seconds)

        def fn():
            order.append(name)
            work()
        return fn

    s = bl.interleaved_samples({"a": variant("a", 0.001), "b": variant("b", 0.003)}, device="cuda",
                               min_run_time=0.0, min_round_s=0.01, clock=fake_clock(bl, ft))
    assert s.inner == {"a": 10, "b": 4} and s.timer == "fake events"
    assert s["a"] == pytest.approx([0.001] * 5) and s["b"] == pytest.approx([0.003] * 5)
    # after the warm-up (1 call each) and the sizing (3 calls each): rounds alternate which variant goes first
    rounds = order[8:]
    firsts = [rounds[i] for i in range(0, len(rounds), 14)]
    assert firsts == ["a", "b", "a", "b", "a"]
    f = s.fields("b")
    assert (f["rounds"], f["inner"]) == (5, 4) and f["ms"] == pytest.approx(3.0)


def test_interleaved_samples_on_the_cpu_take_one_call_per_sample(bl):
    s = bl.interleaved_samples({"x": lambda: torch.ones(8).sum()}, device="cpu", min_run_time=0.0)
    assert s.inner == {"x": 1} and len(s["x"]) == 5 and s.timer.startswith("host clock")


def test_command_line_quotes_the_arguments(bl):
    assert bl.command_line("bench_x.py", ["--out", "a b", "--quick"]) == "python benches/bench_x.py --out 'a b' --quick"


def test_timing_cells(bl):
    row = {"ms_min": 1.0, "ms_max": 2.5, "rounds": 7, "inner": 30}
    assert bl.timing_cells(row) == "1.000–2.500 | 7 × 30"
    assert bl.TIMING_HEADER.count("|") == bl.timing_cells(row).count("|")
