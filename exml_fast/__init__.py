"""exml_fast: fused CPU/CUDA kernels for learning from trained models instead of data.

Public entry points:
    exml_fast.ops            fused ops (bn_stats, bn_stats_loss, ...)
    exml_fast.reference      pure-PyTorch twins of every op
    exml_fast.BNStatsMatcher BatchNorm-statistic matching for any model
    exml_fast.synth          data-free synthesizers (DeepInversion, ModelInversion,
                             DataImpressions, AuxiliaryData), also exported here
    exml_fast.save_grid      a PNG grid of a SyntheticBatch
    exml_fast.save_model / load_model   checksummed model checkpoints
    exml-fast (command line) train-teacher, synthesize
    exml_fast.has_ops()      whether the compiled library loaded
    exml_fast.build_info()   how it was built
"""

from exml_fast._ext import build_info, has_ops
from exml_fast import ops, reference
from exml_fast.matcher import BNStatsMatcher
from exml_fast import synth
from exml_fast.checkpoint import ModelInfo, load_model, save_model
from exml_fast.synth import (AuxiliaryData, DataImpressions, DeepInversion, ModelInversion, SyntheticBatch,
                             load_synthetic)
from exml_fast.training import distill
from exml_fast.viz import save_grid

__version__ = "0.1.0"

__all__ = ["AuxiliaryData", "BNStatsMatcher", "DataImpressions", "DeepInversion", "ModelInfo", "ModelInversion",
           "SyntheticBatch", "build_info", "distill", "has_ops", "load_model", "load_synthetic", "ops", "reference",
           "save_grid", "save_model", "synth", "__version__"]
