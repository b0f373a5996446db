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


def _static_libstdcxx_wrapper(tmp_path: Path, name: str = "g++") -> Path:
    """A compiler that links libstdc++ statically into shared libraries, as the /opt/gcc wrappers of
    the GPU machines' image do; skips where the system g++ cannot (no libstdc++.a)."""
    import shutil

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("no g++ on PATH")
    wrapper = tmp_path / name
    wrapper.write_text(f'#!/bin/sh\nexec {gxx} -static-libstdc++ "$@"\n')
    wrapper.chmod(0o755)
    src, lib = tmp_path / "t.cpp", tmp_path / "t.so"
    src.write_text("#include <sstream>\nint f(long n) { std::ostringstream s; s << n; return 0; }\n")
    made = subprocess.run([str(wrapper), "-shared", "-fPIC", str(src), "-o", str(lib)], capture_output=True)
    if made.returncode != 0 or "libstdc++" in subprocess.run(["ldd", str(lib)], capture_output=True,
                                                              text=True).stdout:
        pytest.skip("this g++ cannot link libstdc++ statically into a shared library")
    return wrapper


def test_setup_replaces_a_compiler_that_links_libstdcxx_statically(tmp_path):
    wrapper = _static_libstdcxx_wrapper(tmp_path)
    r = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "EXML_FAST_NO_CUDA": "1", "CXX": str(wrapper)})
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "links libstdc++ statically" in line)
    assert f"CXX={wrapper}" in line and "building with CXX=" in line and str(tmp_path) not in line.split("with")[1]


def test_setup_stops_when_no_compiler_links_libstdcxx_shared(tmp_path):
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = _static_libstdcxx_wrapper(bin_dir)  # the only g++ on PATH, no c++ or gcc
    for tool in ("ldd", "as", "ld"):  # what the probe and g++ itself run from PATH
        (bin_dir / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300, env={**os.environ, "EXML_FAST_NO_CUDA": "1", "CXX": str(wrapper),
                                         "PATH": str(bin_dir)})
    assert r.returncode != 0
    assert f"the C++ compiler {wrapper} links libstdc++ statically" in r.stderr
    assert "Set CXX and CC" in r.stderr


@pytest.mark.parametrize("extra, variable", [("avalanche", "AVALANCHE_DEPS"), ("compress", "COMPRESS_DEPS")])
def test_the_makefiles_extra_lists_are_pyprojects_extras(extra, variable):
    """CI installs an extra from the Makefile's list (--no-deps); a user from pyproject.toml: the same pins."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(f"{variable} :="))
    assert sorted(line.split(":=", 1)[1].split()) == sorted(extras[extra])
