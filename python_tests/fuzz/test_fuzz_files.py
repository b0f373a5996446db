"""Fuzzing what exml_fast reads from disk (python_tests/fuzz/_fuzz.py has the rule): an expert stream, a
synthesis job, a buffer and a run checkpoint, each damaged by one random edit — truncated at any byte,
bytes overwritten, two experts' weights swapped, the manifest's checksums, paths (``..``, absolute) or
fields rewritten, weights replaced by NaN. Reading must give back exactly what was written (when the
edit changed nothing that matters) or refuse with an error that names the file or folder at fault; it
must never run code from the file (every loader is weights-only: a pickle that would run code is one of
the edits) and never return NaN weights."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from _fuzz import check_error, count
from hypothesis import given, settings
from hypothesis import strategies as st

from exml_fast.cl.buffer import SyntheticBuffer
from exml_fast.cl.experts import Expert, ExpertStream
from exml_fast.models import build_model
from exml_fast.synth import DataImpressions, load_synthetic

K = 4
RAN = {"value": False}  # set by the pickle's payload if a loader ever ran it


class _RunsCode:
    """A pickle whose loading would call RAN.update (a weights-only loader refuses it)."""

    def __reduce__(self):
        return (RAN.update, ({"value": True},))


def _teacher(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lenet5", num_classes=K).eval()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    stream = ExpertStream.create(root / "stream", meta={"scenario": {"name": "toy"}})
    for i in range(2):
        stream.append(Expert(_teacher(i), [2 * i, 2 * i + 1], arch="lenet5",
                             arch_kwargs={"num_classes": K, "in_channels": 1},
                             meta={"input_shape": [1, 32, 32], "mean": [0.5], "std": [0.5]}),
                      weights_format="torch")
    synth = DataImpressions(_teacher(0), input_shape=(1, 32, 32), iterations=1, batch_size=3, warn_below=None)
    synth.synthesize(5, generator=0, progress=False, save_to=root / "job")
    buffer = SyntheticBuffer(8)
    buffer.update(torch.randn(6, 1, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1]), experience=0,
                  generator=torch.Generator().manual_seed(0))
    buffer.save(root / "buffer.pt")
    return root


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


@st.composite
def _edit(draw, files: list[Path]):
    path = draw(st.sampled_from(files))
    kind = draw(st.sampled_from(["truncate", "overwrite", "json", "swap", "nan", "pickle", "none"]))
    return path, kind, draw(st.integers(0, 10**9)), draw(st.binary(min_size=1, max_size=8))


def _json_edit(obj, r: int):
    """One change to a manifest: a checksum, a path, a field's type, a missing key."""
    text = json.dumps(obj)
    changes = [("sha256", "0" * 64), ("dir", "../escape"), ("dir", "/etc"), ("file", "../../x.pt"),
               ("classes", "not a list"), ("complete", "yes"), ("n", -3), ("format", "other"), ("version", 99)]
    key, value = changes[r % len(changes)]

    def walk(o):
        if isinstance(o, dict):
            if key in o:
                o[key] = value
                return True
            return any(walk(v) for v in o.values())
        if isinstance(o, list):
            return any(walk(v) for v in o)
        return False

    if not walk(obj):
        obj.pop(next(iter(obj)), None) if isinstance(obj, dict) and obj else None
    return obj if json.dumps(obj) != text else {"format": None}


def _apply(path: Path, kind: str, r: int, data: bytes, files: list[Path]) -> None:
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[: r % max(1, len(raw))])
    elif kind == "overwrite" and raw:
        at = r % len(raw)
        path.write_bytes(raw[:at] + data + raw[at + len(data):])
    elif kind == "json" and path.suffix == ".json":
        path.write_text(json.dumps(_json_edit(json.loads(raw), r)))
    elif kind == "swap":
        same = [p for p in files if p.name == path.name and p != path]
        if same:
            other = same[r % len(same)]
            tmp = path.with_suffix(".swap")
            os.replace(path, tmp)
            os.replace(other, path)
            os.replace(tmp, other)
    elif kind == "nan" and path.suffix == ".pt":
        try:
            obj = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - not a tensor file: nothing to poison
            return
        poisoned = _poison(obj)
        if poisoned is not None:
            torch.save(poisoned, path)
    elif kind == "pickle" and path.suffix == ".pt":
        with open(path, "wb") as f:
            pickle.dump({"weights": _RunsCode()}, f, protocol=2)


def _poison(obj):
    if isinstance(obj, torch.Tensor) and obj.is_floating_point() and obj.numel():
        obj = obj.clone()
        obj.view(-1)[0] = float("nan")
        return obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = _poison(v)
            if p is not None:
                return {**obj, k: p}
    return None


def _finite(t) -> bool:
    if isinstance(t, torch.Tensor):
        return not t.is_floating_point() or bool(torch.isfinite(t).all())
    if isinstance(t, dict):
        return all(_finite(v) for v in t.values())
    return True


def _fuzz(originals: Path, name: str, tmp: Path, edit, read) -> None:
    """Copies ``originals/name`` to a fresh folder, applies ``edit``, and reads it with ``read``."""
    work = tmp / f"case{count_of(name)}"
    src = originals / name
    if src.is_dir():
        shutil.copytree(src, work / name)
    else:
        work.mkdir(parents=True)
        shutil.copy(src, work / name)
    target = work / name
    files = _files(target) if target.is_dir() else [target]
    path, kind, r, data = edit
    path = target / path.relative_to(src) if src.is_dir() else target
    _apply(path, kind, r, data, files)
    try:
        got = read(target)
    except Exception as e:  # noqa: BLE001 - the rule decides
        check_error(e, [target.name, path.name, str(target), "weights_only", "checksum", "sha256"])
    else:
        assert _finite(got), f"{kind} of {path.name}: read back NaN/Inf without a word"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert not RAN["value"], "a loader ran code from a file"


def count_of(name: str) -> int:
    count(f"files.{name}")
    from _fuzz import CASES

    return CASES[f"files.{name}"]


def _read_stream(folder: Path):
    stream = ExpertStream(folder)
    return {f"{i}.{k}": v for i in range(len(stream)) for k, v in stream[i].model.state_dict().items()}


@settings(max_examples=120)
@given(data=st.data())
def test_a_damaged_expert_stream_is_refused_by_name(originals, tmp_path_factory, data):
    files = _files(originals / "stream")
    _fuzz(originals, "stream", tmp_path_factory.getbasetemp(), data.draw(_edit(files)), _read_stream)


@settings(max_examples=80)
@given(data=st.data())
def test_a_damaged_synthesis_job_is_refused_by_name(originals, tmp_path_factory, data):
    files = _files(originals / "job")
    _fuzz(originals, "job", tmp_path_factory.getbasetemp(), data.draw(_edit(files)),
          lambda p: load_synthetic(p).x)


@settings(max_examples=60)
@given(data=st.data())
def test_a_damaged_buffer_file_is_refused_by_name(originals, tmp_path_factory, data):
    _fuzz(originals, "buffer.pt", tmp_path_factory.getbasetemp(), data.draw(_edit([originals / "buffer.pt"])),
          lambda p: SyntheticBuffer.load(p).x)
