"""The fixed-size sample buffer of Ex-Model Distillation (Algorithm 1 of the ExML paper).

The learner keeps ``N`` samples: synthetic ones made from the experts, or
auxiliary / real ones. When expert ``i`` (1-based) arrives, ``N // i`` new
samples are made for its classes (:meth:`SyntheticBuffer.quota`), the old
content is subsampled to ``N - N // i`` keeping the classes balanced
(:func:`class_balanced_indices`) and the new samples are appended
(:meth:`SyntheticBuffer.update`). Distillation then draws minibatches with
:meth:`SyntheticBuffer.sample`.

Example::

    buf = SyntheticBuffer(5000)
    for i, expert in enumerate(stream, start=1):
        batch = DataImpressions(expert.model, ...).synthesize(buf.quota(i), classes=expert.classes)
        buf.update(batch.x, batch.y, experience=i - 1, soft_targets=batch.soft_targets, generator=gen)
        idx = buf.sample(32, generator=gen)
        xb, yb = buf.x[idx], buf.y[idx]

Everything is stored on the CPU (``x`` as float32), detached from any graph;
all random draws are made on the CPU from the ``generator`` arguments.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch

from exml_fast._utils.checks import check_int
from exml_fast._utils.io import atomic_write, load_torch_bytes

__all__ = ["SyntheticBuffer", "class_balanced_indices"]

FORMAT = "exml_fast.buffer"  # the on-disk format name (unchanged by the move to cl/)
VERSION = 1


def _describe(v: Any) -> str:
    return f"{v.dtype} {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__


def _check_generator(generator: Any, owner: str) -> torch.Generator | None:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{owner}: generator must be a CPU torch.Generator or None; got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"{owner}: generator must be a CPU torch.Generator (draws are made on the CPU so that a "
                         f"seed gives the same buffer on every device); got one on {generator.device}")
    return generator




def _check_labels(y: Any, name: str, owner: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex \
            or y.dtype == torch.bool:
        raise ValueError(f"{owner}: {name} must be a 1-D integer tensor of class indices; got {_describe(y)}")
    y = y.detach().to("cpu", torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{owner}: {name} must hold class indices >= 0; got a minimum of {int(y.min())}")
    return y


def class_balanced_indices(y: torch.Tensor, k: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` indices into ``y``, as class-balanced as possible, sorted ascending.

    Each class present in ``y`` gets ``floor(k / n_classes)`` samples; the
    ``k mod n_classes`` left over go one each to classes chosen at random. A
    class with fewer samples than its share keeps all of them and what it
    cannot use is shared among the others, again as evenly as possible
    ("water filling"), so the result always has exactly ``min(k, len(y))``
    indices and, when every class has enough samples, class counts that differ
    by at most one. Which samples of a class are kept is drawn uniformly.

    Args:
        y: (n,) integer class labels, on any device.
        k: how many indices to return, an int >= 0. ``k >= n`` returns all
            indices ``0 .. n-1``.
        generator: CPU ``torch.Generator`` of the draws (None: torch's default
            CPU generator).

    Returns:
        (min(k, n),) int64 CPU tensor of distinct indices, ascending.
    """
    owner = "class_balanced_indices"
    y = _check_labels(y, "y", owner)
    check_int(k, "k", owner, low=0)
    gen = _check_generator(generator, owner)
    n = y.shape[0]
    if k >= n:
        return torch.arange(n, dtype=torch.int64)
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    classes, counts = torch.unique(y, sorted=True, return_counts=True)
    counts_l = counts.tolist()
    m = len(counts_l)
    # Water filling: visit classes from the smallest; a class at or below the
    # current fair share keeps everything and leaves the rest to the others.
    alloc = [0] * m
    order = sorted(range(m), key=lambda j: (counts_l[j], j))
    remaining, left = k, m
    pos = 0
    while pos < m:
        j = order[pos]
        if counts_l[j] * left > remaining:  # counts_l[j] > remaining / left: this class and all after it are capped
            break
        alloc[j] = counts_l[j]
        remaining -= counts_l[j]
        left -= 1
        pos += 1
    capped = sorted(order[pos:])  # every one of these has more than remaining / left samples
    if capped:
        share, extra = divmod(remaining, len(capped))
        for j in capped:
            alloc[j] = share
        if extra:
            for t in torch.randperm(len(capped), generator=gen)[:extra].tolist():
                alloc[capped[t]] += 1
    picked = []
    for j in range(m):
        if alloc[j] == 0:
            continue
        members = torch.nonzero(y == classes[j], as_tuple=False).flatten()
        if alloc[j] < members.numel():
            members = members[torch.randperm(members.numel(), generator=gen)[: alloc[j]]]
        picked.append(members)
    return torch.sort(torch.cat(picked)).values


class SyntheticBuffer:
    """Fixed-size buffer of synthetic (or auxiliary/real) samples for ExML (Algorithm 1).

    Attributes (read-only):
        capacity: N, the most samples the buffer holds.
        x: (n, C, H, W) float32 CPU samples, or None before the first update.
        y: (n,) int64 class of each sample.
        experience: (n,) int64 index of the experience each sample was added for.
        soft_targets: (n, K) float32 soft targets, present iff every batch
            added so far had them (mixing batches with and without them is an
            error), else None.

    ``len(buffer)`` is n <= capacity.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = check_int(capacity, "capacity", "SyntheticBuffer", low=1)
        self._x: torch.Tensor | None = None
        self._y = torch.empty(0, dtype=torch.int64)
        self._experience = torch.empty(0, dtype=torch.int64)
        self._soft: torch.Tensor | None = None
        # Sampling state: the current pass's permutation and the position in it.
        self._perm = torch.empty(0, dtype=torch.int64)
        self._pos = 0

    # ----------------------------------------------------------------- access
    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def x(self) -> torch.Tensor | None:
        return self._x

    @property
    def y(self) -> torch.Tensor:
        return self._y

    @property
    def experience(self) -> torch.Tensor:
        return self._experience

    @property
    def soft_targets(self) -> torch.Tensor | None:
        return self._soft

    def __len__(self) -> int:
        return int(self._y.shape[0])

    def __repr__(self) -> str:
        shape = None if self._x is None else tuple(self._x.shape[1:])
        return (f"SyntheticBuffer(capacity={self._capacity}, len={len(self)}, sample_shape={shape}, "
                f"soft_targets={self._soft is not None})")

    def quota(self, i: int) -> int:
        """How many new samples the ``i``-th experience (1-based) gets: ``max(1, capacity // i)``."""
        check_int(i, "i", "SyntheticBuffer.quota", low=1)
        return max(1, self._capacity // i)

    def class_counts(self) -> dict[int, int]:
        """Samples per class, ``{class: count}`` in ascending class order (classes with samples only)."""
        classes, counts = torch.unique(self._y, sorted=True, return_counts=True)
        return dict(zip(classes.tolist(), counts.tolist()))

    # ----------------------------------------------------------------- update
    def update(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        experience: int,
        soft_targets: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Adds a new experience's samples (Algorithm 1, steps 2-3).

        The old content is subsampled to ``capacity - len(x)`` with
        :func:`class_balanced_indices` (nothing is dropped while it fits), then
        ``x`` is appended. Samples are copied to the CPU as float32, detached.
        The sampling pass of :meth:`sample` restarts.

        Args:
            x: (m, C, H, W) float samples, m <= capacity; (C, H, W) must match
                the samples already stored.
            y: (m,) integer class labels (>= 0).
            experience: index of the experience they come from (an int >= 0;
                stored per sample).
            soft_targets: (m, K) float targets (e.g. Data Impressions' Dirichlet
                vectors), or None. Must be given iff the stored samples have them
                (K equal too).
            generator: CPU ``torch.Generator`` of the subsampling draws (None:
                torch's default CPU generator).

        Raises:
            ValueError: ``len(x) > capacity``, shapes or dtypes that do not
                match, non-finite values, or soft targets mixed with none.
        """
        owner = "SyntheticBuffer.update"
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"{owner}: x must be a float tensor of shape (m, C, H, W); got {_describe(x)}")
        m = x.shape[0]
        y = _check_labels(y, "y", owner)
        if y.shape[0] != m:
            raise ValueError(f"{owner}: y must have one label per sample of x, shape ({m},); got {tuple(y.shape)}")
        check_int(experience, "experience", owner, low=0)
        gen = _check_generator(generator, owner)
        if m > self._capacity:
            raise ValueError(f"{owner}: {m} new samples do not fit a buffer of capacity {self._capacity}; "
                             f"pass at most capacity samples (quota(i) gives the ExML share)")
        if self._x is not None and x.shape[1:] != self._x.shape[1:]:
            raise ValueError(f"{owner}: x samples have shape {tuple(x.shape[1:])} but the buffer stores "
                             f"{tuple(self._x.shape[1:])}")
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{owner}: x holds non-finite values (inf or nan); refusing to store them")
        if soft_targets is not None:
            if not isinstance(soft_targets, torch.Tensor) or soft_targets.dim() != 2 \
                    or soft_targets.shape[0] != m or not soft_targets.is_floating_point():
                raise ValueError(f"{owner}: soft_targets must be a float tensor of shape ({m}, K); got "
                                 f"{_describe(soft_targets)}")
            soft_targets = soft_targets.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(soft_targets).all()):
                raise ValueError(f"{owner}: soft_targets hold non-finite values (inf or nan)")
        if self._x is not None:
            if (soft_targets is None) != (self._soft is None):
                have = "have" if self._soft is not None else "have no"
                raise ValueError(f"{owner}: the stored samples {have} soft_targets but the new ones "
                                 f"{'do not' if soft_targets is None else 'do'}; a buffer holds soft targets for "
                                 f"all samples or none")
            if soft_targets is not None and soft_targets.shape[1] != self._soft.shape[1]:
                raise ValueError(f"{owner}: soft_targets have {soft_targets.shape[1]} columns but the stored "
                                 f"ones have {self._soft.shape[1]}")

        keep = self._capacity - m
        if self._x is None:
            old_x, old_y, old_e, old_s = x[:0], y[:0], y[:0], None if soft_targets is None else soft_targets[:0]
        else:
            idx = class_balanced_indices(self._y, keep, generator=gen)
            old_x, old_y, old_e = self._x[idx], self._y[idx], self._experience[idx]
            old_s = None if self._soft is None else self._soft[idx]
        self._x = torch.cat([old_x, x])
        self._y = torch.cat([old_y, y])
        self._experience = torch.cat([old_e, torch.full((m,), experience, dtype=torch.int64)])
        self._soft = None if soft_targets is None else torch.cat([old_s, soft_targets])
        self._perm, self._pos = torch.empty(0, dtype=torch.int64), 0

    # ----------------------------------------------------------------- sample
    def sample(self, batch_size: int, *, generator: torch.Generator | None) -> torch.Tensor:
        """Indices of the next minibatch, (batch_size,) int64 on the CPU.

        Sampling goes through the buffer without replacement by passes, as
        :func:`exml_fast.training.distill` does: a fresh permutation (drawn from
        ``generator``) per pass over the buffer. Unlike ``distill``, a minibatch
        that crosses the end of a pass is completed from the next pass's
        permutation, so every minibatch has exactly ``batch_size`` indices (a
        minibatch larger than the buffer spans several passes and repeats
        samples). :meth:`update` starts a new pass; the position in the pass is
        part of :meth:`state_dict`.

        Use as ``buf.x[idx]``, ``buf.y[idx]``, ``buf.soft_targets[idx]``.
        """
        owner = "SyntheticBuffer.sample"
        check_int(batch_size, "batch_size", owner, low=1)
        gen = _check_generator(generator, owner)
        n = len(self)
        if n == 0:
            raise ValueError(f"{owner}: the buffer is empty; call update() first")
        parts, need = [], batch_size
        while need:
            if self._pos >= self._perm.shape[0]:
                self._perm, self._pos = torch.randperm(n, generator=gen), 0
            take = self._perm[self._pos : self._pos + need]
            self._pos += take.shape[0]
            need -= take.shape[0]
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """The buffer as a plain dict of CPU tensors and ints (what :meth:`save` writes)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "capacity": self._capacity,
            "x": None if self._x is None else self._x.clone(),
            "y": self._y.clone(),
            "experience": self._experience.clone(),
            "soft_targets": None if self._soft is None else self._soft.clone(),
            "perm": self._perm.clone(),
            "pos": self._pos,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replaces the content with ``state`` (from :meth:`state_dict`), after checking it.

        Raises:
            ValueError: not a buffer state, a capacity different from this
                buffer's, or tensors whose shapes, dtypes or lengths disagree.
        """
        owner = "SyntheticBuffer.load_state_dict"
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{owner}: not a SyntheticBuffer state (no 'format': {FORMAT!r} entry)")
        if state.get("version") != VERSION:
            raise ValueError(f"{owner}: unknown buffer state version {state.get('version')!r}; this exml_fast "
                             f"reads version {VERSION}")
        missing = [k for k in ("capacity", "x", "y", "experience", "soft_targets", "perm", "pos") if k not in state]
        if missing:
            raise ValueError(f"{owner}: the state lacks {', '.join(missing)}")
        cap = state["capacity"]
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"{owner}: capacity must be an int >= 1; got {cap!r}")
        if cap != self._capacity:
            raise ValueError(f"{owner}: the state is of a buffer of capacity {cap}, this one has capacity "
                             f"{self._capacity}; use SyntheticBuffer.load or SyntheticBuffer({cap})")
        x, y, e, s, perm, pos = (state[k] for k in ("x", "y", "experience", "soft_targets", "perm", "pos"))

        def _t(v, name, dtype, dim):
            if not isinstance(v, torch.Tensor) or v.dtype != dtype or v.dim() != dim:
                raise ValueError(f"{owner}: {name} must be a {dim}-D {dtype} tensor; got {_describe(v)}")
            return v.detach().to("cpu").clone()

        y = _t(y, "y", torch.int64, 1)
        e = _t(e, "experience", torch.int64, 1)
        perm = _t(perm, "perm", torch.int64, 1)
        n = y.shape[0]
        if n > cap:
            raise ValueError(f"{owner}: the state holds {n} samples, more than its capacity {cap}")
        if e.shape[0] != n:
            raise ValueError(f"{owner}: experience has {e.shape[0]} entries for {n} labels")
        if n and (int(y.min()) < 0 or int(e.min()) < 0):
            raise ValueError(f"{owner}: y and experience must be >= 0")
        if x is None:
            if n:
                raise ValueError(f"{owner}: x is None but the state holds {n} labels")
            if s is not None:
                raise ValueError(f"{owner}: soft_targets are given but x is None")
        else:
            x = _t(x, "x", torch.float32, 4)
            if x.shape[0] != n:
                raise ValueError(f"{owner}: x has {x.shape[0]} samples for {n} labels")
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"{owner}: x holds NaN or Inf values")
        if s is not None:
            s = _t(s, "soft_targets", torch.float32, 2)
            if s.shape[0] != n:
                raise ValueError(f"{owner}: soft_targets has {s.shape[0]} rows for {n} labels")
            if not bool(torch.isfinite(s).all()):
                raise ValueError(f"{owner}: soft_targets holds NaN or Inf values")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= perm.shape[0]:
            raise ValueError(f"{owner}: pos must be an int in [0, len(perm)]; got {pos!r}")
        if perm.numel() and (perm.shape[0] != n or not torch.equal(torch.sort(perm).values, torch.arange(n))):
            raise ValueError(f"{owner}: perm must be empty or a permutation of 0..{n - 1}")
        self._x, self._y, self._experience, self._soft = x, y, e, s
        self._perm, self._pos = perm, pos

    def save(self, path: str | os.PathLike) -> None:
        """Writes :meth:`state_dict` with ``torch.save`` to ``path``, atomically."""
        state = self.state_dict()

        def write(f):
            buf = io.BytesIO()
            torch.save(state, buf)
            f.write(buf.getbuffer())

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SyntheticBuffer:
        """Reads a buffer written by :meth:`save` (``torch.load(weights_only=True)``; contents checked).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: the file is not a readable buffer (message names it).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SyntheticBuffer.load: {path!r} does not exist or is not a file")
        with open(path, "rb") as f:
            state = load_torch_bytes(f.read(), where=f"SyntheticBuffer.load: {path}", what="buffer file")
        cap = state.get("capacity") if isinstance(state, dict) else None
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ValueError(f"SyntheticBuffer.load: {path}: not a SyntheticBuffer file (no valid capacity)")
        buf = cls(cap)
        try:
            buf.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"SyntheticBuffer.load: {path}: {e}") from e
        return buf
