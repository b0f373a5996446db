"""exml_fast: fused CPU/CUDA kernels for learning from trained models instead of data.

Public entry points:
    exml_fast.ops            fused ops (bn_stats, bn_stats_loss, ...)
    exml_fast.reference      pure-PyTorch twins of every op
    exml_fast.BNStatsMatcher BatchNorm-statistic matching for any model
    exml_fast.synth          data-free synthesizers (DeepInversion, ModelInversion,
                             DataImpressions, AuxiliaryData, GenerativeSynthesizer), also exported here
    exml_fast.save_grid      a PNG grid of a SyntheticBatch
    exml_fast.save_model / load_model   checksummed model checkpoints
    Ex-Model Continual Learning:
      exml_fast.Expert, ExpertStream       trained experts on disk, checksummed, loaded lazily
      exml_fast.make_scenario, train_experts   Split/Joint MNIST, Fashion-MNIST, CIFAR-10 (+ MT)
      exml_fast.SyntheticBuffer            the fixed-size class-balanced buffer (N/i rule)
      exml_fast.ExModelDistillation (source=...), SynthesizerSource, RealReplay, OracleEnsemble,
      EnsembleAverage, MinEntropyEnsemble, ParameterAverage   the strategies (register_strategy adds one)
      exml_fast.run_stream, StreamResult   the run loop (checkpoint/resume) and its metrics
    Class-incremental learning from data (same run loop, stream=None):
      exml_fast.FineTune, Joint, LwF, ICaRL, DeepInversionCIL, SyntheticExemplars, SKDCIL
    exml-fast (command line) train-teacher, synthesize, train-experts, run, report, demo
    exml_fast.has_ops()      whether the compiled library loaded
    exml_fast.build_info()   how it was built
"""

from exml_fast import ops, reference, synth
from exml_fast._ext import build_info, has_ops
from exml_fast.checkpoint import ModelInfo, load_model, save_model
from exml_fast.cl.buffer import SyntheticBuffer
from exml_fast.cl.engine import run_stream
from exml_fast.cl.experts import Expert, ExpertError, ExpertStream
from exml_fast.cl.metrics import StreamResult, summary_table
from exml_fast.cl.scenarios import SCENARIOS, Experience, Scenario, make_scenario, train_experts
from exml_fast.cl.strategies import (SKDCIL, DeepInversionCIL, EnsembleAverage, ExModelDistillation, FineTune, ICaRL,
                                     Joint, LwF, MinEntropyEnsemble, OracleEnsemble, ParameterAverage, RealReplay,
                                     SyntheticExemplars, SynthesizerGenerator, SynthesizerSource, register_strategy)
from exml_fast.models import build_model, register_arch
from exml_fast.synth import (AuxiliaryData, DataImpressions, DeepInversion, GenerativeSynthesizer, LowAgreementWarning,
                             ModelInversion, SyntheticBatch, load_synthetic)
from exml_fast.synth.matcher import BNStatsMatcher
from exml_fast.training import distill
from exml_fast.viz import save_grid

__version__ = "0.2.0"

__all__ = ["AuxiliaryData", "BNStatsMatcher", "DataImpressions", "DeepInversion", "DeepInversionCIL", "EnsembleAverage",
           "ExModelDistillation", "Experience", "Expert", "ExpertError", "ExpertStream", "FineTune",
           "GenerativeSynthesizer", "ICaRL", "Joint", "LowAgreementWarning", "LwF", "MinEntropyEnsemble", "ModelInfo",
           "ModelInversion", "OracleEnsemble", "ParameterAverage", "RealReplay", "SCENARIOS", "SKDCIL", "Scenario",
           "StreamResult", "SynthesizerGenerator", "SynthesizerSource", "SyntheticBatch", "SyntheticBuffer",
           "SyntheticExemplars", "build_info", "build_model", "distill", "has_ops", "load_model", "load_synthetic",
           "make_scenario", "ops", "reference", "register_arch", "register_strategy", "run_stream", "save_grid",
           "save_model", "summary_table", "synth", "train_experts", "__version__"]
