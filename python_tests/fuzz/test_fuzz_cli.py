"""End-to-end fuzzing of ``exml-fast train-experts`` and ``exml-fast run`` through :func:`exml_fast.cli.main`
(python_tests/fuzz/test_fuzz_api.py only fuzzes the parser): each case is a tiny, valid command with one
flag given an odd value, run for real on Split MNIST (60 training images per task, 2 tasks).

The rule (python_tests/fuzz/_fuzz.py, as the command line states it): exit status 0, 1 or 2 and never a
traceback; a refusal (1 or 2) prints one ``exml-fast ... error:`` line that names the flag (``--epochs``)
or its option (``epochs``), and leaves no ``result.json`` (nothing claims a finished run or stream); a
success leaves the result. A case whose odd value is still valid (``--lr 3``) simply runs.
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest
from _fuzz import count
from hypothesis import given, settings
from hypothesis import strategies as st

from exml_fast.cl.strategies.registry import STRATEGIES
from exml_fast.cli import build_parser, main
from exml_fast.data import find_data_root

pytestmark = pytest.mark.skipif(find_data_root("mnist") is None, reason="MNIST files not found")

#: Odd values (as the shell gives them). None of them makes a case long: no count above 3.
ODD = ["0", "-1", "-2.5", "1e-12", "nan", "inf", "-inf", "x", "", "1,2", "3", "0.5", "--", "1e400"]
SCENARIO = ["--scenario", "split_mnist", "--n-experiences", "2", "--max-train", "60", "--no-progress"]
#: Every strategy's budget at its smallest (only the options it reads are given: it refuses the others).
TINY = {"epochs": "1", "iterations": "2", "buffer_size": "8", "batch_size": "4", "synth_iterations": "2",
        "synth_batch_size": "4", "synth_per_class": "2", "memory_size": "10"}
EXPERT_FLAGS = ["epochs", "lr", "batch_size", "max_train", "n_experiences", "base_classes", "arch", "seed",
                "device", "weights_format"]
EXML = sorted(n for n, s in STRATEGIES.items() if not s.data and n != "aux-ed")  # aux-ed: its own data set
CIL = sorted(n for n, s in STRATEGIES.items() if s.data)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def _tiny(strategy: str) -> list[str]:
    reads = STRATEGIES[strategy].options
    return [a for k, v in TINY.items() if k in reads for a in (_flag(k), v)]


def _switches(command: str) -> set[str]:
    """The options of ``command`` that are switches (``--augment`` / ``--no-augment``): they take no value."""
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions if a.option_strings and a.nargs == 0}


SWITCHES = _switches("run")


def _with(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value`` (replacing a value it already had); a switch is given on
    (a value other than "0") or off."""
    flag = _flag(option)
    if option in SWITCHES:
        return argv + [flag if value != "0" else "--no-" + option.replace("_", "-")]
    if flag in argv:
        i = argv.index(flag)
        return argv[:i] + argv[i + 2:] + [flag, value]
    return argv + [flag, value]


def _main(argv: list[str]) -> tuple[int, str]:
    """``main(argv)``'s exit status and what it wrote to stderr (stdout is dropped)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def _check(rc: int, err: str, out_dir, option: str, result: str) -> None:
    assert rc in (0, 1, 2), f"exit status {rc}: {err}"
    assert "Traceback" not in err, err
    if rc == 0:
        assert (out_dir / result).exists(), f"exit 0 without {result}"
        return
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines, f"exit {rc} without an error line: {err!r}"
    names = (_flag(option), option, option.replace("_", " "), "argument")
    assert any(re.search(rf"(?<![\w-]){re.escape(n)}(?!\w)", lines[-1]) for n in names), \
        f"the error names none of {names}: {lines[-1]}"
    assert not (out_dir / result).exists(), f"a refused command left {result}"


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """A 2-expert stream (LeNet-5-BN, 60 images per expert, 1 epoch) for the ExML cases."""
    out = tmp_path_factory.mktemp("experts") / "stream"
    assert main(["train-experts", *SCENARIO, "--arch", "lenet5_bn", "--epochs", "1", "--out", str(out)]) == 0
    return out


@settings(max_examples=40)
@given(data=st.data())
def test_train_experts_runs_or_refuses_by_flag(tmp_path_factory, data):
    count("cli.train-experts")
    option = data.draw(st.sampled_from(EXPERT_FLAGS))
    value = data.draw(st.sampled_from(ODD + ["lenet5_bn", "cuda:7", "torch"]))
    out = tmp_path_factory.mktemp("te") / "stream"
    argv = _with(["train-experts", *SCENARIO, "--epochs", "1", "--out", str(out)], option, value)
    _check(*_main(argv), out, option, "stream.json")


@settings(max_examples=60)
@given(data=st.data())
def test_run_runs_or_refuses_by_flag(stream, tmp_path_factory, data):
    strategy = data.draw(st.sampled_from(EXML + CIL))
    count("cli.run")
    source = ["--experts", str(stream), "--no-progress"] if strategy in EXML else SCENARIO
    out = tmp_path_factory.mktemp("run") / "run"
    argv = ["run", "--strategy", strategy, *source, *_tiny(strategy), "--no-plots", "--out", str(out)]
    option = data.draw(st.sampled_from(sorted(STRATEGIES[strategy].options | {"seed", "device"})))
    value = data.draw(st.sampled_from(ODD))
    _check(*_main(_with(argv, option, value)), out, option, "result.json")
