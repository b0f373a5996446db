"""Data-free synthesis: labelled inputs from a trained classifier alone.

Three lines with any classifier::

    from exml_fast.synth import DeepInversion
    synth = DeepInversion(teacher, input_shape=(3, 32, 32), mean=MEAN, std=STD)
    batch = synth.synthesize(256, iterations=2000)        # batch.x, batch.y

- :class:`ModelInversion` — CE at temperature τ plus image priors.
- :class:`DeepInversion` — BN-statistic matching, TV/l2 priors, jitter and
  flips, Adam, best-batch selection, multi-resolution, Adaptive DeepInversion
  with ``competitor=student``; settings from a preset: ``"auto"`` (picked from
  the teacher: the default), ``"cifar"``, ``"imagenet"``, ``"digits"``
  (:data:`DEEPINVERSION_PRESETS`).
- :class:`DataImpressions` — Dirichlet soft targets from the classifier's weights.
- :class:`AuxiliaryData` — samples of another dataset labelled by the teacher.
- :class:`GenerativeSynthesizer` — a generator network trained against the teacher (SKD's knowledge
  delegator, DAFL, DFAD presets), then sampled in one forward pass per batch.

When the teacher labels less than ``warn_below`` (0.9) of a batch as its
targets, the synthesizer warns once (:class:`LowAgreementWarning`, with the
weighted loss terms and which one dominated). Every synthesizer returns a
:class:`SyntheticBatch`; ``synthesize_iter``
streams one per optimisation batch and ``save_to=`` writes resumable shards
(:func:`load_synthetic` reads them back).

The three optimisation-based synthesizers take their settings as keywords or
as one :class:`InversionSettings` (``settings=``), keywords winning.
"""

from exml_fast.synth.agreement import LowAgreementWarning
from exml_fast.synth.auxiliary import AuxiliaryData
from exml_fast.synth.base import Synthesizer
from exml_fast.synth.batch import SyntheticBatch, load_synthetic
from exml_fast.synth.generative import GENERATIVE_PRESETS, DelegatorError, FitResult, GenerativeSynthesizer
from exml_fast.synth.inversion import (DATA_IMPRESSIONS_BETA, DEEPINVERSION_PRESETS, DataImpressions, DeepInversion,
                                       ModelInversion, lr_table)
from exml_fast.synth.inversion_settings import InversionSettings

__all__ = ["DATA_IMPRESSIONS_BETA", "DEEPINVERSION_PRESETS", "GENERATIVE_PRESETS", "AuxiliaryData",
           "DataImpressions", "DeepInversion", "DelegatorError", "FitResult", "GenerativeSynthesizer",
           "InversionSettings", "LowAgreementWarning", "ModelInversion", "SyntheticBatch", "Synthesizer",
           "load_synthetic", "lr_table"]
