"""GenerativeSynthesizer: a generator network trained against the teacher, then sampled in one forward pass.

Pixel optimisation (model inversion, DeepInversion, Data Impressions) pays
thousands of teacher passes for every batch; a trained generator — SKD's
*knowledge delegator* (papers/self-distilled-knowledge-delegator.txt), DAFL's
or DFAD's generator — pays once, in :meth:`GenerativeSynthesizer.fit`, and then
makes any number of samples at one generator + one teacher forward per batch.

Training (SKD Algorithm 1, the "imitate & explore" loop), one iteration:

1. **imitate** (``imitate_steps`` times, 5 in SKD): a student ``S`` — a clone
   of the teacher re-initialised at random — takes an SGD step (lr 0.1) on the
   discrepancy between itself and the frozen teacher ``T`` on fresh samples
   ``x = D(z)``: SKD's feature cosine discrepancy ψ (weight ``imitation``)
   and/or DFAD's logit L1 (weight ``adversarial``).
2. **explore**: the generator ``D`` takes an Adam step (lr 1e-3) on::

       L = −imitation·ψ(T, S) − adversarial·L1(T, S)          (seek what S has not learnt)
           + category·CE(T(x), argmax T(x))                     (SKD Eq. 4–5, DAFL one-hot)
           + diversity·Σ_k w_k log w_k                          (SKD Eq. 6, DAFL entropy)
           + activation·(−mean |F_T(x)|)                        (DAFL)
           + bn·Σ_l BN-statistic distance of T's layers         (SKD Eq. 7, DeepInversion's R_feature)

   and, with ``student_explore="explore"`` (the ``skd`` preset's: Algorithm 1
   as written, "train both S and D by minimising L_explore"), ``S`` steps on
   the same loss.

Presets (:data:`GENERATIVE_PRESETS`): ``"skd"`` (every SKD term at weight 1,
5 imitate steps, the student on the explore loss too), ``"dafl"`` (one-hot 1,
activation 0.1, information entropy 5 in log10; the student, when one is given,
distilled beside the generator), ``"dfad"`` (the adversarial L1 alone, 5
imitate steps; the student only imitates). DAFL's and DFAD's presets carry
their public code's recipe: its generator (``"dafl"``, ``"dfad"`` in
:data:`~exml_fast.models.GENERATOR_ARCHS`), learning rates, Adam betas and
student optimiser; every one of them can be overridden.

A student trained **beside** the generator (DAFL's: ``student_kd``, a
temperature): after each explore step it takes one step of the KD loss
:func:`exml_fast.ops.kd_loss` between itself and the teacher on that step's
samples (detached, the generator in train mode, as DAFL's student sees them);
:attr:`FitResult.student` is then the distilled student.

Sampling: :meth:`synthesize` keeps the base interface — ``classes=`` are
honoured by drawing until the teacher has labelled enough samples as each
requested class (``balance=True``), or, with ``balance=False``, every draw is
kept and labelled by the teacher's argmax over ``classes``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from exml_fast._utils.checks import check_choice, check_float, check_int, cpu_generator
from exml_fast._utils.dtypes import PRECISIONS, autocast_to
from exml_fast._utils.io import atomic_write, load_torch_file
from exml_fast._utils.progress import Progress
from exml_fast._utils.provenance import SEED_MAX, derive_seed
from exml_fast.checkpoint import state_dict_sha256
from exml_fast.models.features import FeatureTap, named_layer
from exml_fast.models.generators import GENERATOR_ARCHS, build_generator
from exml_fast.ops.fast_layers import fast_layers
from exml_fast.ops.soft_target_losses import kd_loss
from exml_fast.synth.base import Synthesizer, eval_mode, frozen, teacher_fingerprint
from exml_fast.synth.batch import SyntheticBatch
from exml_fast.synth.generative_losses import (activation_loss, category_loss, diversity_loss,
                                               feature_cosine_discrepancy, logit_l1)
from exml_fast.synth.matcher import BNStatsMatcher

__all__ = ["GENERATIVE_PRESETS", "GENERATIVE_TERMS", "DelegatorError", "FitResult", "GenerativeSynthesizer"]

#: The loss terms a generator can be trained with (see the module docstring).
GENERATIVE_TERMS = ("imitation", "adversarial", "category", "diversity", "activation", "bn")

#: name → the term weights, the number of imitate steps per explore step, whether the student also steps on
#: the explore loss, the KD temperature of a student distilled beside the generator (None: none), the generator
#: network and its Adam (lr, betas), and the student's optimiser (name, lr, weight decay; momentum 0.9 for SGD).
#: "dafl" and "dfad" follow their public code (DAFL's DAFL_train.py and models.py for MNIST; DFAD's DFAD_mnist.py
#: and network/gan.py): DAFL's entropy term is in log10 (weight 5 / ln 10 here, where the term is in natural log),
#: its generator's Adam runs at lr 0.2 with torch's default betas, its student is distilled beside it at τ 1 by
#: Adam 2e-3; DFAD's student steps by SGD 0.01 with weight decay 1e-4. SKD's: the paper's lrs, Adam betas (0.5,
#: 0.999) (a DCGAN-style choice of ours; the paper gives none).
GENERATIVE_PRESETS: dict[str, dict[str, Any]] = {
    "skd": {"weights": {"imitation": 1.0, "category": 1.0, "diversity": 1.0, "bn": 1.0}, "imitate_steps": 5,
            "student_explore": "explore", "student_kd": None, "generator_arch": "skd-small", "lr_generator": 1e-3,
            "generator_betas": (0.5, 0.999), "student_optimizer": "sgd", "lr_student": 0.1,
            "student_weight_decay": 5e-4},
    "dafl": {"weights": {"category": 1.0, "activation": 0.1, "diversity": 5.0 / math.log(10.0)}, "imitate_steps": 0,
             "student_explore": "none", "student_kd": 1.0, "generator_arch": "dafl", "lr_generator": 0.2,
             "generator_betas": (0.9, 0.999), "student_optimizer": "adam", "lr_student": 2e-3,
             "student_weight_decay": 0.0},
    # DFAD's student only ever minimises the discrepancy: stepping it on the generator's loss would make it
    # ascend the very L1 it is meant to close.
    "dfad": {"weights": {"adversarial": 1.0}, "imitate_steps": 5, "student_explore": "none", "student_kd": None,
             "generator_arch": "dfad", "lr_generator": 1e-3, "generator_betas": (0.9, 0.999),
             "student_optimizer": "sgd", "lr_student": 0.01, "student_weight_decay": 1e-4},
}

#: The student's optimisers (SGD with momentum 0.9).
STUDENT_OPTIMIZERS = ("sgd", "adam")

#: ``precision`` of a fit: the autocast dtype of the networks' forwards (None: none, float32); no fp16 (a fit
#: has no loss scale).
FIT_PRECISIONS: dict[str, torch.dtype | None] = {k: PRECISIONS[k] for k in ("fp32", "bf16")}

STUDENT_EXPLORE = ("explore", "none")
FORMAT = "exml_fast.delegator"
FIT_FORMAT = "exml_fast.delegator_fit"
VERSION = 1


class DelegatorError(ValueError):
    """A file that is not a readable delegator (or fit checkpoint), or one that does not fit this synthesizer."""


@dataclasses.dataclass
class FitResult:
    """What :meth:`GenerativeSynthesizer.fit` returns.

    Attributes:
        student: the student ``S`` trained alongside (None for presets without one, e.g. DAFL); SKD's
            sanity figure puts the teacher's classifier on it and compares accuracies (SKD Table I).
        history: term name → the mean of each logged window of explore steps (``"imitate"``: the
            student's loss), in the order they were logged.
        iterations: explore steps done in total (with a resumed run's).
        seconds: wall seconds of those steps, summed over the call and every interrupted call it resumed
            (the steps an interruption lost after the last checkpoint are not counted); None when it
            resumed a checkpoint that does not record its time.
        segments: one dict per call that did steps, in order: ``{"steps", "seconds", "threads", "device"}``
            (``threads``: ``torch.get_num_threads()`` of that call); a checkpoint written before segments were
            recorded gives one first segment with ``threads`` and ``device`` None.
    """

    student: nn.Module | None
    history: dict[str, list[float]]
    iterations: int
    seconds: float | None = None
    segments: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def reinitialised_clone(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` whose every submodule with ``reset_parameters`` is re-initialised,
    drawn from ``seed`` (torch's global generator is left as it was); BN running statistics reset too."""
    clone = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in clone.modules():
            if hasattr(m, "reset_running_stats"):
                m.reset_running_stats()
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    for p in clone.parameters():
        p.requires_grad_(True)
    return clone.train()


class GenerativeSynthesizer(Synthesizer):
    """Synthesis by a generator network trained against the teacher (SKD / DAFL / DFAD).

    Example::

        synth = GenerativeSynthesizer(teacher, input_shape=(1, 32, 32), mean=(0.1307,), std=(0.3081,))
        synth.fit(2000, batch_size=256, generator=0)      # trains the delegator (resumable: checkpoint=)
        batch = synth.synthesize(10_000, classes=range(10), generator=1)
        synth.save("delegator.pt")                          # weights-only, checksummed

    Args:
        teacher: the frozen classifier, (N, C, H, W) → (N, K) logits; its
            last ``nn.Linear`` is the classifier whose input is the feature
            for ψ and the activation term (unless ``feature_layer``).
        input_shape, mean, std, num_classes, device, batch_size: as for every
            :class:`~exml_fast.synth.Synthesizer` (``batch_size``: samples
            drawn per teacher forward in :meth:`synthesize`).
        preset: ``"skd"`` (default), ``"dafl"`` or ``"dfad"``: the defaults of
            every setting below whose default is None (:data:`GENERATIVE_PRESETS`).
        weights: term → weight, overriding the preset's (terms in
            :data:`GENERATIVE_TERMS`; an absent term is 0).
        imitate_steps: student steps per explore step (None: the preset's).
        generator_arch: ``"skd-small"`` (SKD Table IV), ``"skd-narrow"``
            (Table IV at a quarter of the width), ``"skd-large"`` (Table V),
            ``"dafl"`` / ``"dfad"`` (their public generators), None (the preset's), or a
            callable ``f(input_shape, latent_dim=...)`` that returns a module mapping (N, latent_dim) to (N, C, H, W).
        latent_dim: size of z.
        delegator: an existing generator network to train further and sample
            from (SKD's continual fine-tuning: ``D_n`` starts as ``D_{n-1}``);
            it is used, and trained, in place. None: built at the first
            :meth:`fit` from its seed.
        student: the model imitating the teacher during :meth:`fit` (None: a
            re-initialised clone of the teacher, as in SKD); with ``student_kd``,
            the model distilled beside the generator (None: no student).
        student_explore: ``"explore"`` — the student also steps on the
            explore loss (Algorithm 1 as written) — or ``"none"`` (None: the
            preset's; ``"explore"`` for skd, ``"none"`` for dfad and dafl).
        student_kd: the temperature of the KD step a given ``student`` takes after
            each explore step (DAFL's student, τ 1); 0 turns it off; None: the
            preset's. Only for presets without imitation/adversarial terms.
        lr_generator: the generator's Adam lr (None: the preset's; SKD 1e-3, DAFL
            0.2, DFAD 1e-3), with ``generator_betas`` (None: the preset's).
        student_optimizer, lr_student, student_weight_decay: the student's
            optimiser, "sgd" (momentum 0.9) or "adam", its lr and L2 weight decay
            (None: the preset's; SKD SGD 0.1 / 5e-4, DAFL Adam 2e-3 / 0, DFAD SGD
            0.01 / 1e-4).
        lr_decay_every: divide both by 10 every this many iterations (None: never;
            SKD: every 100 epochs).
        balance: in :meth:`synthesize`, draw until each requested class has its
            share as labelled by the teacher (True), or keep every draw with
            the teacher's argmax over the requested classes as its label (False).
        max_draw_factor: with ``balance``, give up (RuntimeError) after drawing
            this many times the requested number of samples.
        feature_layer: the name of the teacher's submodule (``teacher.named_modules()``)
            whose output, flattened, is the feature of ψ and of the activation term,
            in the student too for ψ (None: the classifier's input). DAFL's code reads
            its LeNet-5's 120 activations after conv5, not the 84 the classifier takes:
            ``"features.7"`` of :class:`~exml_fast.models.LeNet5DAFL`.
        precision: ``"fp32"`` (the default) or ``"bf16"``: in :meth:`fit`, the networks' forwards (generator,
            teacher, student) run under ``torch.autocast`` of bfloat16 and their backward with them; the logits
            and features are taken in float32 for every loss term, and the weights, gradients and optimisers
            stay float32. Sampling (:meth:`sample`, :meth:`synthesize`) stays float32. fp16 is not offered: a
            fit has no loss scale, and fp16 gradients of its small terms underflow.
    """

    method = "generative"
    optimizes = False

    def __init__(
        self,
        teacher: nn.Module,
        *,
        input_shape: Sequence[int],
        mean=None,
        std=None,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        batch_size: int = 256,
        preset: str = "skd",
        weights: dict[str, float] | None = None,
        imitate_steps: int | None = None,
        generator_arch: str | Callable[..., nn.Module] | None = None,
        latent_dim: int = 100,
        delegator: nn.Module | None = None,
        student: nn.Module | None = None,
        student_explore: str | None = None,
        student_kd: float | None = None,
        lr_generator: float | None = None,
        generator_betas: tuple[float, float] | None = None,
        student_optimizer: str | None = None,
        lr_student: float | None = None,
        student_weight_decay: float | None = None,
        lr_decay_every: int | None = None,
        balance: bool = True,
        max_draw_factor: int = 100,
        feature_layer: str | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(teacher, input_shape=input_shape, mean=mean, std=std, num_classes=num_classes,
                         device=device, iterations=None, batch_size=batch_size)
        owner = "GenerativeSynthesizer"
        check_choice(preset, "preset", owner, GENERATIVE_PRESETS)
        self.preset = preset
        recipe = GENERATIVE_PRESETS[preset]
        chosen = dict(recipe["weights"])
        if weights is not None:
            if not isinstance(weights, dict):
                raise TypeError(f"{owner}: weights must be a dict term -> weight; got {type(weights).__name__}")
            unknown = sorted(set(weights) - set(GENERATIVE_TERMS))
            if unknown:
                raise ValueError(f"{owner}: weights has unknown terms {unknown}; terms: {list(GENERATIVE_TERMS)}")
            chosen.update(weights)
        self.weights = {t: check_float(chosen.get(t, 0.0), f"weights[{t!r}]", owner) for t in GENERATIVE_TERMS}
        if not any(self.weights.values()):
            raise ValueError(f"{owner}: every term weight is 0; nothing would train the generator")
        steps = GENERATIVE_PRESETS[preset]["imitate_steps"] if imitate_steps is None else imitate_steps
        self.imitate_steps = check_int(steps, "imitate_steps", owner, low=0)
        self.uses_student = self.weights["imitation"] > 0 or self.weights["adversarial"] > 0
        if student_explore is None:
            student_explore = GENERATIVE_PRESETS[preset]["student_explore"]
        if self.uses_student and self.imitate_steps == 0 and student_explore == "none":
            raise ValueError(f"{owner}: the imitation/adversarial terms need a student that learns: "
                             "imitate_steps >= 1 or student_explore='explore'")
        if generator_arch is None:
            generator_arch = recipe["generator_arch"]
        if isinstance(generator_arch, str):
            if generator_arch not in GENERATOR_ARCHS:
                raise ValueError(f"{owner}: generator_arch must be one of {sorted(GENERATOR_ARCHS)} or a callable; "
                                 f"got {generator_arch!r}")
        elif not callable(generator_arch):
            raise TypeError(f"{owner}: generator_arch must be a name or a callable; got "
                            f"{type(generator_arch).__name__}")
        self.generator_arch = generator_arch
        self.latent_dim = check_int(latent_dim, "latent_dim", owner, low=1)
        if delegator is not None and not isinstance(delegator, nn.Module):
            raise TypeError(f"{owner}: delegator must be an nn.Module or None; got {type(delegator).__name__}")
        if student is not None and not isinstance(student, nn.Module):
            raise TypeError(f"{owner}: student must be an nn.Module or None; got {type(student).__name__}")
        self._delegator = delegator.to(self.device) if delegator is not None else None
        self._student_given = student
        check_choice(student_explore, "student_explore", owner, STUDENT_EXPLORE)
        self.student_explore = student_explore
        if student_kd is None:
            student_kd = recipe["student_kd"] or 0.0
        self.student_kd = check_float(student_kd, "student_kd", owner)  # a temperature > 0, or 0: no KD student
        if self.student_kd and self.uses_student:
            raise ValueError(f"{owner}: student_kd distils a student beside the generator; the imitation/adversarial "
                             "terms already train one (pass student_kd=0, or weights without those terms)")
        self.lr_generator = check_float(recipe["lr_generator"] if lr_generator is None else lr_generator,
                                        "lr_generator", owner, positive=True)
        betas = recipe["generator_betas"] if generator_betas is None else generator_betas
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"{owner}: generator_betas must be two numbers in [0, 1); got {generator_betas!r}")
        self.generator_betas = (float(betas[0]), float(betas[1]))
        student_optimizer = recipe["student_optimizer"] if student_optimizer is None else student_optimizer
        check_choice(student_optimizer, "student_optimizer", owner, STUDENT_OPTIMIZERS)
        self.student_optimizer = student_optimizer
        self.lr_student = check_float(recipe["lr_student"] if lr_student is None else lr_student, "lr_student",
                                      owner, positive=True)
        self.student_weight_decay = check_float(recipe["student_weight_decay"] if student_weight_decay is None
                                                else student_weight_decay, "student_weight_decay", owner)
        self.lr_decay_every = None if lr_decay_every is None else check_int(lr_decay_every, "lr_decay_every",
                                                                              owner, low=1)
        if not isinstance(balance, bool):
            raise TypeError(f"{owner}: balance must be a bool; got {balance!r}")
        self.balance = balance
        self.max_draw_factor = check_int(max_draw_factor, "max_draw_factor", owner, low=1)
        if feature_layer is not None:
            named_layer(self.teacher, feature_layer, owner, "feature_layer")  # the name's errors here, not at fit
        self.feature_layer = feature_layer
        self.precision = check_choice(precision, "precision", owner, FIT_PRECISIONS)
        self._job_classes: list[int] | None = None

    # -- the generator network --------------------------------------------------------------------
    @property
    def delegator(self) -> nn.Module:
        """The generator network (raises before :meth:`fit`, :meth:`load` or ``delegator=``)."""
        if self._delegator is None:
            raise RuntimeError("GenerativeSynthesizer: no delegator yet; call fit() first, pass delegator=, "
                               "or use GenerativeSynthesizer.load(path, teacher)")
        return self._delegator

    def _build_delegator(self, seed: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(self.generator_arch, str):
                net = build_generator(self.generator_arch, self.input_shape, latent_dim=self.latent_dim)
            else:
                net = self.generator_arch(self.input_shape, latent_dim=self.latent_dim)
        if not isinstance(net, nn.Module):
            raise TypeError(f"GenerativeSynthesizer: generator_arch returned a {type(net).__name__}, not an nn.Module")
        net = net.to(self.device)
        with torch.no_grad(), eval_mode(net):
            out = net(torch.zeros(2, self.latent_dim, device=self.device))
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, *self.input_shape):
            raise ValueError(f"GenerativeSynthesizer: generator_arch maps (2, {self.latent_dim}) to "
                             f"{getattr(out, 'shape', type(out).__name__)}, not (2, *input_shape) = "
                             f"(2, {', '.join(map(str, self.input_shape))})")
        return net

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The delegator's state_dict."""
        return self.delegator.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads a delegator state_dict (strict); builds the delegator first when there is none."""
        if self._delegator is None:
            self._delegator = self._build_delegator(0)
        self.delegator.load_state_dict(state, strict=True)

    def config(self) -> dict[str, Any]:
        arch = self.generator_arch if isinstance(self.generator_arch, str) else "custom"
        return {**super().config(), "generator_arch": arch, "latent_dim": self.latent_dim, "balance": self.balance,
                "delegator": teacher_fingerprint(self.delegator)}

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Writes the delegator to ``path`` atomically: one ``torch.save`` of plain data (the architecture's
        name and arguments, input shape, normalisation, the state_dict and its sha256), read back by
        :meth:`load` with ``weights_only=True``. A custom ``generator_arch`` is saved by weights only:
        pass the same callable to :meth:`load`."""
        state = _cpu_state(self.delegator.state_dict())
        payload = {
            "format": FORMAT, "version": VERSION,
            "generator_arch": self.generator_arch if isinstance(self.generator_arch, str) else None,
            "latent_dim": self.latent_dim, "input_shape": list(self.input_shape),
            "mean": None if self.mean is None else list(self.mean), "std": None if self.std is None else list(self.std),
            "num_classes": self.num_classes, "preset": self.preset, "weights": dict(self.weights),
            "torch_version": str(torch.__version__), "sha256": state_dict_sha256(state), "state_dict": state,
        }
        atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike, teacher: nn.Module, **kwargs: Any) -> GenerativeSynthesizer:
        """A synthesizer for ``teacher`` sampling from the delegator saved at ``path``.

        ``kwargs`` go to the constructor (the file's input shape, normalisation, architecture and
        latent size are used unless given). Nothing in the file is executed: it is read with
        ``weights_only=True`` and its weights must match their sha256.

        Raises:
            FileNotFoundError: no file. DelegatorError: not a delegator file, corrupt, or weights that
            do not fit the architecture.
        """
        path = os.fspath(path)
        obj = load_torch_file(path, what="delegator file", error=DelegatorError)
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise DelegatorError(f"{path}: not an exml_fast delegator file (no 'format': {FORMAT!r}); write one "
                                 "with GenerativeSynthesizer.save")
        if obj.get("version") != VERSION:
            raise DelegatorError(f"{path}: unknown delegator format version {obj.get('version')!r}; this exml_fast "
                                 f"reads version {VERSION}")
        state = obj.get("state_dict")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise DelegatorError(f"{path}: 'state_dict' is missing or is not a dict of tensors")
        if state_dict_sha256(state) != obj.get("sha256"):
            raise DelegatorError(f"{path}: the weights do not match their stored sha256 (corrupt file)")
        arch = kwargs.pop("generator_arch", obj.get("generator_arch"))
        if arch is None:
            raise DelegatorError(f"{path}: was saved from a custom generator_arch; pass the same callable as "
                                 "generator_arch=")
        for key in ("input_shape", "mean", "std", "latent_dim"):
            kwargs.setdefault(key, obj.get(key))
        synth = cls(teacher, generator_arch=arch, **kwargs)
        try:
            synth.load_state_dict(state)
        except RuntimeError as e:
            raise DelegatorError(f"{path}: the weights do not fit generator_arch {arch!r}: {e}") from e
        return synth

    # -- training -----------------------------------------------------------------------------------
    def fit(
        self,
        iterations: int,
        *,
        batch_size: int = 256,
        generator: int | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        log_every: int = 50,
        progress: bool = True,
        callback: Callable[[int, nn.Module | None], None] | None = None,
        callback_every: int | None = None,
    ) -> FitResult:
        """Trains the delegator for ``iterations`` explore steps (each after ``imitate_steps`` student steps).

        A delegator given or trained before is trained further (SKD's fine-tuning across tasks); the
        student is created afresh for each call (a re-initialised clone of the current teacher).

        Args:
            iterations: explore steps, >= 1.
            batch_size: samples per step (SKD: 256 on CIFAR).
            generator: an int seed (None: the checkpoint's when resuming, else drawn from torch's global
                generator): the delegator's initialisation when it is built here, the student's, and every
                latent batch.
            checkpoint: a file: the whole training state is written there atomically every
                ``checkpoint_every`` iterations and at the end; calling ``fit`` again with the same
                arguments resumes from it (after a kill, the result equals an uninterrupted run's).
            log_every: iterations per entry of the returned history.
            progress: a progress bar with the latest loss terms.
            callback: called as ``callback(done, student)`` after every ``callback_every``-th step of this call
                and after the last one (``done``: explore steps done, a resumed run's included; ``student``: the
                student being trained, None for presets without one), before that step's checkpoint is written:
                with a ``checkpoint``, one is written after every callback too, so that what a callback keeps is
                never more than one call ahead of the checkpoint a resumed fit starts from.
                DAFL's and DFAD's public code score their student every epoch and keep the best one; a callback
                that scores it on held-out images does the same without the test set. The student is put back in
                training mode after the call; the callback must not change its weights.
            callback_every: steps between callbacks, >= 1 (None: ``log_every``).
        """
        owner = "GenerativeSynthesizer.fit"
        iterations = check_int(iterations, "iterations", owner, low=1)
        batch_size = check_int(batch_size, "batch_size", owner, low=2)  # BN needs two samples
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every", owner, low=1)
        log_every = check_int(log_every, "log_every", owner, low=1)
        if callback is not None and not callable(callback):
            raise TypeError(f"{owner}: callback must be callable as callback(done, student) or None; "
                            f"got {type(callback).__name__}")
        callback_every = log_every if callback_every is None else check_int(callback_every, "callback_every", owner,
                                                                              low=1)
        stored = None
        if checkpoint is not None and os.path.exists(os.fspath(checkpoint)):
            stored = _FitState.read(checkpoint)
        if generator is not None:
            seed = check_int(generator, "generator (a seed)", owner, low=0) & SEED_MAX
        elif stored is not None:
            seed = _FitState.stored_seed(stored, checkpoint)  # resuming without a seed: the interrupted run's
        else:
            seed = int(torch.randint(0, SEED_MAX, (1,)).item())
        job = {"iterations": iterations, "batch_size": batch_size, "seed": seed, "preset": self.preset,
               "weights": dict(self.weights), "imitate_steps": self.imitate_steps,
               "student_explore": self.student_explore, "lr_generator": self.lr_generator,
               "lr_student": self.lr_student, "lr_decay_every": self.lr_decay_every,
               "student_kd": self.student_kd, "generator_betas": list(self.generator_betas),
               "student_optimizer": self.student_optimizer, "student_weight_decay": self.student_weight_decay,
               "teacher": teacher_fingerprint(self.teacher)}
        if self.feature_layer is not None:  # keyed only when set: checkpoints made before the option still resume
            job["feature_layer"] = self.feature_layer
        if self.precision != "fp32":  # likewise
            job["precision"] = self.precision
        state = _FitState.start(self, seed, job, stored, checkpoint)
        bar = Progress(iterations, f"{self.preset} fit", progress)
        bar.update(state.done)
        window: dict[str, list[float]] = {}
        try:
            with self._fit_session(state):
                segment = None
                if state.done < iterations:  # this call's share of the steps, and the threads it ran them on
                    segment = {"steps": 0, "seconds": 0.0, "threads": torch.get_num_threads(),
                               "device": str(self.device)}
                    state.segments.append(segment)
                tick = time.perf_counter()
                while state.done < iterations:
                    terms = self._iteration(state, batch_size)
                    state.done += 1
                    tock = time.perf_counter()
                    if state.seconds is not None:
                        state.seconds += tock - tick
                    segment["steps"] += 1
                    segment["seconds"] += tock - tick
                    tick = tock
                    for k, v in terms.items():
                        window.setdefault(k, []).append(v)
                    if state.done % log_every == 0 or state.done == iterations:
                        means = {k: sum(v) / len(v) for k, v in window.items()}
                        for k, v in means.items():
                            state.history.setdefault(k, []).append(v)
                        window.clear()
                        bar.update(0, {k: means[k] for k in ("explore", "imitate") if k in means})
                    bar.update(1)
                    called = callback is not None and (state.done % callback_every == 0 or state.done == iterations)
                    if called:
                        callback(state.done, state.student)
                        if state.student is not None:
                            state.student.train()
                    if checkpoint is not None and (called or state.done % checkpoint_every == 0
                                                   or state.done == iterations):
                        state.save(checkpoint)
        finally:
            bar.close()
        student = state.student
        if student is not None:
            student.eval()
        return FitResult(student=student, history=state.history, iterations=state.done, seconds=state.seconds,
                         segments=[dict(seg) for seg in state.segments])

    @contextlib.contextmanager
    def _fit_session(self, state: _FitState):
        """Teacher frozen in eval mode (flags restored on exit), feature taps, fast CPU layers."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(frozen(self.teacher))
            if self.device.type == "cpu":
                stack.enter_context(fast_layers(self.teacher, state.student))
            # Entered around each explore step's teacher forward only: the imitate steps' no-grad forwards
            # have no use for BN terms.
            state.matcher = (BNStatsMatcher(self.teacher, form="l2", allow_empty=True) if self.weights["bn"] > 0
                             else None)
            state.t_tap = stack.enter_context(FeatureTap(self.teacher, layer=self.feature_layer,
                                                         owner="GenerativeSynthesizer", arg="feature_layer"))
            if state.student is not None and self.weights["imitation"] > 0:  # only ψ reads the student's
                state.s_tap = stack.enter_context(FeatureTap(state.student, layer=self.feature_layer,
                                                             owner="GenerativeSynthesizer (student)",
                                                             arg="feature_layer"))
            yield

    def _amp(self):
        """The networks' autocast in a fit (``precision``), else nothing."""
        return autocast_to(self.device.type, FIT_PRECISIONS[self.precision])

    def _latent(self, state: _FitState, n: int) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=state.z_gen).to(self.device)

    def _discrepancy(self, state: _FitState, t_logits, s_logits, *, unweighted: bool = False) -> torch.Tensor:
        """ψ on the tapped features (weight ``imitation``) + L1 of the logits (weight ``adversarial``);
        ``unweighted``: the terms in use at weight 1 (the student's imitate loss)."""
        w = self.weights
        total = s_logits.new_zeros(())
        if w["imitation"] > 0:
            psi = feature_cosine_discrepancy(state.t_tap.features.float(), state.s_tap.features.float())
            total = total + (psi if unweighted else w["imitation"] * psi)
        if w["adversarial"] > 0:
            l1 = logit_l1(t_logits, s_logits)
            total = total + (l1 if unweighted else w["adversarial"] * l1)
        return total

    def _iteration(self, state: _FitState, batch_size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if state.student is not None:
            for _ in range(self.imitate_steps):
                out["imitate"] = self._imitate(state, batch_size)
        out.update(self._explore(state, batch_size))
        if self.lr_decay_every is not None and (state.done + 1) % self.lr_decay_every == 0:
            for opt in (state.opt_g, state.opt_s):
                for group in (opt.param_groups if opt is not None else ()):
                    group["lr"] /= 10.0
        return out

    def _imitate(self, state: _FitState, batch_size: int) -> float:
        """One student step on the discrepancy to the teacher, on fresh samples of the fixed delegator."""
        D, T, S = self.delegator, self.teacher, state.student
        D.train()
        S.train()
        with torch.no_grad(), self._amp():
            x = D(self._latent(state, batch_size))
            t_logits = T(x).float()
        with self._amp():
            s_logits = S(x).float()
        loss = self._discrepancy(state, t_logits, s_logits, unweighted=True)
        state.opt_s.zero_grad(set_to_none=True)
        loss.backward()
        state.opt_s.step()
        return float(loss.detach())

    def _explore(self, state: _FitState, batch_size: int) -> dict[str, float]:
        """One delegator step on the explore loss (and a student step on it with ``student_explore='explore'``)."""
        D, T, S = self.delegator, self.teacher, state.student
        D.train()
        with self._amp():
            x = D(self._latent(state, batch_size))
        with state.matcher if state.matcher is not None else contextlib.nullcontext(), self._amp():
            t_logits = T(x)
        t_logits = t_logits.float()
        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if S is not None and self.uses_student:
            S.train()
            with self._amp():
                s_logits = S(x)
            terms["discrepancy"] = -self._discrepancy(state, t_logits, s_logits.float())
        if w["category"] > 0:
            terms["category"] = w["category"] * category_loss(t_logits)
        if w["diversity"] > 0:
            terms["diversity"] = w["diversity"] * diversity_loss(t_logits)
        if w["activation"] > 0:
            terms["activation"] = w["activation"] * activation_loss(state.t_tap.features.float())
        if w["bn"] > 0 and state.matcher is not None and state.matcher.layers:
            terms["bn"] = w["bn"] * state.matcher.loss()
        total = sum(terms.values())
        state.opt_g.zero_grad(set_to_none=True)
        if state.opt_s is not None:
            state.opt_s.zero_grad(set_to_none=True)
        total.backward()
        state.opt_g.step()
        if state.opt_s is not None and self.student_explore == "explore":
            state.opt_s.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        if S is not None and self.student_kd:  # DAFL's student, distilled beside the generator on its samples
            S.train()
            with self._amp():
                s_logits = S(x.detach())
            kd = kd_loss(s_logits.float(), t_logits.detach(), temperature=self.student_kd)
            state.opt_s.zero_grad(set_to_none=True)
            kd.backward()
            state.opt_s.step()
            out["kd"] = float(kd.detach())
        out["explore"] = float(total.detach())
        out["teacher_confidence"] = float(torch.softmax(t_logits.detach(), 1).amax(1).mean())
        return out

    # -- sampling ---------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | int | None = None) -> torch.Tensor:
        """``n`` fresh inputs of the delegator, unlabelled: one forward of ``n`` latents drawn on the CPU from
        ``generator`` (a ``torch.Generator``, an int seed, or None: torch's global one), in eval mode, without
        gradients, on the synthesizer's device. ``distill(student, synth.sample, teacher=..., iterations=...)``
        trains a student on new samples at every step (DAFL's and DFAD's students), where :meth:`synthesize`
        makes a fixed, class-balanced set."""
        n = check_int(n, "n", "GenerativeSynthesizer.sample", low=1)
        z = torch.randn(n, self.latent_dim, generator=cpu_generator(generator, "GenerativeSynthesizer.sample"))
        with torch.no_grad(), eval_mode(self.delegator):
            return self.delegator(z.to(self.device)).float()

    def _labels(self, n, classes):
        labels, given = super()._labels(n, classes)
        self._job_classes = list(range(self.num_classes)) if given is None else given
        return labels, given

    @torch.no_grad()
    def _draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.sample(n, generator)
        return x, self.teacher(x)

    def _synthesize_batch(self, labels, *, iterations, generator, offset, progress) -> SyntheticBatch:
        classes = torch.tensor(self._job_classes, dtype=torch.int64, device=self.device)
        with eval_mode(self.delegator), eval_mode(self.teacher), contextlib.ExitStack() as stack:
            if self.device.type == "cpu":
                stack.enter_context(fast_layers(self.teacher))
            if not self.balance:
                x, logits = self._draw(labels.numel(), generator)
                y = classes[logits[:, classes].argmax(1)]
                progress(1, None)
                return SyntheticBatch(x.float(), y, None, {"acceptance": torch.ones(1)}, self.mean, self.std)
            need = torch.bincount(labels, minlength=self.num_classes).tolist()
            parts_x: list[torch.Tensor] = []
            parts_y: list[torch.Tensor] = []
            drawn, limit = 0, self.max_draw_factor * labels.numel()
            while any(need) and drawn < limit:
                # A quarter more than is still missing: a generator that covers the classes evenly fills most
                # of them in one draw, and the rest in a small second one.
                chunk = max(sum(need) + sum(need) // 4, 64)
                x, logits = self._draw(chunk, generator)
                drawn += chunk
                pred = logits.argmax(1)
                for c in (c for c in range(self.num_classes) if need[c]):
                    rows = (pred == c).nonzero().flatten()[:need[c]]
                    if rows.numel():
                        parts_x.append(x[rows])
                        parts_y.append(pred[rows])
                        need[c] -= rows.numel()
        if any(need):
            short = {c: k for c, k in enumerate(need) if k}
            raise RuntimeError(f"GenerativeSynthesizer: after {drawn} draws the teacher had not labelled enough "
                               f"samples as class(es) {sorted(short)} (missing {short}); train the delegator longer "
                               "(fit), raise max_draw_factor, or pass balance=False to keep every draw with the "
                               "teacher's label")
        x, y = torch.cat(parts_x), torch.cat(parts_y)
        order = _interleave(y, labels)
        progress(1, None)
        losses = {"acceptance": torch.tensor([labels.numel() / drawn], dtype=torch.float32)}
        return SyntheticBatch(x[order].float(), y[order], None, losses, self.mean, self.std)


def _interleave(y: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The permutation of ``y`` (a multiset equal to ``labels``'s) that puts its rows in ``labels``'s order."""
    order_y = torch.argsort(y, stable=True)
    order_l = torch.argsort(labels, stable=True)
    perm = torch.empty_like(order_y)
    perm[order_l] = order_y
    return perm


class _FitState:
    """Everything :meth:`GenerativeSynthesizer.fit` carries across iterations and checkpoints."""

    def __init__(self) -> None:
        self.done = 0
        self.seconds: float | None = 0.0  # wall seconds of the steps done (None: a resumed checkpoint without it)
        self.segments: list[dict[str, Any]] = []  # one per call that did steps (FitResult.segments)
        self.history: dict[str, list[float]] = {}
        self.delegator: nn.Module | None = None
        self.student: nn.Module | None = None
        self.opt_g: torch.optim.Optimizer | None = None
        self.opt_s: torch.optim.Optimizer | None = None
        self.z_gen = torch.Generator()
        self.job: dict[str, Any] = {}
        self.matcher = None
        self.t_tap: FeatureTap | None = None
        self.s_tap: FeatureTap | None = None

    @classmethod
    def start(cls, synth: GenerativeSynthesizer, seed: int, job: dict[str, Any], stored: dict[str, Any] | None,
              path) -> _FitState:
        """A fresh state for ``job``, or the one ``stored`` (a checkpoint read from ``path``) holds."""
        st = cls()
        st.job = job
        if synth._delegator is None:
            synth._delegator = synth._build_delegator(derive_seed("exml_fast.generative.delegator", seed))
        st.delegator = synth.delegator
        if synth.uses_student or (synth.student_kd and synth._student_given is not None):
            st.student = (synth._student_given if synth._student_given is not None else
                          reinitialised_clone(synth.teacher, derive_seed("exml_fast.generative.student", seed)))
            st.student = st.student.to(synth.device).train()
            if synth.student_optimizer == "sgd":
                st.opt_s = torch.optim.SGD(st.student.parameters(), lr=synth.lr_student, momentum=0.9,
                                           weight_decay=synth.student_weight_decay)
            else:
                st.opt_s = torch.optim.Adam(st.student.parameters(), lr=synth.lr_student,
                                            weight_decay=synth.student_weight_decay)
        st.opt_g = torch.optim.Adam(synth.delegator.parameters(), lr=synth.lr_generator, betas=synth.generator_betas)
        st.z_gen.manual_seed(derive_seed("exml_fast.generative.latent", seed))
        if stored is not None:
            st._resume(synth, stored, path)
        return st

    def save(self, path) -> None:
        payload = {
            "format": FIT_FORMAT, "version": VERSION, "job": self.job, "done": self.done, "seconds": self.seconds,
            "segments": self.segments, "history": self.history,
            "z_gen": self.z_gen.get_state(),
            "delegator": _cpu_state(self.delegator.state_dict()),
            "opt_g": self.opt_g.state_dict(),
            "student": None if self.student is None else _cpu_state(self.student.state_dict()),
            "opt_s": None if self.opt_s is None else self.opt_s.state_dict(),
        }
        atomic_write(path, lambda f: torch.save(payload, f))

    @staticmethod
    def read(path) -> dict[str, Any]:
        path = os.fspath(path)
        obj = load_torch_file(path, what="fit checkpoint", error=DelegatorError)
        if not isinstance(obj, dict) or obj.get("format") != FIT_FORMAT or obj.get("version") != VERSION:
            raise DelegatorError(f"{path}: not an exml_fast delegator fit checkpoint (format {FIT_FORMAT!r}, "
                                 f"version {VERSION})")
        return obj

    @staticmethod
    def stored_seed(stored: dict[str, Any], path) -> int:
        seed = (stored.get("job") or {}).get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DelegatorError(f"{os.fspath(path)}: a fit checkpoint without its seed")
        return seed

    def _resume(self, synth: GenerativeSynthesizer, obj: dict[str, Any], path) -> None:
        path = os.fspath(path)
        if obj.get("job") != self.job:
            diff = sorted(k for k in set(self.job) | set(obj.get("job") or {})
                          if (obj.get("job") or {}).get(k) != self.job.get(k))
            raise DelegatorError(f"{path}: was written by a fit with other settings (differing: {diff}); "
                                 "use another checkpoint path or delete it to start over")
        try:
            synth.delegator.load_state_dict(obj["delegator"], strict=True)
            self.opt_g.load_state_dict(obj["opt_g"])
            if self.student is not None:
                self.student.load_state_dict(obj["student"], strict=True)
                self.opt_s.load_state_dict(obj["opt_s"])
            self.z_gen.set_state(obj["z_gen"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise DelegatorError(f"{path}: a fit checkpoint that does not fit this synthesizer: {e}") from e
        self.done = int(obj["done"])
        seconds = obj.get("seconds")  # absent from checkpoints written before fits were timed
        self.seconds = None if seconds is None else float(seconds)
        segments = obj.get("segments")
        if segments is None:  # a checkpoint written before segments were recorded: its steps in one, threads unknown
            segments = [{"steps": self.done, "seconds": self.seconds, "threads": None, "device": None}] \
                if self.done else []
        # the steps after the last checkpoint of an interrupted call were lost: its segment keeps the saved ones
        if not (isinstance(segments, list) and all(isinstance(seg, dict) and isinstance(seg.get("steps"), int)
                                                   for seg in segments)
                and sum(seg["steps"] for seg in segments) == self.done):
            raise DelegatorError(f"{path}: its 'segments' are not a list of per-call records whose steps add up "
                                 f"to its {self.done} done steps; delete it to start over")
        self.segments = [dict(seg) for seg in segments]
        self.history = {k: list(v) for k, v in (obj.get("history") or {}).items()}


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in state.items()}

