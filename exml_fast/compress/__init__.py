"""Compressing a trained network without its data (``exml_fast.compress``).

- :func:`synthetic_images`: the inputs the calls below calibrate, score and distil on (DeepInversion, ZeroQ's
  distilled data, noise, or any :class:`~exml_fast.synth.Synthesizer`).
"""

from exml_fast.compress.calibration import (
    CALIBRATION_METHODS,
    ZEROQ_SETTINGS,
    check_classifier,
    has_batchnorm,
    synthetic_images,
)

__all__ = ["CALIBRATION_METHODS", "ZEROQ_SETTINGS", "check_classifier", "has_batchnorm", "synthetic_images"]
