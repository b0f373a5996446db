"""The suite mirrors the package (ops/, synth/, cl/, experiments/, cli/); the helpers every folder shares live
in python_tests/_util.py, importable from any of them as ``_util``."""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_terminal_summary(terminalreporter):
    """The number of hypothesis cases the fuzz tests ran (python_tests/fuzz), when they ran."""
    fuzz = sys.modules.get("_fuzz")
    if fuzz is not None and fuzz.CASES:
        terminalreporter.write_line(f"hypothesis: {sum(fuzz.CASES.values())} generated cases over "
                                    f"{len(fuzz.CASES)} entry points (python_tests/fuzz)")
