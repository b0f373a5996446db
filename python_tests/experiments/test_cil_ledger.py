"""reproduce_cil's run ledger: finished runs outlive their folders, and only while the configuration holds."""

import json
import shutil

import pytest

from exml_fast.data import find_data_root
from exml_fast.experiments.cil import CIL_BUDGETS, RunLedger, reproduce_cil

# The tests that run reproduce_cil train on Split MNIST, as the other data tests, only where its files are.
needs_mnist = pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found (set EXML_FAST_DATA)")


def _reproduce(tmp_path, lines, **kw):
    return reproduce_cil("cil-mnist", runs=1, budget="smoke", strategies=("finetune",), out=tmp_path / "runs",
                         results=tmp_path / "res", device="cpu", log=lines.append, **kw)


@needs_mnist
def test_a_run_whose_folder_is_gone_is_read_from_the_ledger(tmp_path):
    lines = []
    first = _reproduce(tmp_path, lines)
    ledger = tmp_path / "res" / "cil_mnist_smoke_runs.json"
    data = json.loads(ledger.read_text())
    assert data["experiment"] == "cil-mnist" and data["budget"] == "smoke"
    entry = data["runs"]["finetune s0"]
    assert entry["machine"]["commit"] and "history" not in entry["meta"]
    assert entry["meta"]["config"]["strategy"] == "finetune"
    # a table of runs made now (not read from the ledger) still names the commit they were made at
    table = (tmp_path / "res" / "cil_mnist_smoke.md").read_text()
    assert f"the runs were made at commit(s) `{entry['machine']['commit']}`" in table
    assert "0 of 1 read back from the ledger" in table
    # the published Split MNIST figures beside ours, and generative replay's for scale, each with its source
    assert "- finetune: 19.94 — van de Ven" in table and "deep generative replay (DGR): 91.69" in table
    assert "generative replay (GR): 75 — ContinualAI/continual-learning-baselines" in table

    shutil.rmtree(tmp_path / "runs")  # another machine, another day: only the committed records are left
    lines.clear()
    again = _reproduce(tmp_path, lines)
    assert "from the ledger" in lines[0]
    assert again == first
    assert not (tmp_path / "runs" / "cil-mnist" / "smoke" / "finetune_s0").exists()  # nothing was run
    rec = json.loads((tmp_path / "res" / "cil_mnist_smoke.json").read_text())
    assert rec["meta"]["from_ledger"] == 1 and rec["meta"]["commits"] == [entry["machine"]["commit"]]
    assert "read back from the ledger" in (tmp_path / "res" / "cil_mnist_smoke.md").read_text()


@needs_mnist
def test_a_changed_configuration_runs_again(tmp_path):
    lines = []
    _reproduce(tmp_path, lines)
    path = tmp_path / "res" / "cil_mnist_smoke_runs.json"
    data = json.loads(path.read_text())
    data["runs"]["finetune s0"]["meta"]["config"]["epochs"] = 7  # recorded under other settings
    data["runs"]["finetune s0"]["acc_matrix"][0][0] = 0.0
    path.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "runs")
    lines.clear()
    _reproduce(tmp_path, lines)
    assert "from the ledger" not in lines[0]
    entry = json.loads(path.read_text())["runs"]["finetune s0"]
    assert entry["meta"]["config"]["epochs"] == 1 and entry["acc_matrix"][0][0] > 0  # replaced by the new run


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "exml_fast.cil_runs", "experiment": "cil-fmnist",
                                                           "budget": "smoke", "runs": {}})])
def test_a_foreign_ledger_is_refused_by_name(tmp_path, text):
    path = tmp_path / "cil_mnist_smoke_runs.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="cil_mnist_smoke_runs.json"):
        RunLedger(path, "cil-mnist", "smoke")


def test_options_added_since_a_run_count_at_the_values_it_ran_with(tmp_path):
    """A run recorded before an option existed matches a configuration holding that option at the strategy's
    config_added value, and only that value."""
    from exml_fast.cl.metrics import StreamResult

    old = {"strategy": "deepinversion-cil", "epochs": 20}
    result = StreamResult("deepinversion-cil", "split_mnist", 0, [[0.9]], [10], [0.9], meta={"config": old})
    ledger = RunLedger(tmp_path / "l.json", "cil-mnist", "paper")
    ledger.put("deepinversion-cil", 0, result, {"commit": "abc"})
    ledger = RunLedger(tmp_path / "l.json", "cil-mnist", "paper")  # read back from the file
    added = {"synth_rounds": 1}
    assert ledger.get("deepinversion-cil", 0, {**old, "synth_rounds": 1}, added).acc_matrix == [[0.9]]
    assert ledger.get("deepinversion-cil", 0, {**old, "synth_rounds": 2}, added) is None
    assert ledger.get("deepinversion-cil", 0, {**old, "synth_rounds": 1}) is None  # not known to be the default
    assert ledger.get("deepinversion-cil", 1, old) is None
    assert ledger.machine_of("deepinversion-cil", 0)["commit"] == "abc"


def _result(seed: int):
    from exml_fast.cl.metrics import StreamResult

    return StreamResult("finetune", "split_mnist", seed, [[0.5]], [10], [0.5], meta={"config": {"seed": seed}})


def test_two_ledgers_open_at_once_keep_each_others_runs(tmp_path):
    """Two processes (say, two sets of seeds) read the ledger, then each adds a run: the second write keeps
    the first's run, which it never read (it re-reads the file under the lock before writing)."""
    a = RunLedger(tmp_path / "l.json", "cil-mnist", "paper")
    b = RunLedger(tmp_path / "l.json", "cil-mnist", "paper")
    a.put("finetune", 0, _result(0), {"commit": "a"})
    b.put("finetune", 1, _result(1), {"commit": "b"})
    runs = json.loads((tmp_path / "l.json").read_text())["runs"]
    assert sorted(runs) == ["finetune s0", "finetune s1"]
    assert b.machine_of("finetune", 0) == {"commit": "a"}  # b now knows a's run too
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _put_many(path, seeds):
    ledger = RunLedger(path, "cil-mnist", "paper")
    for s in seeds:
        ledger.put("finetune", s, _result(s), {"commit": str(s)})


def test_processes_writing_one_ledger_at_once_lose_no_run(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    path = tmp_path / "l.json"
    procs = [ctx.Process(target=_put_many, args=(path, range(k, 60, 3))) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    runs = json.loads(path.read_text())["runs"]
    assert sorted(runs) == sorted(f"finetune s{s}" for s in range(60))


@needs_mnist
def test_seeds_run_into_the_ledger_only_and_runs_make_the_table_from_it(tmp_path):
    lines = []
    rows = _reproduce(tmp_path, lines, seeds=(1,))
    assert rows[0]["runs"] == 1 and "seed(s) 1 done" in lines[-1]
    assert not (tmp_path / "res" / "cil_mnist_smoke.md").exists()  # no table of a part of the seeds
    assert sorted(json.loads((tmp_path / "res" / "cil_mnist_smoke_runs.json").read_text())["runs"]) == \
        ["finetune s1"]
    shutil.rmtree(tmp_path / "runs")
    lines.clear()
    reproduce_cil("cil-mnist", runs=2, budget="smoke", strategies=("finetune",), out=tmp_path / "runs",
                  results=tmp_path / "res", device="cpu", log=lines.append)
    assert "seed 0" in lines[0] and "from the ledger" not in lines[0]
    assert "seed 1" in lines[1] and "from the ledger" in lines[1]
    rec = json.loads((tmp_path / "res" / "cil_mnist_smoke.json").read_text())
    assert rec["rows"][0]["runs"] == 2 and rec["meta"]["from_ledger"] == 1


@pytest.mark.parametrize("seeds", [(), (1, 1), (-1,), ("1",)])
def test_bad_seeds_are_refused_by_name(tmp_path, seeds):
    with pytest.raises(ValueError, match="reproduce_cil: seeds must be"):
        _reproduce(tmp_path, [], seeds=seeds)


@needs_mnist
def test_a_run_is_stamped_with_the_commit_its_process_started_at(tmp_path, monkeypatch):
    """A commit made while a reproduce invocation runs (hours) is not the code of its runs: each ledger entry
    carries the commit read when the invocation started, and the date of the run's end."""
    import exml_fast.experiments.cil as cil

    heads = iter(["aaa", "bbb", "ccc", "ddd"])  # HEAD as it moves on while the runs go
    real = cil.machine
    monkeypatch.setattr(cil, "git_commit", lambda: "start")
    monkeypatch.setattr(cil, "machine", lambda device: {**real(device), "commit": next(heads)})
    _reproduce(tmp_path, [], seeds=(0, 1))
    runs = json.loads((tmp_path / "res" / "cil_mnist_smoke_runs.json").read_text())["runs"]
    assert [runs[f"finetune s{s}"]["machine"]["commit"] for s in (0, 1)] == ["start", "start"]
    assert runs["finetune s0"]["machine"]["date"] <= runs["finetune s1"]["machine"]["date"]


class _Stop(Exception):
    pass


def _lines_before_the_first_run(monkeypatch, **kw):
    """What reproduce_cil logs before its first run starts (the test stops it there, with no data read)."""
    import exml_fast.experiments.cil as cil

    def stop(*a, **k):
        raise _Stop

    monkeypatch.setattr(cil, "make_scenario", lambda *a, **k: None)
    monkeypatch.setattr(cil, "run_named_strategy", stop)
    lines = []
    with pytest.raises(_Stop):
        reproduce_cil("cil-mnist", runs=1, log=lines.append, results=None, **kw)
    return lines


def test_skd_at_the_paper_budget_on_a_cpu_is_warned_about_before_it_runs(tmp_path, monkeypatch):
    lines = _lines_before_the_first_run(monkeypatch, budget="paper", strategies=("finetune", "skd"), device="cpu",
                                        out=tmp_path)
    assert len(lines) == 1 and lines[0].startswith("[reproduce] warning: skd at the paper budget trains 160 epochs")
    assert "--device cuda" in lines[0] and "--budget demo" in lines[0]
    assert CIL_BUDGETS["paper"]["strategies"]["skd"]["epochs"] == 160  # the schedule the warning names
    assert "at least 6 h a seed" in lines[0]  # 690 s a 20-epoch task (docs/cil.md), x 8, x 4 delegator tasks


def test_the_skd_warning_s_hours_follow_the_paper_budget_s_epochs(tmp_path, monkeypatch):
    skd = CIL_BUDGETS["paper"]["strategies"]["skd"]
    monkeypatch.setitem(CIL_BUDGETS["paper"]["strategies"], "skd", {**skd, "epochs": 80})
    lines = _lines_before_the_first_run(monkeypatch, budget="paper", strategies=("skd",), device="cpu",
                                        out=tmp_path)
    assert "trains 80 epochs a task" in lines[0] and "at least 3 h a seed" in lines[0]


@pytest.mark.parametrize("kw", [{"budget": "smoke", "strategies": ("skd",), "device": "cpu"},
                                {"budget": "paper", "strategies": ("finetune", "lwf"), "device": "cpu"},
                                {"budget": "paper", "strategies": ("skd",), "device": "cuda"}])
def test_no_warning_where_skd_s_schedule_does_not_run_on_a_cpu(tmp_path, monkeypatch, kw):
    assert _lines_before_the_first_run(monkeypatch, out=tmp_path, **kw) == []
