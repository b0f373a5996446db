"""A synthesis job under faults: SIGKILL at every write of the job (mid-write, before the rename,
after it), a full disk, a read-only folder. Nothing half-written is read as complete, the error
names the path, earlier results stay intact, and a rerun finishes with the bits of an
uninterrupted run (one thread everywhere: the same kernels).

The full disk and the read-only folder are tested twice: with the failure injected (``torch.save``
raising ENOSPC; a folder without write permission, which root ignores), and for real on a small
tmpfs mounted in a private mount namespace (``unshare``), filled by the job itself and then
remounted read-only — skipped where the machine allows no such mount."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _util import mount_namespace, num_threads

from exml_fast._utils.io import atomic_write, temporary_files_of
from exml_fast.models import build_model
from exml_fast.synth import DeepInversion, load_synthetic

ROOT = Path(__file__).resolve().parents[2]
N, BATCH, ITERS, SEED = 6, 3, 2, 5  # 2 shards: 4 writes (manifest, shard 0, shard 1, manifest)
WRITES = 4

# The child: the same job, killed (SIGKILL) at its k-th atomic write, at one point of it.
CHILD = r"""
import io, os, signal, sys
import torch
torch.set_num_threads(1)
from exml_fast.models import build_model
from exml_fast.synth import DeepInversion
import exml_fast.synth.batch as batch_mod

site, job = sys.argv[1], sys.argv[3]
k, iters, batch, n, seed = map(int, (sys.argv[2], *sys.argv[4:]))
calls = [0]
real_write, real_replace = batch_mod.atomic_write, os.replace

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def atomic_write(path, write):
    calls[0] += 1
    if calls[0] != k:
        return real_write(path, write)
    if site == "mid-write":  # half the bytes reach the temporary file, then the process dies
        def half(f):
            buf = io.BytesIO()
            write(buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            die()
        return real_write(path, half)
    def replace(src, dst):
        if site == "before-rename":
            die()
        real_replace(src, dst)
        die()  # after-rename
    os.replace = replace
    try:
        return real_write(path, write)
    finally:
        os.replace = real_replace

batch_mod.atomic_write = atomic_write
with torch.random.fork_rng():
    torch.manual_seed(0)
    teacher = build_model("lenet5bn").eval()
DeepInversion(teacher, input_shape=(1, 32, 32), iterations=iters, batch_size=batch,
              warn_below=None).synthesize(n, generator=seed, progress=False, save_to=job)
print("finished without a kill")
"""


def _synth() -> DeepInversion:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = build_model("lenet5bn").eval()
    return DeepInversion(teacher, input_shape=(1, 32, 32), iterations=ITERS, batch_size=BATCH, warn_below=None)


@pytest.fixture
def one_thread():
    with num_threads(1):
        yield


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    with num_threads(1):
        return _synth().synthesize(N, generator=SEED, progress=False, save_to=tmp_path_factory.mktemp("u") / "job")


@pytest.mark.parametrize("site", ["mid-write", "before-rename", "after-rename"])
def test_sigkill_at_every_write_then_rerun(tmp_path, site, uninterrupted, one_thread):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for k in range(1, WRITES + 1):
        job = tmp_path / f"job{k}"
        r = subprocess.run([sys.executable, "-c", CHILD, site, str(k), str(job), *map(str, (ITERS, BATCH, N, SEED))],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == -9, (k, r.returncode, r.stderr[-2000:])  # killed, as planned
        last = site == "after-rename" and k == WRITES  # the final manifest landed: the job is complete
        if last:
            got = load_synthetic(job)
            assert torch.equal(got.x, uninterrupted.x) and torch.equal(got.y, uninterrupted.y)
        else:
            with pytest.raises(ValueError, match="not finished|not a readable exml_fast synthesis manifest"):
                load_synthetic(job)
        if site == "mid-write":
            assert temporary_files_of(job), "the killed write leaves its temporary file"
        again = _synth().synthesize(N, generator=SEED, progress=False, save_to=job)
        assert torch.equal(again.x, uninterrupted.x) and torch.equal(again.y, uninterrupted.y), (site, k)
        assert json.loads((job / "manifest.json").read_text())["complete"]
        assert temporary_files_of(job) == [], "the rerun removes the temporary files of the killed run"


def test_full_disk_names_the_path_and_keeps_earlier_results(tmp_path, uninterrupted, one_thread, monkeypatch):
    import exml_fast.synth.batch as batch_mod

    job = tmp_path / "job"
    calls = [0]
    real_save = batch_mod.torch.save

    def save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # the second shard: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(batch_mod.torch, "save", save)
    with pytest.raises(OSError, match=r"could not write .*shard_00001\.pt.*No space left on device") as info:
        _synth().synthesize(N, generator=SEED, progress=False, save_to=job)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(batch_mod.torch, "save", real_save)
    assert (job / "shard_00000.pt").exists() and not (job / "shard_00001.pt").exists()
    assert temporary_files_of(job) == []
    with pytest.raises(ValueError, match="not finished"):
        load_synthetic(job)
    again = _synth().synthesize(N, generator=SEED, progress=False, save_to=job)
    assert torch.equal(again.x, uninterrupted.x)


def test_atomic_write_error_keeps_the_old_file(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fails(f):
        f.write(b"new, half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="could not write .*f.bin.*any earlier version of it is intact"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"old" and temporary_files_of(tmp_path) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_read_only_folder_names_the_path(tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    job.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="could not write .*manifest.json"):
            _synth().synthesize(N, generator=SEED, progress=False, save_to=job)
    finally:
        job.chmod(0o755)


# -- a real full disk and a real read-only mount: a tmpfs in a private mount namespace ----------------------

PAGE = 4096

# The child, run inside `unshare` (its own mount namespace: the tmpfs is gone when it exits). It mounts a
# tmpfs of `pages` pages at `mnt`, runs the job into it until the disk is full, checks what is left, makes
# room and reruns; then remounts the tmpfs read-only and starts a second job there.
MOUNTED_CHILD = r"""
import errno, json, os, subprocess, sys
import torch
torch.set_num_threads(1)
from exml_fast._utils.io import temporary_files_of
from exml_fast.models import build_model
from exml_fast.synth import DeepInversion, load_synthetic

mnt, pages, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3]
iters, batch, n, seed = map(int, sys.argv[4:8])

def mount(options):
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", mnt], check=True)

def remount(options):
    subprocess.run(["mount", "-o", "remount," + options, mnt], check=True)

def synth():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        teacher = build_model("lenet5bn").eval()
    return DeepInversion(teacher, input_shape=(1, 32, 32), iterations=iters, batch_size=batch, warn_below=None)

def failure(job):
    try:
        synth().synthesize(n, generator=seed, progress=False, save_to=job)
    except OSError as e:
        return {"errno": e.errno, "message": str(e)}
    return None

def unfinished(job):
    try:
        load_synthetic(job)
    except ValueError as e:
        return str(e)
    return None

want = load_synthetic(reference)
out = {}
mount(f"size={pages * 4096}")
job = os.path.join(mnt, "job")
out["full"] = failure(job)
out["after_full"] = {"files": sorted(os.listdir(job)), "temporary": temporary_files_of(job),
                     "load": unfinished(job)}
remount("size=4m")  # room again: the rerun goes on from the shard that landed
got = synth().synthesize(n, generator=seed, progress=False, save_to=job)
out["rerun_equal"] = bool(torch.equal(got.x, want.x) and torch.equal(got.y, want.y))
out["rerun_complete"] = json.loads(open(os.path.join(job, "manifest.json")).read())["complete"]
remount("ro")
out["read_only"] = failure(os.path.join(mnt, "job2"))
kept = load_synthetic(job)
out["kept_equal"] = bool(torch.equal(kept.x, want.x) and torch.equal(kept.y, want.y))
print("RESULT " + json.dumps(out))
"""


def test_real_full_disk_and_read_only_mount(tmp_path):
    prefix = mount_namespace()
    if prefix is None:
        pytest.skip("no private mount namespace with tmpfs here (unshare -Urm / unshare -m refused)")
    reference = tmp_path / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with num_threads(1):
        _synth().synthesize(N, generator=SEED, progress=False, save_to=reference)
    # The tmpfs holds the first manifest and the first shard, and one page less than the second shard: the
    # job fills it at its third write (files take whole pages; a directory takes none).
    shard = -(-(reference / "shard_00000.pt").stat().st_size // PAGE)
    manifest = -(-(reference / "manifest.json").stat().st_size // PAGE)
    assert (reference / "shard_00001.pt").stat().st_size > (shard - 1) * PAGE
    pages = manifest + shard + shard - 1
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run([*prefix, sys.executable, "-c", MOUNTED_CHILD, str(mnt), str(pages), str(reference),
                        *map(str, (ITERS, BATCH, N, SEED))], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])

    full = out["full"]
    assert full is not None, "the job fitted on the small tmpfs: nothing was tested"
    assert full["errno"] == errno.ENOSPC, full
    assert "shard_00001.pt" in full["message"] and "any earlier version of it is intact" in full["message"], full
    after = out["after_full"]
    assert after["files"] == ["manifest.json", "shard_00000.pt"], after  # no temporary file, no half shard
    assert after["temporary"] == [] and after["load"] is not None and "not finished" in after["load"], after
    assert out["rerun_equal"] and out["rerun_complete"]

    ro = out["read_only"]
    assert ro is not None and ro["errno"] == errno.EROFS, ro
    assert "job2" in ro["message"] and "manifest.json" in ro["message"], ro
    assert out["kept_equal"]
    assert not any(mnt.iterdir()), "the tmpfs leaked out of its mount namespace"
