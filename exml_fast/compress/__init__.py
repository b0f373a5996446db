"""Compressing a trained network without its data (``exml_fast.compress``).

- :func:`synthetic_images`: the inputs the calls below calibrate, score and distil on (DeepInversion, ZeroQ's
  distilled data, noise, or any :class:`~exml_fast.synth.Synthesizer`).
- :func:`prune_without_data`: structured (channel) pruning to a FLOPs budget, channels scored by first-order
  Taylor importance or BatchNorm scale on those inputs, then distilled from the unpruned network
  (:class:`PruneResult`; needs Torch-Pruning).
"""

from exml_fast.compress.calibration import (
    CALIBRATION_METHODS,
    ZEROQ_SETTINGS,
    check_classifier,
    has_batchnorm,
    synthetic_images,
)
from exml_fast.compress.prune import PRUNE_IMPORTANCES, PRUNE_STEPS, PruneResult, logits_layer, prune_without_data

__all__ = ["CALIBRATION_METHODS", "PRUNE_IMPORTANCES", "PRUNE_STEPS", "ZEROQ_SETTINGS", "PruneResult",
           "check_classifier", "has_batchnorm", "logits_layer", "prune_without_data", "synthetic_images"]
