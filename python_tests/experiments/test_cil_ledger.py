"""reproduce_cil's run ledger: finished runs outlive their folders, and only while the configuration holds."""

import json
import shutil

import pytest

from exml_fast.experiments.cil import RunLedger, reproduce_cil


def _reproduce(tmp_path, lines, **kw):
    return reproduce_cil("cil-mnist", runs=1, budget="smoke", strategies=("finetune",), out=tmp_path / "runs",
                         results=tmp_path / "res", device="cpu", log=lines.append, **kw)


def test_a_run_whose_folder_is_gone_is_read_from_the_ledger(tmp_path):
    lines = []
    first = _reproduce(tmp_path, lines)
    ledger = tmp_path / "res" / "cil_mnist_smoke_runs.json"
    data = json.loads(ledger.read_text())
    assert data["experiment"] == "cil-mnist" and data["budget"] == "smoke"
    entry = data["runs"]["finetune s0"]
    assert entry["machine"]["commit"] and "history" not in entry["meta"]
    assert entry["meta"]["config"]["strategy"] == "finetune"

    shutil.rmtree(tmp_path / "runs")  # another machine, another day: only the committed records are left
    lines.clear()
    again = _reproduce(tmp_path, lines)
    assert "from the ledger" in lines[0]
    assert again == first
    assert not (tmp_path / "runs" / "cil-mnist" / "smoke" / "finetune_s0").exists()  # nothing was run
    rec = json.loads((tmp_path / "res" / "cil_mnist_smoke.json").read_text())
    assert rec["meta"]["from_ledger"] == 1 and rec["meta"]["commits"] == [entry["machine"]["commit"]]
    assert "read back from the ledger" in (tmp_path / "res" / "cil_mnist_smoke.md").read_text()


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
