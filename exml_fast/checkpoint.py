"""Model checkpoints that carry what a synthesizer needs: architecture, input shape, normalisation.

A checkpoint is one ``torch.save`` file holding a plain dict::

    {"format": "exml_fast.model", "version": 1,
     "arch": "lenet5bn", "num_classes": 10, "in_channels": 1, "input_shape": [1, 32, 32],
     "mean": [0.1307] | None, "std": [0.3081] | None, "classes": [...] | None,
     "metadata": {...}, "torch_version": "...",
     "sha256": "<hex digest of the state_dict's names, dtypes, shapes and bytes>",
     "state_dict": {...}}

It is read back with ``torch.load(weights_only=True)``: only tensors and plain
containers are unpickled, never code. The model is rebuilt with
:func:`exml_fast.models.build_model` and loaded with ``strict=True``.

Example::

    save_model(teacher, "mnist.pt", arch="lenet5bn", num_classes=10, in_channels=1,
               input_shape=(1, 32, 32), mean=0.1307, std=0.3081)
    teacher, info = load_model("mnist.pt")         # eval mode, on the CPU
    DeepInversion(teacher, input_shape=info.input_shape, mean=info.mean, std=info.std)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice, check_int, per_channel
from exml_fast._utils.io import atomic_write, load_torch_bytes
from exml_fast.models import ARCHS, build_model

__all__ = ["FORMAT", "VERSION", "CheckpointError", "ModelInfo", "load_model", "save_model", "state_dict_sha256"]

FORMAT = "exml_fast.model"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable exml_fast model checkpoint (wrong kind, corrupt, truncated, mismatched)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says about its model.

    Attributes:
        arch: a key of :data:`exml_fast.models.ARCHS`.
        num_classes: outputs of the classifier.
        in_channels: input channels (== ``input_shape[0]``).
        input_shape: (C, H, W) of one input image.
        mean, std: per-channel normalisation of the inputs (pixels in [0, 1] ->
            ``(p - mean) / std``), or None when unknown.
        classes: one name per output, or None.
        metadata: free JSON-like information (dataset, epochs, accuracy, ...).
    """

    arch: str
    num_classes: int
    in_channels: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    classes: tuple[str, ...] | None
    metadata: dict[str, Any]


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 hex digest over each entry's name, dtype, shape and raw bytes, in the dict's order."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"state_dict entry {name!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()






def _as_list(values: tuple[float, ...] | None) -> list[float] | None:
    return None if values is None else list(values)


def save_model(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    num_classes: int,
    in_channels: int,
    input_shape: Sequence[int],
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    classes: Sequence[str] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``model``'s weights and description to ``path`` atomically (see the module docstring).

    Args:
        model: a model built as ``build_model(arch, num_classes=..., in_channels=...)``;
            its state_dict is checked against that architecture before anything is written.
        arch: a key of :data:`exml_fast.models.ARCHS`.
        num_classes, in_channels: the arguments the model was built with.
        input_shape: (C, H, W) of one input; C must equal ``in_channels``.
        mean, std: the input normalisation (a float or one per channel), or None.
        classes: one name per output (``num_classes`` strings), or None.
        metadata: JSON-serialisable dict of anything else (dataset, epochs, accuracy).
    """
    check_choice(arch, "arch", "save_model", ARCHS)
    num_classes = check_int(num_classes, "num_classes", "save_model", low=1)
    in_channels = check_int(in_channels, "in_channels", "save_model", low=1)
    shape = tuple(input_shape) if isinstance(input_shape, (Sequence, torch.Size)) else None
    if shape is None or len(shape) != 3:
        raise ValueError(f"save_model: input_shape must be (C, H, W); got {input_shape!r}")
    shape = tuple(check_int(s, "each input_shape entry", "save_model", low=1) for s in shape)
    if shape[0] != in_channels:
        raise ValueError(f"save_model: input_shape[0] ({shape[0]}) must equal in_channels ({in_channels})")
    mean_l = _as_list(per_channel(mean, in_channels, "mean", "save_model"))
    std_l = _as_list(per_channel(std, in_channels, "std", "save_model", positive=True))
    if (mean_l is None) != (std_l is None):
        raise ValueError("save_model: give both mean and std, or neither")
    classes_l = None
    if classes is not None:
        classes_l = [str(c) for c in classes]
        if len(classes_l) != num_classes:
            raise ValueError(f"save_model: classes must name each of the {num_classes} outputs; got {len(classes_l)}")
    metadata_d = dict(metadata or {})
    try:
        # Round trip through JSON: what is stored is then plain data weights_only can read.
        metadata_d = json.loads(json.dumps(metadata_d))
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_model: metadata must be JSON-serialisable (str keys; str/number/bool/None/"
                         f"list/dict values): {e}") from e

    state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
    check_state_dict(state, build_model(arch, num_classes=num_classes, in_channels=in_channels), arch=arch,
                      num_classes=num_classes, in_channels=in_channels, where="save_model")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": arch,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_shape": list(shape),
        "mean": mean_l,
        "std": std_l,
        "classes": classes_l,
        "metadata": metadata_d,
        "torch_version": str(torch.__version__),
        "sha256": state_dict_sha256(state),
        "state_dict": state,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def check_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module, *, arch: str, num_classes: int,
                      in_channels: int, where: str) -> None:
    """Raises CheckpointError when ``state``'s names or shapes differ from those of ``model`` (built from arch).

    (A CPU build is used rather than the meta device: building on meta was ~8x
    slower for resnet18_cifar under torch 2.14.)
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes (got vs expected) {wrong[:5]}{' ...' if len(wrong) > 5 else ''}")
        raise CheckpointError(
            f"{where}: the state_dict does not match arch {arch!r} with num_classes={num_classes}, "
            f"in_channels={in_channels}: " + "; ".join(parts)
        )


def _require(d: Mapping[str, Any], key: str, types: type | tuple[type, ...], path: str) -> Any:
    if key not in d or not isinstance(d[key], types):
        raise CheckpointError(f"{path}: checkpoint field {key!r} is missing or malformed")
    return d[key]


def load_model(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """Reads a checkpoint written by :func:`save_model`.

    Returns ``(model, info)``: the rebuilt model in eval mode on ``map_location``
    and its :class:`ModelInfo`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: not an exml_fast checkpoint, corrupt or truncated, an
            unknown format version or arch, or weights that do not fit the arch.
    """
    path = os.fspath(path)
    if not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"load_model: map_location must be a device string or torch.device; got {map_location!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    with open(path, "rb") as f:
        obj = load_torch_bytes(f.read(), where=path, what="checkpoint", error=CheckpointError)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an exml_fast model checkpoint (no 'format': {FORMAT!r} entry); "
                              "write one with exml_fast.checkpoint.save_model or exml-fast train-teacher")
    version = obj.get("version")
    if version != VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format version {version!r}; this exml_fast reads "
                              f"version {VERSION}")
    arch = _require(obj, "arch", str, path)
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: unknown arch {arch!r}; known: {sorted(ARCHS)}")
    num_classes = _require(obj, "num_classes", int, path)
    in_channels = _require(obj, "in_channels", int, path)
    shape = _require(obj, "input_shape", (list, tuple), path)
    state = _require(obj, "state_dict", dict, path)
    digest = _require(obj, "sha256", str, path)
    if state_dict_sha256(state) != digest:
        raise CheckpointError(f"{path}: the weights do not match their stored sha256 (corrupt file)")
    model = build_model(arch, num_classes=num_classes, in_channels=in_channels)
    check_state_dict(state, model, arch=arch, num_classes=num_classes, in_channels=in_channels, where=path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # dtype or other mismatch the name/shape check did not catch
        raise CheckpointError(f"{path}: the weights do not fit arch {arch!r}: {e}") from e
    model = model.to(map_location).eval()

    def _tuple(v: Any) -> tuple | None:
        return None if v is None else tuple(v)

    info = ModelInfo(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        input_shape=tuple(int(s) for s in shape),
        mean=_tuple(obj.get("mean")),
        std=_tuple(obj.get("std")),
        classes=_tuple(obj.get("classes")),
        metadata=dict(obj.get("metadata") or {}),
    )
    return model, info
