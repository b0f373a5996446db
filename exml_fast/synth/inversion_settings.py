"""The settings of the optimisation-based synthesizers (:class:`~exml_fast.synth.ModelInversion`,
:class:`~exml_fast.synth.DeepInversion`, :class:`~exml_fast.synth.DataImpressions`) as one dataclass.

Every field is also a keyword of those constructors, as it always was; a :class:`InversionSettings` passed as
``settings=`` gives the fields it sets, and keywords passed beside it win over it. A field left unset keeps the
synthesizer's own default (its preset's, for DeepInversion), so ``InversionSettings(lr=0.1)`` changes the
learning rate and nothing else::

    fast = InversionSettings(iterations=200, precision="bf16", stop_when="converged")
    di = DeepInversion(teacher, input_shape=(3, 32, 32), settings=fast)
    mi = ModelInversion(teacher, input_shape=(1, 32, 32), settings=fast, lr=0.05)   # the keyword wins

The values are checked by the synthesizer that takes them (with errors naming it and the argument); the
dataclass itself only refuses unknown names (a TypeError, as a misspelt keyword does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["ENGINE_DEFAULTS", "InversionSettings", "UNSET", "merge_settings"]


class _Unset:
    """The default of every :class:`InversionSettings` field: "not set, keep the synthesizer's default"."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __reduce__(self):
        return (_Unset, ())


#: The value of a field that was not set.
UNSET: Any = _Unset()


@dataclasses.dataclass(frozen=True, repr=False)
class InversionSettings:
    """Settings of the inversion engine; see :class:`~exml_fast.synth.DeepInversion` for the full story of each.

    Fields left :data:`UNSET` keep the synthesizer's (or its preset's) default.
    """

    # -- the job --------------------------------------------------------------------------------------------
    iterations: int = UNSET
    """Optimisation steps per batch (the default of :meth:`synthesize`)."""
    batch_size: int = UNSET
    """Images optimised together (the default of :meth:`synthesize`)."""

    # -- the optimiser ----------------------------------------------------------------------------------------
    lr: float = UNSET
    """Adam's learning rate (> 0)."""
    betas: tuple[float, float] = UNSET
    """Adam's betas, two numbers in [0, 1); engine default (0.9, 0.999)."""
    adam_eps: float = UNSET
    """Adam's epsilon (> 0); default 1e-8."""
    schedule: str = UNSET
    """Learning-rate schedule after the warm-up: "cosine" (the engine's default) or "constant"."""
    warmup: float = UNSET
    """Fraction of the iterations of linear warm-up, in [0, 1); default 0."""
    temperature: float = UNSET
    """τ of the main cross-entropy (> 0); default 1."""
    init_std: float = UNSET
    """The inputs start as N(0, init_std²) (> 0); default 1."""
    clip: bool = UNSET
    """Clip the inputs to the normalised image of [0, 1] after each step (needs mean/std); default True."""
    keep_best: bool = UNSET
    """Return the batch with the lowest total loss seen (else the last one); default True."""
    multi_resolution: tuple[float, float] | None = UNSET
    """(scale, fraction): the first ``fraction`` of the steps at ``scale`` x the resolution; None (default): off."""

    # -- the BatchNorm-statistic term -------------------------------------------------------------------------
    bn_weight: float = UNSET
    """Weight of the BN-statistic term (>= 0; ModelInversion also takes "auto"); engine default 0."""
    first_bn_multiplier: float = UNSET
    """Extra weight of the first BN layer's term; default 1."""
    bn_form: str = UNSET
    """The BN term's form: "l2" (DeepInversion, the engine's default), "mse" or "sq_std" (the ExML paper's)."""

    # -- image priors -----------------------------------------------------------------------------------------
    tv_l1_weight: float = UNSET
    """Weight of the total variation, L1 form (>= 0); default 0."""
    tv_l2_weight: float = UNSET
    """Weight of the total variation, L2 form (>= 0); default 0."""
    blur_weight: float = UNSET
    """Weight of the blur prior ‖x − G∗x‖² (>= 0); default 0."""
    l2_weight: float = UNSET
    """Weight of ‖x‖₂ over the batch (>= 0); default 0."""
    l2_sq_weight: float = UNSET
    """Weight of ‖x‖² per image (>= 0); default 0."""
    blur_kernel_size: int = UNSET
    """The blur prior's Gaussian: 3 (default) or 7 pixels."""
    blur_sigma: float | None = UNSET
    """The blur Gaussian's sigma (> 0); None (default): 0.8 for 3, 1.0 for 7."""
    blur_per_sample_norm: bool = UNSET
    """The blur prior as the per-image non-squared norm (the ExML reference code's form); default False."""

    # -- augmentation -----------------------------------------------------------------------------------------
    jitter: int | None = UNSET
    """Largest random roll in pixels (>= 0); None (default): 2 up to 64 px, else 30·H/224."""
    flip: bool = UNSET
    """Random horizontal flips; engine default True (the synthesizers' own: off)."""
    pad_crop: int = UNSET
    """Random-crop padding in pixels (>= 0); default 0."""
    augment_per: str = UNSET
    """Draw the augmentation per "sample" (default) or once per "batch"."""

    # -- Adaptive DeepInversion -------------------------------------------------------------------------------
    competitor: nn.Module | None = UNSET
    """A student network to compete with (Adaptive DeepInversion); None (default): none."""
    competition_weight: float = UNSET
    """Weight of the competition term (>= 0; > 0 with a competitor)."""
    competition_temperature: float = UNSET
    """Softmax temperature of the competition term (> 0); default 3."""
    competition_clamp: tuple[float, float] = UNSET
    """(low, high) the probabilities are clamped to, 0 <= low < high <= 1; default (0.01, 0.99)."""
    competition_form: str = UNSET
    """"js" (default, the Jensen-Shannon divergence) or "public" (the public code's form)."""

    # -- speed ------------------------------------------------------------------------------------------------
    precision: str = UNSET
    """Autocast precision of the networks: "fp32" (default), "bf16" or "fp16"."""
    channels_last: bool | None = UNSET
    """Run the networks in channels_last; None (default): picked from the teacher and the device."""
    cuda_graph: bool | None = UNSET
    """Capture the step in a CUDA graph; None (default): on CUDA without ``compile``."""
    compile: bool | dict = UNSET
    """torch.compile the loss: True, or a dict of torch.compile arguments; default False."""
    log_every: int | None = UNSET
    """Steps between progress-bar refreshes (>= 1); None (default): about 20 per batch."""

    # -- stopping and warnings --------------------------------------------------------------------------------
    stop_when: str | Callable[[int, dict[str, float]], bool] | None = UNSET
    """Stop a batch early: None (default), "converged", or a callable (step, terms) -> bool."""
    stop_agreement: float = UNSET
    """"converged": the teacher agreement to reach, in [0, 1]; default 0.95."""
    stop_patience: int | None = UNSET
    """"converged": steps without progress before stopping (>= 1); None (default): picked from iterations."""
    stop_tol: float = UNSET
    """"converged": the relative loss change counted as no progress; default 0.01."""
    warn_below: float | None = UNSET
    """Warn (once) when the teacher agrees with less than this fraction of a batch, in (0, 1]; default 0.9;
    None: never."""

    def given(self) -> dict[str, Any]:
        """The fields that were set, by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not UNSET}

    def __repr__(self) -> str:
        return f"InversionSettings({', '.join(f'{k}={v!r}' for k, v in self.given().items())})"


#: The field names, in declaration order.
FIELDS = tuple(f.name for f in dataclasses.fields(InversionSettings))

#: The engine's defaults: what a field is when neither the caller nor the synthesizer sets it. ``iterations``,
#: ``batch_size`` and ``lr`` have none (every synthesizer gives its own).
ENGINE_DEFAULTS: dict[str, Any] = {
    "betas": (0.9, 0.999), "adam_eps": 1e-8, "schedule": "cosine", "warmup": 0.0, "temperature": 1.0,
    "init_std": 1.0, "clip": True, "keep_best": True, "multi_resolution": None,
    "bn_weight": 0.0, "first_bn_multiplier": 1.0, "bn_form": "l2",
    "tv_l1_weight": 0.0, "tv_l2_weight": 0.0, "blur_weight": 0.0, "l2_weight": 0.0, "l2_sq_weight": 0.0,
    "blur_kernel_size": 3, "blur_sigma": None, "blur_per_sample_norm": False,
    "jitter": None, "flip": True, "pad_crop": 0, "augment_per": "sample",
    "competitor": None, "competition_weight": 0.0, "competition_temperature": 3.0,
    "competition_clamp": (0.01, 0.99), "competition_form": "js",
    "precision": "fp32", "channels_last": None, "cuda_graph": None, "compile": False, "log_every": None,
    "stop_when": None, "stop_agreement": 0.95, "stop_patience": None, "stop_tol": 0.01, "warn_below": 0.9,
}


def merge_settings(settings: InversionSettings | None, keywords: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The settings a constructor was given: the fields ``settings`` sets, then ``keywords`` over them.

    Raises:
        TypeError: ``settings`` is not an InversionSettings (or None).
    """
    if settings is None:
        return dict(keywords)
    if not isinstance(settings, InversionSettings):
        raise TypeError(f"{owner}: settings must be an InversionSettings or None; got {type(settings).__name__}")
    return {**settings.given(), **keywords}


def check_names(options: Mapping[str, Any], owner: str, *, allowed: tuple[str, ...] = ()) -> None:
    """TypeError naming the first keyword in ``options`` that is neither a field nor in ``allowed`` (what Python
    says of an unexpected keyword argument)."""
    for name in options:
        if name not in FIELDS and name not in allowed:
            raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {name!r} (the settings are "
                            f"the fields of exml_fast.synth.InversionSettings)")
