"""The interface every synthesizer shares: planning a job, seeding, shards, progress."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from exml_fast._utils import dist
from exml_fast._utils.batches import batch_bounds
from exml_fast._utils.checks import per_channel
from exml_fast._utils.progress import Progress
from exml_fast._utils.provenance import SEED_MAX, derive_seed
from exml_fast.synth.batch import MANIFEST, ShardStore, SyntheticBatch, load_synthetic, read_manifest

__all__ = ["Synthesizer"]





@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Puts every submodule in eval mode and restores each one's own flag on exit.

    (``model.train(flag)`` would set all submodules alike, and so change a
    model whose submodules were in mixed modes.)
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen(model: nn.Module, *, channels_last: bool = False):
    """Eval mode, no parameter gradients and (optionally) channels_last weights, restored on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    formats = []
    if channels_last:
        for p in model.parameters():
            if p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last):
                formats.append((p, p.data))
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    try:
        with eval_mode(model):
            for p, _ in flags:
                p.requires_grad_(False)
            yield model
    finally:
        for p, data in formats:
            p.data = data
        for p, flag in flags:
            p.requires_grad_(flag)


def teacher_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's parameters and buffers (names, shapes, dtypes, bytes)."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        t = t.detach().cpu().contiguous().reshape(-1)  # 0-d buffers cannot be viewed as bytes
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()


def batch_seed(base: int, index: int) -> int:
    return derive_seed("exml_fast.synth", base, index)


def _base_seed(generator, owner: str) -> int:
    if generator is None:
        return int(torch.randint(0, SEED_MAX, (1,)).item())
    if isinstance(generator, bool) or not isinstance(generator, (int, torch.Generator)):
        raise TypeError(f"{owner}: generator must be None, an int seed or a torch.Generator; "
                        f"got {type(generator).__name__}")
    if isinstance(generator, int):
        if generator < 0:
            raise ValueError(f"{owner}: an int generator (seed) must be >= 0; got {generator}")
        return generator & SEED_MAX
    return int(torch.randint(0, SEED_MAX, (1,), generator=generator, device=generator.device).item())


def check_teacher(teacher, owner: str) -> None:
    """``teacher`` must be an ``nn.Module`` whose parameters and buffers are finite (one pass over them: a
    NaN weight would otherwise be inverted into NaN images)."""
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"{owner}: teacher must be an nn.Module; got {type(teacher).__name__}")
    for name, t in [*teacher.named_parameters(), *teacher.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{owner}: the teacher's {name} holds NaN or Inf values; a teacher must have "
                             "finite weights")


def check_input_shape(input_shape, owner: str) -> tuple[int, int, int]:
    """``input_shape`` as a (C, H, W) tuple of ints.

    Raises:
        TypeError: not a sequence of ints. ValueError: not three positive sizes (both name ``owner``).
    """
    try:
        if isinstance(input_shape, (str, bytes)) or any(isinstance(s, (bool, float)) for s in input_shape):
            raise TypeError
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: input_shape must be a (C, H, W) sequence of ints; got {input_shape!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"{owner}: input_shape must be (C, H, W) with positive sizes; got {input_shape!r}")
    return shape


def teacher_device(teacher: nn.Module) -> torch.device:
    """The device of the teacher's first parameter (the CPU for a model without parameters)."""
    p = next(iter(teacher.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def resolve_device(teacher: nn.Module, device: torch.device | str | None, owner: str) -> torch.device:
    """The device a synthesizer runs on: ``device``, else the teacher's (``cuda`` gets the current index).

    Raises:
        ValueError: ``device`` is not where the teacher's parameters are (the message names ``owner``);
            caught here rather than at the first forward, as torch's "Input type ... and weight type ...".
    """
    home = teacher_device(teacher)
    dev = torch.device(home if device is None else device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if home != dev and next(iter(teacher.parameters()), None) is not None:  # a parameterless one runs anywhere
        raise ValueError(f"{owner}: device is {dev} but the teacher's parameters are on {home}; move the teacher "
                         f"first (teacher.to({str(dev)!r})) or leave device=None to run where the teacher is")
    return dev


class Synthesizer:
    """Base class: turns a trained classifier into labelled synthetic inputs.

    Subclasses implement :meth:`_synthesize_batch`; everything else — class
    balancing, seeding, streaming to disk and resuming, the progress bar — is
    shared. ``synthesize`` and ``synthesize_iter`` take the same arguments.
    """

    #: the method's name in manifests and on the command line
    method = "synthesizer"
    #: whether ``iterations`` means something for this method
    optimizes = True

    def __init__(
        self,
        teacher: nn.Module,
        *,
        input_shape: Sequence[int],
        mean=None,
        std=None,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        iterations: int | None = None,
        batch_size: int = 256,
    ) -> None:
        owner = type(self).__name__
        check_teacher(teacher, owner)
        self.teacher = teacher
        self.input_shape = check_input_shape(input_shape, owner)
        shape = self.input_shape
        self.mean = per_channel(mean, shape[0], "mean", owner)
        self.std = per_channel(std, shape[0], "std", owner)
        if (self.mean is None) != (self.std is None):
            raise ValueError(f"{owner}: give both mean and std, or neither")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"{owner}: std must be > 0; got {self.std}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"{owner}: num_classes must be a positive int or None; got {num_classes!r}")
        self._num_classes = num_classes
        self.device = resolve_device(teacher, device, owner)
        self.iterations = self._check_iterations(iterations, owner)
        self.batch_size = self._check_batch_size(batch_size, owner)

    # -- argument checks -------------------------------------------------------
    def _check_iterations(self, iterations, owner: str):
        if not self.optimizes:
            if iterations is not None:
                raise ValueError(f"{owner}: iterations must be None ({owner} does not optimise)")
            return None
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"{owner}: iterations must be an int >= 1; got {iterations!r}")
        return iterations

    @staticmethod
    def _check_batch_size(batch_size, owner: str) -> int:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"{owner}: batch_size must be an int >= 1; got {batch_size!r}")
        return batch_size

    @property
    def num_classes(self) -> int:
        """Output units of the teacher (inferred by one forward when not given)."""
        if self._num_classes is None:
            self._num_classes = self._infer_num_classes()
        return self._num_classes

    def _infer_num_classes(self) -> int:
        with eval_mode(self.teacher), torch.no_grad():
            out = self.teacher(torch.zeros((2, *self.input_shape), device=self.device))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
            raise ValueError(
                f"{type(self).__name__}: the teacher must map (N, C, H, W) inputs to (N, K) logits; "
                f"got {getattr(out, 'shape', type(out).__name__)} for input_shape {self.input_shape}"
            )
        return out.shape[1]

    @property
    def pixel_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-channel (low, high) of valid normalised pixels, (1, C, 1, 1) each; None without mean/std."""
        if self.mean is None:
            return None
        m = torch.tensor(self.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        s = torch.tensor(self.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        return (0.0 - m) / s, (1.0 - m) / s

    def config(self) -> dict[str, Any]:
        """The settings that decide the output (JSON-able; part of a job's manifest)."""
        return {"input_shape": list(self.input_shape), "mean": self.mean, "std": self.std}

    # -- jobs ------------------------------------------------------------------
    def _labels(self, n: int, classes) -> tuple[torch.Tensor, list[int] | None]:
        owner = type(self).__name__
        k = self.num_classes
        if classes is None:
            cls = list(range(k))
            given = None
        else:
            if isinstance(classes, torch.Tensor):
                classes = classes.reshape(-1).tolist()
            if isinstance(classes, (str, bytes)):
                raise TypeError(f"{owner}: classes must be None or a sequence of class indices; got {classes!r}")
            try:
                cls = [int(c) for c in classes]
            except (TypeError, ValueError):
                raise TypeError(f"{owner}: classes must be None or a sequence of class indices; got "
                                f"{classes!r}") from None
            if not cls:
                raise ValueError(f"{owner}: classes must not be empty")
            bad = [c for c in cls if not 0 <= c < k]
            if bad:
                raise ValueError(f"{owner}: classes must be in [0, {k}) (the teacher's outputs); got {bad}")
            if len(set(cls)) != len(cls):
                raise ValueError(f"{owner}: classes has duplicates: {cls}")
            given = cls
        labels = torch.tensor(cls, dtype=torch.int64)[torch.arange(n) % len(cls)]
        return labels, given

    def synthesize(
        self,
        n: int,
        *,
        classes: Sequence[int] | torch.Tensor | None = None,
        iterations: int | None = None,
        batch_size: int | None = None,
        generator: int | torch.Generator | None = None,
        progress: bool = True,
        save_to: str | os.PathLike | None = None,
        distributed: bool | None = None,
    ) -> SyntheticBatch:
        """Synthesises ``n`` labelled inputs and returns them as one SyntheticBatch.

        Args:
            n: number of inputs, >= 1.
            classes: target classes (None: all the teacher's outputs). Labels
                cycle through them, so every class gets n/len(classes) inputs
                (the first n mod len(classes) one more).
            iterations: optimisation steps per batch (None: the constructor's).
            batch_size: inputs optimised together (None: the constructor's).
                Peak memory is one batch's activations, whatever n is.
            generator: None (a seed drawn from torch's default generator), an
                int seed, or a torch.Generator. Batch b is seeded from
                (seed, b) alone, so a resumed job equals an uninterrupted one.
            progress: show a progress bar (iteration, loss terms, teacher accuracy).
            save_to: a folder: each batch is written as an atomic shard as soon
                as it is done, and a rerun with the same arguments resumes
                after the last whole shard. Read it back with
                :func:`exml_fast.synth.load_synthetic`.
            distributed: shard the job over the ranks of the default
                ``torch.distributed`` process group (``torchrun``, or your own
                ``init_process_group``): rank r synthesises batches r, r + K,
                r + 2K, ... of the K ranks into ``save_to`` (a folder every
                rank reaches), and rank 0 marks the job complete once every
                shard is there. None (default): shard when a group of more
                than one rank is initialised and ``save_to`` is given (without
                it every rank does the whole job, as before). False: never
                shard. True: shard, and raise without a group; without
                ``save_to`` the ranks' batches are gathered in memory (every
                rank receives every batch: for jobs that fit in memory, such
                as a run's buffer). Batch b is seeded from (seed, b) alone, and the
                ranks use rank 0's seed, so the union is the single-process
                result for that seed, bit for bit (given the same kernels:
                device, dtype, thread count).

        Returns:
            A :class:`SyntheticBatch` of n rows, on the synthesizer's device.
            Sharded, every rank returns the whole job, read back from
            ``save_to`` after all ranks finished (or gathered from the
            ranks without ``save_to``).
        """
        world = self._world(distributed, save_to, type(self).__name__)[1]
        batches = list(self.synthesize_iter(
            n, classes=classes, iterations=iterations, batch_size=batch_size,
            generator=generator, progress=progress, save_to=save_to, distributed=distributed,
        ))
        if world > 1 and save_to is not None:
            return load_synthetic(save_to).to(self.device)
        if world > 1:
            # Rank r holds batches r, r + K, ...: every rank's, interleaved back into batch order.
            own = [b.to("cpu") for b in batches]
            ranks = dist.all_gather_object(own)
            batches = [ranks[b % world][b // world] for b in range(sum(len(r) for r in ranks))]
            return SyntheticBatch.cat(batches).to(self.device)
        return SyntheticBatch.cat(batches)

    @staticmethod
    def _world(distributed: bool | None, save_to, owner: str) -> tuple[int, int]:
        """(rank, world size) the job is sharded over: (0, 1) unless sharded (:func:`dist.resolve_world`; None
        without ``save_to`` does not shard)."""
        if distributed is None and save_to is None:
            return 0, 1
        return dist.resolve_world(distributed, f"{owner}.synthesize")

    def synthesize_iter(
        self,
        n: int,
        *,
        classes: Sequence[int] | torch.Tensor | None = None,
        iterations: int | None = None,
        batch_size: int | None = None,
        generator: int | torch.Generator | None = None,
        progress: bool = True,
        save_to: str | os.PathLike | None = None,
        distributed: bool | None = None,
    ) -> Iterator[SyntheticBatch]:
        """Like :meth:`synthesize`, but yields one SyntheticBatch per optimisation batch.

        Only the batch being optimised (and the one yielded) is held in
        memory; with ``save_to`` a job of any size streams to disk. Batches
        already on disk from an interrupted run are read back, not redone.
        Arguments are checked when this is called, before the first batch.
        Sharded (see ``distributed``), each rank yields its own batches only,
        shows the progress bar on rank 0 only, and (with ``save_to``) the
        iteration's end is a collective: every rank must run it to the end.
        """
        owner = type(self).__name__
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{owner}.synthesize: n must be an int >= 1; got {n!r}")
        if self.optimizes:
            iterations = self.iterations if iterations is None else self._check_iterations(iterations, owner)
        elif iterations is not None:
            raise ValueError(f"{owner}.synthesize: iterations must be None ({owner} does not optimise)")
        batch_size = self.batch_size if batch_size is None else self._check_batch_size(batch_size, owner)
        labels, given = self._labels(n, classes)
        rank, world = self._world(distributed, save_to, owner)
        # (b, (start, stop)) of the batches this rank owns: all of them unless sharded.
        bounds = [(b, se) for b, se in enumerate(batch_bounds(n, batch_size)) if b % world == rank]

        store = None
        if save_to is not None:
            job = {
                "method": self.method, "config": self.config(), "n": n, "batch_size": batch_size,
                "iterations": iterations, "classes": given, "num_classes": self.num_classes,
                "teacher": teacher_fingerprint(self.teacher),
            }
            manifest_seed = _existing_seed(save_to) if generator is None else None
            job["seed"] = manifest_seed if manifest_seed is not None else _base_seed(generator, owner)
            if world == 1:
                store = ShardStore(save_to, _jsonable(job))
            else:
                store = _open_sharded_store(save_to, job, rank)
            seed = job["seed"]
        else:
            seed = _base_seed(generator, owner)
            if world > 1:  # sharded in memory: every rank runs rank 0's seed
                seed = dist.broadcast_object(seed)

        return self._run(labels, bounds, iterations, seed, store, progress and rank == 0)

    def _run(self, labels, bounds, iterations, seed, store, progress) -> Iterator[SyntheticBatch]:
        """Runs the batches ``bounds`` lists, as (index, (start, stop)), in order (sharded: this rank's)."""
        steps_per_batch = iterations if self.optimizes else 1
        bar = Progress(len(bounds) * steps_per_batch, self.method, progress)
        try:
            for i, (b, (start, stop)) in enumerate(bounds):
                desc = f"{self.method} {i + 1}/{len(bounds)}"
                if store is not None:
                    done = store.load(b, stop - start)
                    if done is not None:
                        bar.update(steps_per_batch, desc=desc + " (on disk)")
                        yield done.to(self.device)
                        continue
                t0 = time.perf_counter()
                gen = torch.Generator().manual_seed(batch_seed(seed, b))
                # Hooks and model modes are set per batch (in _synthesize_batch), so
                # nothing of the job is attached to the teacher while a batch is yielded.
                batch = self._synthesize_batch(
                    labels[start:stop].to(self.device), iterations=iterations, generator=gen,
                    offset=start, progress=lambda k, post, _d=desc: bar.update(k, post, _d),
                )
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the batch's kernels, not just their launches
                batch.seconds = time.perf_counter() - t0
                if store is not None:
                    store.save(b, batch)
                yield batch
            if store is not None:
                store.finish()
        finally:
            bar.close()

    def _synthesize_batch(self, labels: torch.Tensor, *, iterations, generator: torch.Generator,
                          offset: int, progress) -> SyntheticBatch:
        raise NotImplementedError


def _open_sharded_store(save_to, job: dict, rank: int) -> ShardStore:
    """Every rank's store on ``save_to`` for a sharded job: rank 0's seed for all (``job["seed"]`` is
    set to it), rank 0 opens the folder first (it writes or checks the manifest) and the others
    after it; an error of rank 0's (another job in the folder, say) is raised on every rank."""
    job["seed"] = dist.broadcast_object(job["seed"])
    store, error = None, None
    if rank == 0:
        try:
            store = ShardStore(save_to, _jsonable(job), distributed=True)
        except ValueError as e:
            error = str(e)
    error = dist.broadcast_object(error)
    if error is not None:
        raise ValueError(error)
    return store if store is not None else ShardStore(save_to, _jsonable(job), distributed=True)


def _existing_seed(folder) -> int | None:
    if not os.path.exists(os.path.join(os.fspath(folder), MANIFEST)):
        return None
    return read_manifest(os.fspath(folder))["job"].get("seed")


def _jsonable(obj):
    """Tuples become lists, so a job compares equal to its JSON round trip."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
