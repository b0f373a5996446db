"""Compressing a trained network without its data (``exml_fast.compress``).

- :func:`quantize_without_data`: int8 post-training quantisation (torchao's PT2E for x86, or torch.ao's FX flow)
  calibrated on synthetic images;
- :func:`prune_without_data`: structured (channel) pruning to a FLOPs budget, channels scored by first-order
  Taylor importance or BatchNorm scale on synthetic images, then distilled from the unpruned network
  (:class:`PruneResult`; needs Torch-Pruning);
- :func:`distill_without_data`: a smaller student trained on the teacher's synthetic images;
- :func:`synthetic_images`: the inputs these calls calibrate, score and distil on (DeepInversion, ZeroQ's
  distilled data, Data Impressions, model inversion, noise, or any :class:`~exml_fast.synth.Synthesizer`);
- :func:`compress_file`: the ``exml-fast compress`` jobs on a saved model (resumable, with a report);
  :func:`save_exported` / :func:`load_exported`: the ``.pt2`` files quantised and pruned models are kept in.
"""

from exml_fast.compress.calibration import (
    BN_MATCHING_METHODS,
    CALIBRATION_METHODS,
    ZEROQ_SETTINGS,
    check_classifier,
    has_batchnorm,
    synthetic_images,
)
from exml_fast.compress.distill import DISTILL_DEFAULTS, DistillResult, distill_without_data
from exml_fast.compress.job import ACTIONS, TEST_SETS, compress_file
from exml_fast.compress.prune import (PRUNE_IMPORTANCES, PRUNE_STEPS, PruneResult, batchnorm_features, logits_layer,
                                      prune_without_data)
from exml_fast.compress.quantize import QUANTIZE_FLOWS, QuantizeResult, quantize_without_data
from exml_fast.compress.report import file_size, latency_ms, load_exported, save_exported

__all__ = [
    "ACTIONS", "BN_MATCHING_METHODS", "CALIBRATION_METHODS", "DISTILL_DEFAULTS", "PRUNE_IMPORTANCES", "PRUNE_STEPS",
    "QUANTIZE_FLOWS", "TEST_SETS", "ZEROQ_SETTINGS", "DistillResult", "PruneResult", "QuantizeResult",
    "batchnorm_features", "check_classifier", "compress_file", "distill_without_data", "file_size", "has_batchnorm",
    "latency_ms", "load_exported", "logits_layer", "prune_without_data", "quantize_without_data", "save_exported",
    "synthetic_images",
]
