"""Trained experts and streams of them, on disk: what an Ex-Model CL learner receives.

An :class:`Expert` is a trained model plus what a learner may know about it: the
output units it was trained on (``classes``, the paper's ``Y^i``), an optional
task label, the architecture it is rebuilt from and free metadata (input shape,
normalisation, dataset, training configuration, accuracy). On disk it is a folder::

    expert/manifest.json          {"format": "exml_fast.expert", "version": 1, "arch": ..., "arch_kwargs": ...,
                                   "classes": [...], "task_id": ..., "meta": {...},
                                   "weights": "weights.safetensors", "weights_format": "safetensors",
                                   "sha256": "<hex digest of the weights file's bytes>", "torch_version": ...}
    expert/weights.safetensors    (or weights.pt: torch.save of the state_dict)

The checksum is verified before anything is deserialised, ``.pt`` weights are read
with ``torch.load(weights_only=True)`` (no code is unpickled), and the model is
rebuilt with :func:`exml_fast.models.build_model` and loaded with ``strict=True``.

An :class:`ExpertStream` is a folder of experts in stream order, ``stream.json``
plus ``expert_000/``, ``expert_001/``, ...; ``stream.json`` repeats each expert's
weights checksum, so swapped or replaced expert folders are detected.

Example::

    stream = ExpertStream.create("runs/split_mnist", meta={"scenario": scenario.describe()})
    stream.append(Expert(model, classes=(3, 7), arch="lenet5", arch_kwargs={"num_classes": 10, "in_channels": 1}))
    for expert in ExpertStream("runs/split_mnist"):      # one expert in memory at a time
        print(expert.classes, expert.meta.get("test_accuracy"))
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from exml_fast._utils.io import atomic_write, load_torch_bytes
from exml_fast._utils.provenance import config_diff
from exml_fast.checkpoint import CheckpointError, check_state_dict

__all__ = ["Expert", "ExpertError", "ExpertStream", "WEIGHTS_FORMATS"]

EXPERT_FORMAT = "exml_fast.expert"
STREAM_FORMAT = "exml_fast.expert_stream"
VERSION = 1
MANIFEST = "manifest.json"
STREAM_FILE = "stream.json"
#: weights_format -> file name inside an expert's folder.
WEIGHTS_FORMATS = {"safetensors": "weights.safetensors", "torch": "weights.pt"}


class ExpertError(ValueError):
    """An expert or expert stream on disk that cannot be used: missing, corrupt, or not matching its description.

    The message names the file at fault.
    """


# ------------------------------------------------------------------------------------------------- helpers


def _json_copy(value: Any, what: str) -> Any:
    """A deep copy of ``value`` as JSON would read it back (tuples -> lists); ValueError if not JSON-able."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable (str keys; str/number/bool/None/list/dict values): "
                         f"{e}") from e


def _check_classes(classes: Any, num_classes: int, what: str) -> tuple[int, ...]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, (Sequence, torch.Tensor)):
        raise ValueError(f"{what}: classes must be a sequence of ints; got {classes!r}")
    out = []
    for c in (classes.tolist() if isinstance(classes, torch.Tensor) else classes):
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"{what}: classes must be ints; got {c!r} in {list(classes)!r}")
        out.append(int(c))
    if not out:
        raise ValueError(f"{what}: classes must name at least one output unit; got none")
    if len(set(out)) != len(out):
        raise ValueError(f"{what}: classes must be distinct; got {out}")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"{what}: classes must be output units in [0, {num_classes}) (num_classes = "
                         f"{num_classes}); got {bad}")
    return tuple(out)


def _check_task_id(task_id: Any, what: str) -> int | None:
    if task_id is None:
        return None
    if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
        raise ValueError(f"{what}: task_id must be None or an int >= 0; got {task_id!r}")
    return int(task_id)


def _check_arch_kwargs(arch_kwargs: Any, what: str) -> dict[str, Any]:
    if not isinstance(arch_kwargs, Mapping):
        raise ValueError(f"{what}: arch_kwargs must be a dict; got {type(arch_kwargs).__name__}")
    kwargs = _json_copy(dict(arch_kwargs), f"{what}: arch_kwargs")
    for key in ("num_classes", "in_channels"):
        v = kwargs.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{what}: arch_kwargs[{key!r}] must be an int >= 1 (build_model(arch, **arch_kwargs) "
                             f"rebuilds the model); got {v!r}")
    return kwargs


def _infer_arch_kwargs(model: nn.Module) -> dict[str, int]:
    """num_classes from the last nn.Linear, in_channels from the first conv: the common classifier layout."""
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if first is None or not last:
        raise ValueError("Expert: arch_kwargs=None, and num_classes / in_channels cannot be read off the model "
                         "(no Conv2d/Linear layers); pass arch_kwargs={'num_classes': K, 'in_channels': C, ...}")
    in_channels = first.in_channels if isinstance(first, nn.Conv2d) else None
    if in_channels is None:
        raise ValueError("Expert: arch_kwargs=None and the model's first layer is not a Conv2d, so in_channels "
                         "is unknown; pass arch_kwargs={'num_classes': K, 'in_channels': C, ...}")
    return {"num_classes": last[-1].out_features, "in_channels": in_channels}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _import_safetensors(purpose: str):
    try:
        import safetensors.torch as st
    except ImportError as e:
        raise ImportError(f"{purpose} needs the safetensors package: pip install safetensors "
                          "(or use weights_format='torch')") from e
    return st


def default_weights_format() -> str:
    """"safetensors" when the package is installed, else "torch" (a weights-only torch file)."""
    return "safetensors" if importlib.util.find_spec("safetensors") is not None else "torch"


def _read_json(path: pathlib.Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExpertError(f"{path}: missing ({kind} file not found)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExpertError(f"{path}: not a readable {kind} file (corrupt or truncated JSON?): {e}") from e
    if not isinstance(obj, dict):
        raise ExpertError(f"{path}: not an {kind} file (a JSON {type(obj).__name__}, not an object)")
    return obj


def _write_json(path: pathlib.Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _field(d: Mapping[str, Any], key: str, types, path: pathlib.Path, kind: str) -> Any:
    if key not in d or not isinstance(d[key], types) or isinstance(d[key], bool):
        raise ExpertError(f"{path}: {kind} field {key!r} is missing or malformed (got {d.get(key)!r})")
    return d[key]


def _build(arch: str, arch_kwargs: Mapping[str, Any]) -> nn.Module:
    """build_model under a forked global generator: loading an expert must not move the caller's RNG."""
    from exml_fast.models import build_model

    with torch.random.fork_rng(devices=[]):
        return build_model(arch, **arch_kwargs)


# -------------------------------------------------------------------------------------------------- Expert


class InputMeta:
    """What an expert's ``meta`` dict says of its inputs, as properties: ``input_shape``, ``mean``, ``std``
    (shared by :class:`Expert` and the Avalanche integration's expert view)."""

    meta: dict[str, Any]

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of one input, from ``meta["input_shape"]``; None if absent."""
        v = self.meta.get("input_shape")
        return None if v is None else tuple(int(s) for s in v)

    @property
    def mean(self) -> tuple[float, ...] | None:
        """Per-channel input mean (of pixels in [0, 1]) from ``meta["mean"]``; None if absent."""
        v = self.meta.get("mean")
        return None if v is None else tuple(float(s) for s in v)

    @property
    def std(self) -> tuple[float, ...] | None:
        """Per-channel input std from ``meta["std"]``; None if absent."""
        v = self.meta.get("std")
        return None if v is None else tuple(float(s) for s in v)


class Expert(InputMeta):
    """A trained model and what is known about it.

    Args:
        model: the network, (B, C, H, W) → (B, num_classes) logits over the FULL output space
            (every expert of a stream has all ``num_classes`` outputs; it was trained on ``classes``).
        classes: the output units ``Y^i`` it was trained on: distinct ints in [0, num_classes),
            kept in the order given.
        arch: the key of :data:`exml_fast.models.ARCHS` that rebuilds ``model``.
        arch_kwargs: JSON-able keyword arguments of ``build_model(arch, **arch_kwargs)``; must hold
            ``num_classes`` and ``in_channels``. None: read off the model (``num_classes`` = the last
            Linear's outputs, ``in_channels`` = the first Conv2d's inputs).
        task_id: the task label of a multi-task scenario, or None (class-incremental).
        meta: JSON-able dict: ``input_shape`` [C, H, W], ``mean``, ``std`` (per channel, of inputs in
            [0, 1]), ``dataset``, ``experience`` (index), the training configuration, accuracy, ...

    Attributes:
        model, classes (tuple[int, ...]), arch, arch_kwargs (dict), task_id, meta (dict).
    """

    def __init__(self, model: nn.Module, classes: Sequence[int], *, arch: str,
                 arch_kwargs: Mapping[str, Any] | None = None, task_id: int | None = None,
                 meta: Mapping[str, Any] | None = None) -> None:
        from exml_fast.models import ARCHS

        if not isinstance(model, nn.Module):
            raise TypeError(f"Expert: model must be an nn.Module; got {type(model).__name__}")
        if not isinstance(arch, str) or arch not in ARCHS:
            raise ValueError(f"Expert: arch must be one of {sorted(ARCHS)} (or a name added with "
                             f"exml_fast.models.register_arch); got {arch!r}")
        if arch_kwargs is None:
            arch_kwargs = _infer_arch_kwargs(model)
        self.model = model
        self.arch = arch
        self.arch_kwargs: dict[str, Any] = _check_arch_kwargs(arch_kwargs, "Expert")
        self.classes: tuple[int, ...] = _check_classes(classes, self.arch_kwargs["num_classes"], "Expert")
        self.task_id = _check_task_id(task_id, "Expert")
        if meta is not None and not isinstance(meta, Mapping):
            raise ValueError(f"Expert: meta must be a dict or None; got {type(meta).__name__}")
        self.meta: dict[str, Any] = _json_copy(dict(meta or {}), "Expert: meta")

    # -- what is known about the inputs
    @property
    def num_classes(self) -> int:
        """The model's number of outputs (``arch_kwargs["num_classes"]``)."""
        return int(self.arch_kwargs["num_classes"])

    def __repr__(self) -> str:
        return (f"Expert(arch={self.arch!r}, classes={self.classes}, task_id={self.task_id}, "
                f"num_classes={self.num_classes})")

    # -- disk
    def save(self, folder: str | os.PathLike, *, weights_format: str = "safetensors") -> pathlib.Path:
        """Writes ``folder/manifest.json`` and ``folder/weights.safetensors`` (or ``weights.pt``).

        The state_dict is first checked against a fresh ``build_model(arch, **arch_kwargs)``
        (names and shapes), so an expert that could not be loaded back is never written.
        Both files are written atomically, the weights first and the manifest (which
        holds the weights file's sha256) last: an interrupted save leaves the folder's
        previous manifest, which does not describe the new weights, so it fails to load
        rather than loading the wrong model.

        Args:
            folder: created if needed.
            weights_format: ``"safetensors"`` (needs the safetensors package) or ``"torch"``.

        Returns:
            ``folder`` as a ``pathlib.Path``.
        """
        self._save(folder, weights_format=weights_format)
        return pathlib.Path(folder)

    def _save(self, folder: str | os.PathLike, *, weights_format: str) -> str:
        """save(); returns the weights file's sha256."""
        if weights_format not in WEIGHTS_FORMATS:
            raise ValueError(f"Expert.save: weights_format must be one of {sorted(WEIGHTS_FORMATS)}; "
                             f"got {weights_format!r}")
        folder = pathlib.Path(folder)
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.model.state_dict().items()}
        try:
            check_state_dict(state, _build(self.arch, self.arch_kwargs), arch=self.arch,
                              num_classes=self.num_classes, in_channels=self.arch_kwargs["in_channels"],
                              where=f"Expert.save({str(folder)!r})")
        except CheckpointError as e:
            raise ExpertError(f"{e} (arch_kwargs {self.arch_kwargs})") from e
        if weights_format == "safetensors":
            data = _import_safetensors("Expert.save(weights_format='safetensors')").save(state)
        else:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
        digest = _sha256(data)
        name = WEIGHTS_FORMATS[weights_format]
        atomic_write(folder / name, lambda f: f.write(data))
        manifest = {
            "format": EXPERT_FORMAT,
            "version": VERSION,
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "classes": list(self.classes),
            "task_id": self.task_id,
            "meta": self.meta,
            "weights": name,
            "weights_format": weights_format,
            "sha256": digest,
            "torch_version": str(torch.__version__),
        }
        _write_json(folder / MANIFEST, manifest)
        return digest

    @classmethod
    def load(cls, folder: str | os.PathLike, *, map_location: str | torch.device = "cpu",
             expected_sha256: str | None = None) -> Expert:
        """Reads an expert written by :meth:`save`; the model comes back in eval mode on ``map_location``.

        Args:
            folder: the expert's folder.
            map_location: device of the returned model.
            expected_sha256: when given, the weights file must also have this sha256
                (an :class:`ExpertStream` passes the checksum it recorded).

        Raises:
            ExpertError: a missing or malformed manifest, a missing weights file, a
                checksum mismatch, an unknown arch, weights that do not fit the arch.
        """
        from exml_fast.models import ARCHS

        folder = pathlib.Path(folder)
        mpath = folder / MANIFEST
        m = _read_json(mpath, "expert manifest")
        if m.get("format") != EXPERT_FORMAT:
            raise ExpertError(f"{mpath}: not an exml_fast expert manifest (no 'format': {EXPERT_FORMAT!r})")
        if m.get("version") != VERSION:
            raise ExpertError(f"{mpath}: unknown expert format version {m.get('version')!r}; this exml_fast "
                              f"reads version {VERSION}")
        arch = _field(m, "arch", str, mpath, "manifest")
        if arch not in ARCHS:
            raise ExpertError(f"{mpath}: unknown arch {arch!r}; known: {sorted(ARCHS)} (register a custom one "
                              "with exml_fast.models.register_arch before loading)")
        weights_format = _field(m, "weights_format", str, mpath, "manifest")
        name = _field(m, "weights", str, mpath, "manifest")
        if WEIGHTS_FORMATS.get(weights_format) != name:
            raise ExpertError(f"{mpath}: weights file {name!r} / format {weights_format!r} is not one of "
                              f"{WEIGHTS_FORMATS}")
        digest = _field(m, "sha256", str, mpath, "manifest")
        try:
            arch_kwargs = _check_arch_kwargs(_field(m, "arch_kwargs", dict, mpath, "manifest"), str(mpath))
            classes = _check_classes(_field(m, "classes", list, mpath, "manifest"), arch_kwargs["num_classes"],
                                     str(mpath))
            task_id = _check_task_id(m.get("task_id"), str(mpath))
        except ValueError as e:
            raise ExpertError(str(e)) from e
        meta = _field(m, "meta", dict, mpath, "manifest")

        wpath = folder / name
        try:
            data = wpath.read_bytes()
        except FileNotFoundError:
            raise ExpertError(f"{wpath}: missing (the weights file named by {mpath})") from None
        actual = _sha256(data)
        if actual != digest:
            raise ExpertError(f"{wpath}: sha256 {actual} does not match the {digest} recorded in {mpath} "
                              "(corrupt or replaced weights file)")
        if expected_sha256 is not None and actual != expected_sha256:
            raise ExpertError(f"{wpath}: sha256 {actual} is not the expected {expected_sha256} (a different "
                              "expert than the one recorded: swapped or replaced folder?)")
        if weights_format == "safetensors":
            safetensors = _import_safetensors("loading a .safetensors expert")
            try:
                state = safetensors.load(data)
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ExpertError(f"{wpath}: not readable as safetensors weights: {first}") from e
        else:
            state = load_torch_bytes(data, where=str(wpath), what="torch weights file", error=ExpertError)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ExpertError(f"{wpath}: does not hold a state_dict (a dict of tensors)")
        try:
            model = _build(arch, arch_kwargs)
        except Exception as e:  # noqa: BLE001 - a factory rejecting stored kwargs is a bad manifest
            raise ExpertError(f"{mpath}: build_model({arch!r}, **{arch_kwargs}) failed: {e}") from e
        try:
            check_state_dict(state, model, arch=arch, num_classes=arch_kwargs["num_classes"],
                              in_channels=arch_kwargs["in_channels"], where=str(wpath))
            model.load_state_dict(state, strict=True)
        except CheckpointError as e:
            raise ExpertError(f"{e} (arch_kwargs {arch_kwargs}, from {mpath})") from e
        except RuntimeError as e:
            raise ExpertError(f"{wpath}: the weights do not fit arch {arch!r} (from {mpath}): {e}") from e
        model = model.to(map_location).eval()
        return cls(model, classes, arch=arch, arch_kwargs=arch_kwargs, task_id=task_id, meta=meta)


# -------------------------------------------------------------------------------------------- ExpertStream


class ExpertStream:
    """A folder of experts in stream order: ``path/stream.json`` + ``path/expert_000/``, ``expert_001/``, ...

    ``stream.json`` holds the stream's ``meta`` (the scenario description, training
    configuration, ...) and one entry per expert: its folder (``dir``), the sha256 of
    its weights file, its ``classes``, ``task_id`` and ``arch``. Entries are read
    without loading weights; ``stream[i]`` loads expert i and checks its checksum
    against the entry; iterating loads one expert at a time.

    Args:
        path: the stream's folder (holding ``stream.json``).
        map_location: device the experts' models are loaded to.

    Raises:
        ExpertError: ``stream.json`` missing or malformed.
    """

    def __init__(self, path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> None:
        self.path = pathlib.Path(path)
        self.map_location = map_location
        spath = self.path / STREAM_FILE
        obj = _read_json(spath, "expert stream")
        if obj.get("format") != STREAM_FORMAT:
            raise ExpertError(f"{spath}: not an exml_fast expert stream (no 'format': {STREAM_FORMAT!r}); "
                              "create one with ExpertStream.create or exml-fast train-experts")
        if obj.get("version") != VERSION:
            raise ExpertError(f"{spath}: unknown expert stream version {obj.get('version')!r}; this exml_fast "
                              f"reads version {VERSION}")
        self._meta = _field(obj, "meta", dict, spath, "stream")
        entries = _field(obj, "experts", list, spath, "stream")
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise ExpertError(f"{spath}: experts[{i}] is not an object")
            for key, types in (("dir", str), ("sha256", str), ("classes", list), ("arch", str)):
                if not isinstance(e.get(key), types):
                    raise ExpertError(f"{spath}: experts[{i}] field {key!r} is missing or malformed "
                                      f"(got {e.get(key)!r})")
            if e["dir"] != _expert_dir(i):
                raise ExpertError(f"{spath}: experts[{i}] dir is {e['dir']!r}, expected {_expert_dir(i)!r}")
            if "task_id" not in e:
                raise ExpertError(f"{spath}: experts[{i}] has no 'task_id' (null for none)")
        self._entries: list[dict[str, Any]] = entries

    @classmethod
    def create(cls, path: str | os.PathLike, *, meta: Mapping[str, Any], exist_ok: bool = False,
               map_location: str | torch.device = "cpu") -> ExpertStream:
        """An empty stream at ``path`` with ``meta`` (a JSON-able description, e.g. of the scenario).

        With ``exist_ok`` an existing stream is opened instead, provided its meta is the
        same (this is how a job resumes); a different meta raises ValueError naming the
        differing keys. Without ``exist_ok`` an existing ``stream.json`` is a FileExistsError.
        """
        if not isinstance(meta, Mapping):
            raise ValueError(f"ExpertStream.create: meta must be a dict; got {type(meta).__name__}")
        meta = _json_copy(dict(meta), "ExpertStream.create: meta")
        path = pathlib.Path(path)
        spath = path / STREAM_FILE
        if spath.exists():
            if not exist_ok:
                raise FileExistsError(f"{spath}: an expert stream already exists there; pass exist_ok=True to "
                                      "continue it, or choose another folder")
            stream = cls(path, map_location=map_location)
            diffs = config_diff(stream._meta, meta)
            if diffs:
                raise ValueError(f"{spath}: the existing stream was made with a different configuration; "
                                 f"differing keys (stored vs given): {'; '.join(diffs)}. Use another folder, "
                                 "or the same configuration to resume")
            return stream
        if path.exists() and not path.is_dir():
            raise ValueError(f"ExpertStream.create: path {str(path)!r} exists and is not a folder")
        _write_json(spath, {"format": STREAM_FORMAT, "version": VERSION, "meta": meta, "experts": []})
        return cls(path, map_location=map_location)

    def append(self, expert: Expert, *, weights_format: str = "safetensors") -> None:
        """Saves ``expert`` as the next folder ``expert_{len:03d}/``, then rewrites ``stream.json`` atomically.

        A crash between the two leaves the previous ``stream.json``, which does not list
        the new folder: the stream stays valid, and the next append overwrites the folder.
        """
        if not isinstance(expert, Expert):
            raise TypeError(f"ExpertStream.append: expert must be an Expert; got {type(expert).__name__}")
        name = _expert_dir(len(self._entries))
        digest = expert._save(self.path / name, weights_format=weights_format)
        entry = {"dir": name, "sha256": digest, "classes": list(expert.classes), "task_id": expert.task_id,
                 "arch": expert.arch}
        entries = self._entries + [entry]
        _write_json(self.path / STREAM_FILE, {"format": STREAM_FORMAT, "version": VERSION, "meta": self._meta,
                                              "experts": entries})
        self._entries = entries

    # -- without loading weights
    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the stream's description."""
        return copy.deepcopy(self._meta)

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Copies of the per-expert entries of ``stream.json`` (dir, sha256, classes, task_id, arch)."""
        return copy.deepcopy(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"ExpertStream: index must be an int; got {type(i).__name__}")
        n = len(self._entries)
        if not -n <= i < n:
            raise IndexError(f"ExpertStream: index {i} out of range for a stream of {n} expert(s)")
        return i % n

    def classes(self, i: int) -> tuple[int, ...]:
        """The output units expert ``i`` was trained on."""
        return tuple(self._entries[self._index(i)]["classes"])

    def task_id(self, i: int) -> int | None:
        """Expert ``i``'s task label (None in class-incremental streams)."""
        return self._entries[self._index(i)]["task_id"]

    # -- loading
    def __getitem__(self, i: int) -> Expert:
        """Loads expert ``i`` (negative indices count from the end), verifying its weights' checksum."""
        i = self._index(i)
        entry = self._entries[i]
        folder = self.path / entry["dir"]
        expert = Expert.load(folder, map_location=self.map_location, expected_sha256=entry["sha256"])
        if (list(expert.classes), expert.task_id, expert.arch) != (entry["classes"], entry["task_id"],
                                                                     entry["arch"]):
            raise ExpertError(f"{folder / MANIFEST}: classes/task_id/arch {list(expert.classes)}, {expert.task_id}, "
                              f"{expert.arch!r} differ from {self.path / STREAM_FILE}'s entry {i}: "
                              f"{entry['classes']}, {entry['task_id']}, {entry['arch']!r}")
        return expert

    def __iter__(self) -> Iterator[Expert]:
        """Loads and yields the experts in order, holding no reference to one once the next is requested."""
        for i in range(len(self._entries)):
            yield self[i]  # not bound to a local: the generator frame keeps nothing alive between yields

    def __repr__(self) -> str:
        return f"ExpertStream({str(self.path)!r}, {len(self)} expert(s))"


def _expert_dir(i: int) -> str:
    return f"expert_{i:03d}"

