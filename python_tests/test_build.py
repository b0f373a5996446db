"""The package's build facts, its fallback without _C, and setup.py's switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import exml_fast
from exml_fast import _ext

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=300)


def test_build_info_describes_the_build():
    assert exml_fast.has_ops(), "exml_fast._C did not load: " + str(exml_fast.build_info())
    info = exml_fast.build_info()
    assert info["loaded"] is True
    assert info["torch_version"] == torch.__version__  # compiled against the running torch
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_version"] == torch.version.cuda
        assert info["cuda_archs"]
    assert info["compiler"] and info["cxx_standard"] >= 202002
    assert hasattr(torch.ops.exml_fast, "bn_stats")


def test_fallback_without_compiled_library_warns_once():
    code = """
import warnings, torch
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import exml_fast
    from exml_fast import ops, reference
    assert not exml_fast.has_ops()
    assert exml_fast.build_info()["loaded"] is False
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    m, v = ops.bn_stats(x)
    m2, v2 = reference.bn_stats(x)
    assert torch.equal(m, m2) and torch.equal(v, v2)
    ops.bn_stats_loss(x, torch.zeros(3), torch.ones(3)).backward()
    assert x.grad is not None
msgs = [str(i.message) for i in w if "falling back" in str(i.message)]
assert len(msgs) == 1, msgs
print("ok")
"""
    r = run_python(code, EXML_FAST_DISABLE_EXT="1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_cuda_tensor_on_cpu_only_build_says_how_to_rebuild(monkeypatch):
    class FakeCudaTensor:
        is_cuda = True

    monkeypatch.setattr(_ext, "_HAS_CUDA_KERNELS", False)
    if not exml_fast.has_ops():
        pytest.skip("needs the compiled library")
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*EXML_FAST_FORCE_CUDA=1 pip install"):
        _ext.use_compiled(FakeCudaTensor())


def test_setup_rejects_contradictory_switches():
    r = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300,
                       env={**os.environ, "EXML_FAST_FORCE_CUDA": "1", "EXML_FAST_NO_CUDA": "1"})
    assert r.returncode != 0
    assert "contradict" in r.stderr


def test_setup_reports_what_it_builds():
    r = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "EXML_FAST_NO_CUDA": "1"})
    assert r.returncode == 0, r.stderr
    assert "CUDA kernels: skipped because EXML_FAST_NO_CUDA=1" in r.stdout
    cpu_line = next(line for line in r.stdout.splitlines() if "CPU kernels:" in line)
    assert "csrc/cpu/bn_stats_kernel.cpp" in cpu_line
