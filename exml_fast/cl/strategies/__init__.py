"""Continual-learning strategies: Ex-Model Continual Learning (the ExML paper, §3-§5) and class-incremental
learning from data (REFERENCE.md §4).

An ExML strategy learns from a stream of trained experts, one :class:`~exml_fast.cl.experts.Expert` at a time;
a class-incremental one from a scenario's experiences, each with its training data:
``strategy.train(expert)`` (or ``strategy.train(experience)``) handles one experience and
``strategy.predict(x)`` answers with (B, num_classes) logits. All strategies share that interface
(:class:`Strategy`), ``state_dict``/``load_state_dict`` (what a run checkpoints) and ``config`` (what decides
their results). One module per family:

- :mod:`.ed` — :class:`ExModelDistillation` (ED, Algorithm 1): synthesise ``N/i`` samples from the i-th expert
  with its data ``source`` (:mod:`.sources`), keep a fixed-size class-balanced
  :class:`~exml_fast.cl.buffer.SyntheticBuffer`, and distil the expert and the previous model into ``model``
  with the fused :func:`exml_fast.ops.ed_loss`. It keeps no expert after its experience. With
  :class:`RealReplay` as the source it is the paper's Replay ED (real data: an upper bound), and its
  ``ex_model`` is False (recorded in its config and in a run's result).
- :mod:`.gen_ed` — :class:`GenerativeED` (``gen-ed``, in no paper): ED whose samples come fresh at every step
  from one knowledge delegator fine-tuned on each expert (no buffer).
- :mod:`.ensembles` — :class:`OracleEnsemble` (the task label picks the expert), :class:`EnsembleAverage`,
  :class:`MinEntropyEnsemble`: they keep every expert, so they break the ExML memory constraint and only bound it.
- :mod:`.param_avg` — :class:`ParameterAverage`, the running mean of the experts' parameters (one model).
- class-incremental learning from data (each experience brings its training data, and only while it is
  learned), on :class:`DataStrategy` (:mod:`.cil_base`), one module per family: :mod:`.finetune` —
  :class:`FineTune` (the lower bound) and :class:`Joint` (keeps all data: the upper bound); :mod:`.lwf` —
  :class:`LwF` (Learning without Forgetting); :mod:`.icarl` — :class:`ICaRL` (the exemplar reference: keeps K
  real images); :mod:`.deepinversion_cil` — :class:`DeepInversionCIL` and :class:`SyntheticExemplars`
  (DeepInversion images instead of old data); :mod:`.skd` — :class:`SKDCIL` (a trained knowledge delegator's
  samples instead of old data). :mod:`.cil` re-exports them all. Their ``learns_from`` is ``"data"``: a run
  feeds them the scenario's experiences instead of experts.

Every strategy is registered under its command-line name (:mod:`.registry`: :func:`register_strategy`,
:func:`build_strategy`); run options and their defaults are in :mod:`.options`. A strategy defined outside the
package registers the same way and declares its own options (:class:`StrategyOption`); ``exml-fast run`` finds
it through the ``exml_fast.strategies`` entry-point group or as ``package.module:name`` (docs/extending.md).
"""

# Importing ed, gen_ed, ensembles, param_avg and the class-incremental families registers their strategies, in the
# order of --strategy's choices.
from exml_fast.cl.strategies.base import Strategy, derive_seed, expert_name
from exml_fast.cl.strategies.ed import ExModelDistillation
from exml_fast.cl.strategies.gen_ed import GenerativeED
from exml_fast.cl.strategies.ensembles import EnsembleAverage, MinEntropyEnsemble, OracleEnsemble
from exml_fast.cl.strategies.options import DATASET_RUN_DEFAULTS, RUN_OPTIONS, StrategyOption, run_defaults
from exml_fast.cl.strategies.param_avg import ParameterAverage
# The class-incremental families, in the order of their command-line names (finetune, joint, lwf, icarl, ...).
from exml_fast.cl.strategies.cil_base import (CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, TrainStep,  # noqa: I001
                                              data_strategy_kwargs)
from exml_fast.cl.strategies.finetune import FineTune, Joint
from exml_fast.cl.strategies.lwf import LWF_FORMS, LwF
from exml_fast.cl.strategies.icarl import ICaRL
from exml_fast.cl.strategies.deepinversion_cil import DeepInversionCIL, SyntheticExemplars
from exml_fast.cl.strategies.skd import SKDCIL
from exml_fast.cl.strategies.registry import (ENTRY_POINT_GROUP, STRATEGIES, BuildContext, StrategyOptionError,
                                              StrategySpec, build_data_learner, build_learner, build_strategy,
                                              check_learner, load_config, load_entry_points, register_strategy,
                                              resolve_strategy, run_named_strategy, strategy_names, stream_arch)
from exml_fast.cl.strategies.sources import (DataSource, Generator, RealReplay, SynthesizerGenerator,
                                             SynthesizerSource)

__all__ = ["CIL_DEFAULTS", "CIL_OPTIONS", "DATASET_RUN_DEFAULTS", "ENTRY_POINT_GROUP", "LWF_FORMS", "RUN_OPTIONS",
           "SKDCIL", "STRATEGIES", "BuildContext", "DataSource", "DataStrategy", "DeepInversionCIL", "EnsembleAverage",
           "ExModelDistillation", "FineTune", "GenerativeED", "Generator", "ICaRL", "Joint", "LwF",
           "MinEntropyEnsemble", "OracleEnsemble", "ParameterAverage", "RealReplay", "Strategy", "StrategyOption",
           "StrategyOptionError", "StrategySpec", "SynthesizerGenerator", "SynthesizerSource", "SyntheticExemplars",
           "TrainStep", "build_data_learner", "build_learner", "build_strategy", "check_learner",
           "data_strategy_kwargs", "derive_seed", "expert_name", "load_config", "load_entry_points",
           "register_strategy", "resolve_strategy", "run_defaults", "run_named_strategy", "strategy_names",
           "stream_arch"]
