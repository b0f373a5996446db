"""The Avalanche integration is optional: exml_fast imports without it, and importing the integration without
Avalanche says how to install it. These run whether or not the extra is installed."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def test_exml_fast_does_not_import_avalanche():
    code = "import sys, exml_fast, exml_fast.cl.strategies; assert 'avalanche' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_integration_without_avalanche_says_how_to_install_it(monkeypatch):
    for name in [m for m in sys.modules if m == "avalanche" or m.startswith(("avalanche.",
                                                                              "exml_fast.integrations.avalanche"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "avalanche", None)  # `import avalanche` raises ImportError
    with pytest.raises(ImportError, match=r"pip install exml_fast\[avalanche\]"):
        importlib.import_module("exml_fast.integrations.avalanche")
