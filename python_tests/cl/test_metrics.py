"""exml_fast.cl.metrics: stream accuracy / forgetting / BWT, JSON, Markdown, accuracy counts, plots."""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch

from exml_fast.cl.metrics import (PANELS, StreamResult, accuracy_counts, plot_accuracy_matrix,
                                  plot_stream_accuracy, stream_accuracy_figure, summary_table)

# R[1][0] > R[0][0] so that forgetting (best earlier accuracy) and BWT (accuracy
# right after learning) differ; unequal test sizes so that Eq. 2 is not the row mean.
R = [[0.90, 0.10, 0.00],
     [0.95, 0.80, 0.20],
     [0.50, 0.70, 0.90]]
SIZES = [100, 300, 200]


def _result(**kw) -> StreamResult:
    base = dict(strategy="ed-mi", scenario="split_mnist", seed=0, acc_matrix=R, test_sizes=SIZES,
                per_class_accuracy=[0.5, 0.75, float("nan")], meta={"lr": 0.01})
    base.update(kw)
    return StreamResult(**base)


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------ metrics

def test_metrics_on_a_hand_computed_matrix():
    r = _result()
    expected = [0.90, (0.95 * 100 + 0.80 * 300) / 400, (0.50 * 100 + 0.70 * 300 + 0.90 * 200) / 600]
    assert r.stream_accuracy == pytest.approx(expected)
    assert r.final_stream_accuracy == pytest.approx(440 / 600)
    assert r.final_stream_accuracy != pytest.approx(sum(R[2]) / 3)  # weighted, not the row mean
    # Forgetting: j=0: max(0.90, 0.95) - 0.50 = 0.45; j=1: 0.80 - 0.70 = 0.10.
    assert r.average_forgetting == pytest.approx((0.45 + 0.10) / 2)
    # BWT: j=0: 0.50 - 0.90; j=1: 0.70 - 0.80.
    assert r.bwt == pytest.approx((-0.40 - 0.10) / 2)
    # Avalanche's forgetting: j=0: R[0][0] - R[2][0] = 0.90 - 0.50; j=1: 0.80 - 0.70.
    assert r.avalanche_forgetting == pytest.approx((0.40 + 0.10) / 2)
    assert r.average_incremental_accuracy == pytest.approx(sum(expected) / 3)
    assert r.num_experiences == 3


def test_forgetting_can_be_negative():
    # The final model is better on experience 0 than it ever was before: the
    # max runs over i in [j, n-2] only, so forgetting is negative (= -BWT here).
    r = _result(acc_matrix=[[0.5, 0.0], [0.7, 0.9]], test_sizes=[10, 30], per_class_accuracy=[])
    assert r.average_forgetting == pytest.approx(-0.2)
    assert r.avalanche_forgetting == pytest.approx(-0.2)
    assert r.bwt == pytest.approx(0.2)
    assert r.final_stream_accuracy == pytest.approx((7 + 27) / 40)


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    r = _result(acc_matrix=[[np.float32(v) for v in row] for row in R],
                test_sizes=[np.int64(s) for s in SIZES], per_class_accuracy=[np.float64(0.25)])
    assert r.test_sizes == SIZES and type(r.acc_matrix[0][0]) is float and r.per_class_accuracy == [0.25]


def test_single_experience():
    r = _result(acc_matrix=[[0.8]], test_sizes=[50], per_class_accuracy=[])
    assert r.stream_accuracy == [0.8] and r.final_stream_accuracy == 0.8
    assert r.average_forgetting == 0.0 and r.bwt == 0.0


def test_experience_without_test_samples_is_left_out():
    nan = float("nan")
    r = _result(acc_matrix=[[nan, 0.2], [nan, 0.6]], test_sizes=[0, 10], per_class_accuracy=[nan])
    assert math.isnan(r.stream_accuracy[0]) and r.stream_accuracy[1] == pytest.approx(0.6)
    assert r.average_forgetting == 0.0 and r.bwt == 0.0


def test_inputs_are_normalised_from_tensors():
    r = _result(acc_matrix=torch.tensor(R, dtype=torch.float64), test_sizes=torch.tensor(SIZES),
                per_class_accuracy=torch.tensor([0.5, 1.0]))
    assert r.acc_matrix == [[pytest.approx(v) for v in row] for row in R]
    assert r.test_sizes == SIZES and all(type(s) is int for s in r.test_sizes)
    assert all(type(v) is float for row in r.acc_matrix for v in row)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(acc_matrix=[[0.9, 0.1], [0.5, 0.5]]), "3 x 3"),
        (dict(acc_matrix=[[0.9, 0.1, 0.0], [0.5, 0.5], [0.1, 0.2, 0.3]]), "row 1 must have 3 entries"),
        (dict(acc_matrix=[[90.0, 10.0, 0.0]] + R[1:]), r"acc_matrix\[0\]\[0\] must be an accuracy in \[0, 1\]"),
        (dict(acc_matrix=[[float("nan"), 0.1, 0.0]] + R[1:]), "nan, allowed only where there are no test"),
        (dict(test_sizes=[100, -1, 3]), r"test_sizes\[1\] must be an int >= 0"),
        (dict(test_sizes=[]), "test_sizes must be a non-empty list"),
        (dict(per_class_accuracy=[1.5]), r"per_class_accuracy\[0\]"),
        (dict(strategy=""), "strategy must be a non-empty string"),
        (dict(seed="0"), "seed must be an int or None"),
        (dict(meta=[1]), "meta must be a dict"),
    ],
)
def test_validation_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _result(**kw)


# ------------------------------------------------------------------ JSON

def test_json_round_trip_strict_json(tmp_path):
    r = _result(seed=None)
    path = tmp_path / "out" / "result.json"
    r.save_json(path)
    assert os.listdir(tmp_path / "out") == ["result.json"]
    text = path.read_text()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert d["per_class_accuracy"][2] is None  # nan written as null
    assert d["summary"]["final_stream_accuracy"] == pytest.approx(440 / 600)
    back = StreamResult.load_json(path)
    assert back.acc_matrix == r.acc_matrix and back.test_sizes == r.test_sizes and back.seed is None
    assert back.per_class_accuracy[:2] == [0.5, 0.75] and math.isnan(back.per_class_accuracy[2])
    assert back.meta == {"lr": 0.01} and back.strategy == "ed-mi" and back.scenario == "split_mnist"
    assert StreamResult.from_dict(r.to_dict()).bwt == pytest.approx(r.bwt)
    assert d["summary"]["avalanche_forgetting"] == pytest.approx(0.25)
    assert d["summary"]["average_forgetting"] == pytest.approx(0.275)
    assert d["summary"]["average_incremental_accuracy"] == pytest.approx(r.average_incremental_accuracy)


def test_json_written_before_avalanche_forgetting_loads(tmp_path):
    d = _result().to_dict()
    del d["summary"]["avalanche_forgetting"]  # as files of version 1 were written before it existed
    path = tmp_path / "old.json"
    path.write_text(json.dumps(d))
    back = StreamResult.load_json(path)
    assert back.avalanche_forgetting == pytest.approx(0.25)
    assert back.to_dict()["summary"]["avalanche_forgetting"] == pytest.approx(0.25)


def test_from_dict_errors(tmp_path):
    d = _result().to_dict()
    with pytest.raises(ValueError, match="missing keys.*acc_matrix"):
        StreamResult.from_dict({k: v for k, v in d.items() if k != "acc_matrix"})
    with pytest.raises(ValueError, match="unknown keys.*'typo'"):
        StreamResult.from_dict(dict(d, typo=1))
    with pytest.raises(ValueError, match="not a stream result"):
        StreamResult.from_dict(dict(d, format="exml_fast.model"))
    with pytest.raises(ValueError, match="unknown version"):
        StreamResult.from_dict(dict(d, version=7))
    with pytest.raises(ValueError, match=r"test_sizes\[0\]"):
        StreamResult.from_dict(dict(d, test_sizes=["100", 300, 200]))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*not valid JSON"):
        StreamResult.load_json(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dict(d, acc_matrix=[[2.0]])))
    with pytest.raises(ValueError, match="wrong.json"):
        StreamResult.load_json(wrong)
    with pytest.raises(ValueError, match="meta must be JSON-able"):
        _result(meta={"t": torch.zeros(1)}).save_json(tmp_path / "m.json")
    assert not (tmp_path / "m.json").exists()


# ------------------------------------------------------------------ tables

def test_markdown_contains_the_numbers():
    md = _result().to_markdown()
    assert "### ed-mi on split_mnist (seed 0)" in md
    assert "| 1 | 95.00 | 80.00 | 20.00 |" in md
    assert "stream accuracy: 73.33 %" in md
    assert "average forgetting (max over history): 27.50 %" in md
    assert "forgetting, Avalanche's (R[j][j] − R[T][j]): 25.00 %" in md
    assert "BWT: -25.00 %" in md
    assert "2: nan" in md and "0: 50.0" in md


def test_summary_table_mean_std_over_runs():
    a = [_result(seed=s, acc_matrix=[[v]], test_sizes=[10], per_class_accuracy=[])
         for s, v in enumerate((0.5, 0.7, 0.9))]
    b = _result(strategy="oracle")
    table = summary_table([a[0], b, a[1], a[2]])
    lines = table.strip().splitlines()
    assert lines[0].startswith("| strategy | keeps data | scenario | runs |")
    # First-appearance order; sample std of 50/70/90 is 20.
    assert ("| stream accuracy (%) | average incremental (%) | forgetting, max (%) | forgetting, Avalanche (%) "
            "| BWT (%) |") in lines[0]
    assert lines[2] == ("| ed-mi | ? | split_mnist | 3 | 70.00 ± 20.00 | 70.00 ± 20.00 | 0.00 ± 0.00 | 0.00 ± 0.00 "
                        "| 0.00 ± 0.00 |")
    assert lines[3] == "| oracle | ? | split_mnist | 1 | 73.33 | 82.36 | 27.50 | 25.00 | -25.00 |"
    kept = summary_table([_result(strategy="joint", meta={"keeps_data": True}),
                          _result(strategy="lwf", meta={"keeps_data": False})]).strip().splitlines()
    assert kept[2].startswith("| joint | yes |") and kept[3].startswith("| lwf | no |")
    pop = summary_table(a, ddof=0).strip().splitlines()[2]
    assert f"70.00 ± {100 * math.sqrt(0.08 / 3):.2f}" in pop
    other = summary_table([a[0], _result(scenario="split_cifar10", acc_matrix=[[0.1]], test_sizes=[5],
                                         per_class_accuracy=[])])
    assert len(other.strip().splitlines()) == 4  # same strategy, two scenarios: two rows
    with pytest.raises(ValueError, match="must not be empty"):
        summary_table([])
    with pytest.raises(ValueError, match="ddof"):
        summary_table(a, ddof=2)


# ------------------------------------------------------------------ accuracy_counts

def test_accuracy_counts_matches_a_manual_count():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(53, 6, generator=g)
    y = torch.randint(0, 4, (53,), generator=g)
    tids = torch.randint(0, 2, (53,), generator=g)
    w = torch.randn(6, 4, generator=g)
    calls = []

    def logits_fn(xb, tb):
        calls.append((xb.shape[0], tb is not None))
        assert not torch.is_grad_enabled()
        out = xb @ w
        return out + 5.0 * tb.unsqueeze(1).float() * torch.tensor([1.0, 0, 0, 0])

    correct, total = accuracy_counts(logits_fn, x, y, num_classes=4, batch_size=10, task_ids=tids, device="cpu")
    pred = (x @ w + 5.0 * tids.unsqueeze(1).float() * torch.tensor([1.0, 0, 0, 0])).argmax(1)
    for c in range(4):
        assert int(total[c]) == int((y == c).sum())
        assert int(correct[c]) == int(((pred == y) & (y == c)).sum())
    assert correct.dtype == total.dtype == torch.int64 and correct.shape == (4,)
    assert [c[0] for c in calls] == [10] * 5 + [3] and all(c[1] for c in calls)
    # Without task ids, logits_fn gets None; an empty set counts nothing.
    c2, _ = accuracy_counts(lambda xb, tb: xb @ w if tb is None else pytest.fail("tb"), x, y, num_classes=4)
    assert int(c2.sum()) == int(((x @ w).argmax(1) == y).sum())
    c3, t3 = accuracy_counts(lambda xb, tb: xb @ w, x[:0], y[:0], num_classes=4)
    assert int(c3.sum()) == int(t3.sum()) == 0


def test_accuracy_counts_errors():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    fn = lambda xb, tb: torch.zeros(xb.shape[0], 3)  # noqa: E731
    with pytest.raises(ValueError, match=r"y must hold classes in \[0, 2\)"):
        accuracy_counts(fn, x, y, num_classes=2)
    with pytest.raises(ValueError, match=r"logits_fn must return \(4, 5\) logits"):
        accuracy_counts(fn, x, y, num_classes=5)
    with pytest.raises(ValueError, match=r"task_ids must be an integer tensor of shape \(4,\)"):
        accuracy_counts(fn, x, y, num_classes=3, task_ids=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="num_classes"):
        accuracy_counts(fn, x, y, num_classes=0)
    with pytest.raises(ValueError, match="batch_size"):
        accuracy_counts(fn, x, y, num_classes=3, batch_size=0)


# ------------------------------------------------------------------ plots

def test_plot_accuracy_matrix_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plots" / "matrix.png"
    plot_accuracy_matrix(_result(), path)
    w, h = _png_size(path)
    assert w > 100 and h > 100 and os.path.getsize(path) > 2000
    assert os.listdir(tmp_path / "plots") == ["matrix.png"]


def test_plot_stream_accuracy_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [_result(seed=s, acc_matrix=[[min(1.0, v + 0.01 * s) for v in row] for row in R]) for s in range(3)]
    path = tmp_path / "stream.png"
    plot_stream_accuracy(runs + [_result(strategy="oracle")], path)
    w, h = _png_size(path)
    assert w > 100 and h > 100
    with pytest.raises(ValueError, match="different numbers of experiences"):
        plot_stream_accuracy([runs[0], _result(acc_matrix=[[0.5]], test_sizes=[3], per_class_accuracy=[])],
                             tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def _run(strategy: str, *, data: bool, drop: float) -> StreamResult:
    """A 5-experience result of a data (class-incremental) or an Ex-Model strategy, as the engine records them."""
    config = {"strategy": strategy, "seed": 0, "ex_model": not data}
    if data:
        config["keeps_data"] = False  # what DataStrategy.config() records
    rows = [[max(0.0, 1.0 - drop * (i - j)) if j <= i else 0.0 for j in range(5)] for i in range(5)]
    return _result(strategy=strategy, acc_matrix=rows, test_sizes=[10] * 5, per_class_accuracy=[],
                   meta={"config": config})


def _lines(fig):
    return [line for ax in fig.axes for line in ax.get_lines()]


def test_the_demos_fourteen_lines_are_told_apart():
    """The demo draws 7 Ex-Model and 7 class-incremental strategies: two panels, and no two lines of the
    figure share a (colour, line style) pair (a 10-colour cycle alone repeats 4 of them)."""
    pytest.importorskip("matplotlib")
    exml = ["mi-ed", "di-ed", "aux-ed", "param-avg", "ensemble-avg", "min-entropy", "oracle"]
    cil = ["finetune", "lwf", "deepinversion-cil", "deepinversion-cil-balanced", "synthetic-exemplars", "icarl",
           "joint"]
    results = ([_run(s, data=False, drop=0.02 * k) for k, s in enumerate(exml)]
               + [_run(s, data=True, drop=0.03 * k) for k, s in enumerate(cil)])
    fig = stream_accuracy_figure(results)
    lines = _lines(fig)
    assert len(lines) == 14
    styles = [(line.get_color(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == 14, styles
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    by_panel = [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]
    assert by_panel == [exml, cil]
    assert len({line.get_color() for line in fig.axes[1].get_lines()}) == 7  # distinct colours within a panel
    # the class-incremental panel's x axis counts tasks, the Ex-Model one's experts
    assert [ax.get_xlabel() for ax in fig.axes] == ["after expert (experience index)",
                                                    "after task (experience index)"]


def test_one_kind_of_result_is_one_panel():
    pytest.importorskip("matplotlib")
    fig = stream_accuracy_figure([_run(f"s{k}", data=False, drop=0.01 * k) for k in range(12)], title="t")
    assert len(fig.axes) == 1 and fig.axes[0].get_title() == ""
    assert fig.axes[0].get_xlabel() == "after expert (experience index)"
    cil = stream_accuracy_figure([_run("lwf", data=True, drop=0.1)])
    assert cil.axes[0].get_xlabel() == "after task (experience index)"
    styles = {(line.get_color(), line.get_linestyle()) for line in _lines(fig)}
    assert len(styles) == 12  # past the ten colours, the line style changes


def test_learned_from_data_reads_the_record():
    from exml_fast.cl.metrics import learned_from_data

    assert learned_from_data(_run("finetune", data=True, drop=0.1))
    assert not learned_from_data(_run("mi-ed", data=False, drop=0.1))
    assert not learned_from_data(_result(meta={}))  # no config: an Ex-Model result, as every old record
    assert learned_from_data(_result(meta={"learns_from": "data", "config": {}}))  # said outright, it wins
    assert not learned_from_data(_result(meta={"learns_from": "experts", "config": {"keeps_data": True}}))
