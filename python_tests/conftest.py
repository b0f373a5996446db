"""The suite mirrors the package (ops/, synth/, cl/, experiments/, cli/); the helpers every folder shares live
in python_tests/_util.py, importable from any of them as ``_util``."""

import pathlib
import sys

_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
