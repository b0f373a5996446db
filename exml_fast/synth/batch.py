"""SyntheticBatch and the on-disk store of a synthesis job (atomic shards + manifest)."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from exml_fast._utils import dist
from exml_fast._utils.batches import batch_bounds
from exml_fast._utils.io import atomic_write, temporary_files_of

__all__ = ["SyntheticBatch", "load_synthetic"]

MANIFEST = "manifest.json"
FORMAT = "exml_fast.synthetic"
VERSION = 1


@dataclasses.dataclass
class SyntheticBatch:
    """Synthetic inputs with their labels, as a synthesizer returns them.

    Attributes:
        x: (n, C, H, W) float32 inputs in the teacher's input space (normalised
            with ``mean``/``std`` when those are set).
        y: (n,) int64 class of each input: the target it was optimised for
            (inversion methods) or the teacher's argmax (auxiliary data).
        soft_targets: (n, K) float32 or None: the Dirichlet targets of Data
            Impressions, the teacher's softmax for auxiliary data; None for
            model inversion and DeepInversion.
        losses: name → 1-D float32 tensor with one entry per optimisation
            batch: the loss terms of the batch that was kept ("total", "main",
            "bn", "tv_l1", "tv_l2", "blur", "l2", "l2_sq", "competition" —
            those that were used) and "teacher_acc", the fraction of that
            batch the teacher labelled as its target.
        mean, std: per-channel normalisation of ``x`` (None: not normalised);
            :func:`exml_fast.viz.save_grid` un-normalises with them.
        seconds: wall seconds the synthesizer spent making these rows, summed
            over their optimisation batches whichever call made them (a shard
            read back from ``save_to`` keeps the time of the call that wrote
            it), so a resumed job reports what the whole job cost (a job
            sharded over ranks: the sum over every rank's batches, not the
            wall time of the ranks working side by side). None where
            unknown: rows picked out of a batch, or a batch concatenated with
            one of unknown time (shards written before this was recorded).
    """

    x: torch.Tensor
    y: torch.Tensor
    soft_targets: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    seconds: float | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 4:
            raise ValueError(f"SyntheticBatch: x must be (n, C, H, W); got shape {tuple(self.x.shape)}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(
                f"SyntheticBatch: y must be ({self.x.shape[0]},) to match x; got {tuple(self.y.shape)}"
            )
        if self.soft_targets is not None and (
            self.soft_targets.dim() != 2 or self.soft_targets.shape[0] != self.x.shape[0]
        ):
            raise ValueError(
                f"SyntheticBatch: soft_targets must be ({self.x.shape[0]}, K); "
                f"got {tuple(self.soft_targets.shape)}"
            )

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, index) -> SyntheticBatch:
        """Rows ``index`` (an int, slice, index or bool tensor); ``losses`` are kept whole."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return SyntheticBatch(
            self.x[index], self.y[index],
            None if self.soft_targets is None else self.soft_targets[index],
            dict(self.losses), self.mean, self.std,  # seconds: unknown for a part of the batch
        )

    def to(self, *args, **kwargs) -> SyntheticBatch:
        """A copy with ``x``, ``y`` and ``soft_targets`` moved like ``Tensor.to`` (dtype changes apply to x only)."""
        x = self.x.to(*args, **kwargs)
        return SyntheticBatch(
            x, self.y.to(x.device), None if self.soft_targets is None else self.soft_targets.to(x.device),
            dict(self.losses), self.mean, self.std, self.seconds,
        )

    @classmethod
    def cat(cls, batches: Sequence[SyntheticBatch]) -> SyntheticBatch:
        """Concatenates batches (same shapes, normalisation and kinds of targets)."""
        batches = list(batches)
        if not batches:
            raise ValueError("SyntheticBatch.cat: batches must not be empty")
        first = batches[0]
        for b in batches[1:]:
            if b.x.shape[1:] != first.x.shape[1:]:
                raise ValueError(
                    f"SyntheticBatch.cat: image shapes differ: {tuple(first.x.shape[1:])} and {tuple(b.x.shape[1:])}"
                )
            if (b.soft_targets is None) != (first.soft_targets is None):
                raise ValueError("SyntheticBatch.cat: some batches have soft_targets and some do not")
            if b.mean != first.mean or b.std != first.std:
                raise ValueError("SyntheticBatch.cat: the batches have different mean/std")
        keys = [k for k in first.losses if all(k in b.losses for b in batches)]
        return cls(
            torch.cat([b.x for b in batches]),
            torch.cat([b.y for b in batches]),
            None if first.soft_targets is None else torch.cat([b.soft_targets for b in batches]),
            {k: torch.cat([b.losses[k].reshape(-1) for b in batches]) for k in keys},
            first.mean,
            first.std,
            None if any(b.seconds is None for b in batches) else sum(b.seconds for b in batches),
        )

    def state(self) -> dict[str, Any]:
        """A plain dict of CPU tensors and numbers (what a shard file holds)."""
        return {
            "x": self.x.detach().cpu(),
            "y": self.y.cpu(),
            "soft_targets": None if self.soft_targets is None else self.soft_targets.cpu(),
            "losses": {k: v.detach().cpu() for k, v in self.losses.items()},
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "seconds": self.seconds,
        }

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> SyntheticBatch:
        return cls(
            s["x"], s["y"], s["soft_targets"], dict(s["losses"]),
            None if s["mean"] is None else tuple(s["mean"]),
            None if s["std"] is None else tuple(s["std"]),
            None if s.get("seconds") is None else float(s["seconds"]),  # absent from shards of before 2026-11-25
        )


SHARD_PREFIX = "shard_"


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}{index:05d}.pt"


def shard_seconds(folder: str | os.PathLike) -> float | None:
    """Seconds the shards on disk in ``folder`` took to make, summed (0.0 when there are none).

    Reads only each shard's record, not its tensors (they are memory-mapped and left unread), so it is cheap
    where :func:`load_synthetic` would read the whole job. Every shard that loads counts, wherever it lies in
    the job (a sharded run leaves gaps) and whether or not a rerun will trust it: its time was spent. A shard
    that does not load (a damaged file) counts nothing. None when some shard predates the time record.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return 0.0
    total = 0.0
    for name in sorted(f for f in os.listdir(folder) if f.startswith(SHARD_PREFIX) and f.endswith(".pt")):
        try:
            state = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a foreign or damaged file (a rerun redoes it): no time of this job's to count
            continue
        if not isinstance(state, dict):
            continue  # not a shard
        seconds = state.get("seconds")
        if seconds is None:
            return None
        total += float(seconds)
    return total


class ShardStore:
    """The folder of one synthesis job: ``manifest.json`` plus one shard per optimisation batch.

    Every file is written atomically (temporary file, fsync, rename), so an
    interrupted job leaves only whole shards behind; a shard is trusted when
    it loads and holds the rows the manifest assigns to it.

    With ``distributed=True`` every rank of the default process group holds a
    store on the same folder and writes its own shards; rank 0 alone writes the
    manifest: the unfinished one when it opens the folder (the other ranks open
    it after that, see ``Synthesizer.synthesize_iter``), the finished one in
    :meth:`finish`, once every rank has reached it and every shard is on disk.
    """

    def __init__(self, folder: str | os.PathLike, job: dict[str, Any], *, distributed: bool = False) -> None:
        self.folder = os.fspath(folder)
        self.job = job
        self.distributed = distributed
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise ValueError(f"save_to: {self.folder!r} exists and is not a folder")
        path = os.path.join(self.folder, MANIFEST)
        if os.path.exists(path):
            old = read_manifest(self.folder)
            diffs = [k for k in sorted(set(job) | set(old["job"])) if old["job"].get(k) != job.get(k)]
            if diffs:
                k = diffs[0]
                raise ValueError(
                    f"save_to: {self.folder!r} holds a different synthesis job ({k} was "
                    f"{old['job'].get(k)!r}, now {job.get(k)!r}); use another folder or delete it"
                )
        else:
            self._write_manifest(complete=False)
        # A run killed mid-write left its temporary files: the opener removes them before anyone
        # writes (sharded, rank 0 opens first and the other ranks after it, see synthesize_iter).
        if not distributed or dist.rank_and_world()[0] == 0:
            for prefix in (SHARD_PREFIX, MANIFEST):
                for tmp in temporary_files_of(self.folder, prefix):
                    os.unlink(tmp)

    def _write_manifest(self, *, complete: bool) -> None:
        text = json.dumps({"format": FORMAT, "version": VERSION, "complete": complete, "job": self.job},
                          indent=1, sort_keys=True)
        atomic_write(os.path.join(self.folder, MANIFEST), lambda f: f.write(text.encode()))

    def load(self, index: int, rows: int) -> SyntheticBatch | None:
        """Shard ``index`` if it is on disk and whole (``rows`` rows), else None."""
        return _load_shard(self.folder, index, rows)

    def save(self, index: int, batch: SyntheticBatch) -> None:
        state = batch.state()

        def write(f):
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getbuffer())

        atomic_write(os.path.join(self.folder, shard_name(index)), write)

    def finish(self) -> None:
        """Marks the job complete. Distributed: a collective (every rank calls it after its own
        shards); rank 0 checks that every shard is on disk and whole first, and every rank raises
        RuntimeError when some are not (a folder the ranks do not share, say)."""
        if not self.distributed:
            self._write_manifest(complete=True)
            return
        dist.barrier()  # every rank has written its shards
        missing = None
        if dist.rank_and_world()[0] == 0:
            bounds = batch_bounds(self.job["n"], self.job["batch_size"])
            missing = [i for i, (a, b) in enumerate(bounds) if _load_shard(self.folder, i, b - a) is None]
            if not missing:
                self._write_manifest(complete=True)
        missing = dist.broadcast_object(missing)  # also: nobody returns before the manifest is written
        if missing:
            raise RuntimeError(
                f"synthesize: after every rank finished, {len(missing)} shard(s) are missing or damaged in "
                f"{self.folder!r} as rank 0 sees it (first: {shard_name(missing[0])}); save_to must be a "
                "folder every rank reaches. The manifest stays unfinished; a rerun redoes the missing shards."
            )


def _load_shard(folder: str, index: int, rows: int) -> SyntheticBatch | None:
    path = os.path.join(folder, shard_name(index))
    if not os.path.exists(path):
        return None
    try:
        batch = SyntheticBatch.from_state(torch.load(path, map_location="cpu", weights_only=True))
    except Exception:  # a foreign or damaged file: redo the shard (it is rewritten atomically)
        return None
    if any(t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all())
           for t in (batch.x, batch.soft_targets)):
        return None  # NaN or Inf images or targets: damaged too
    return batch if len(batch) == rows else None


def read_manifest(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ValueError(f"{path!r} is not a readable exml_fast synthesis manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        got = manifest if isinstance(manifest, dict) else {}
        raise ValueError(
            f"{path!r} is not an exml_fast synthesis manifest of version {VERSION} "
            f"(format {got.get('format')!r}, version {got.get('version')!r})"
        )
    job = manifest.get("job")
    sizes_ok = isinstance(job, dict) and all(
        isinstance(job.get(k), int) and not isinstance(job.get(k), bool) and job.get(k) >= 1
        for k in ("n", "batch_size"))
    if not isinstance(manifest.get("complete"), bool) or not sizes_ok:
        raise ValueError(f"{path!r}: a damaged synthesis manifest ('complete' must be true or false, 'job' must "
                         "hold the ints n and batch_size >= 1); rerun the job in a new folder")
    return manifest


def load_synthetic(folder: str | os.PathLike, *, allow_partial: bool = False) -> SyntheticBatch:
    """Reads the job in ``folder`` (written with ``save_to=folder``) as one SyntheticBatch.

    Args:
        folder: the ``save_to`` folder of a synthesis job.
        allow_partial: accept an unfinished job and return the shards present
            (in order, stopping at the first missing one). By default an
            unfinished job raises, so a half-done buffer is never used by mistake.
    """
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    job = manifest["job"]
    if not manifest["complete"] and not allow_partial:
        raise ValueError(
            f"load_synthetic: the job in {folder!r} is not finished; rerun it to resume, "
            "or pass allow_partial=True"
        )
    bounds = batch_bounds(job["n"], job["batch_size"])
    batches = []
    for i, (start, stop) in enumerate(bounds):
        b = _load_shard(folder, i, stop - start)
        if b is None:
            if manifest["complete"]:
                raise ValueError(f"load_synthetic: {folder!r} is marked complete but shard {i} is missing or damaged")
            break
        batches.append(b)
    if not batches:
        raise ValueError(f"load_synthetic: {folder!r} holds no finished shard yet")
    return SyntheticBatch.cat(batches)
