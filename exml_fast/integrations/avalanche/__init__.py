"""exml_fast inside Avalanche (ContinualAI's continual-learning library): ``pip install exml_fast[avalanche]``.

- :class:`ExModelDistillationStrategy` — exml_fast's Ex-Model Distillation (the ExML paper's Algorithm 1:
  model inversion, DeepInversion, Data Impressions, auxiliary or real-replay sources, the class-balanced
  synthetic buffer, the fused ED loss) as an Avalanche strategy that learns from an ``ExModelCLScenario``'s
  expert stream, evaluated by Avalanche's metrics and loggers like any of its strategies.
- :class:`DataFreeReplayPlugin` — a plugin for any Avalanche strategy (``Naive``, ``LwF``, ``EWC``, ...): after
  each experience, images of every class seen so far are synthesised from the model just trained
  (DeepInversion by default) and mixed into the next experience's minibatches, optionally with the
  distillation of the previous model's logits (DeepInversion-CIL's Eq. 11 terms).
- Converters: :func:`to_avalanche_benchmark` (an exml_fast :class:`~exml_fast.cl.scenarios.Scenario` as an
  Avalanche class-incremental benchmark on the same tensors), :func:`to_exmodel_scenario` (an
  :class:`~exml_fast.cl.experts.ExpertStream` as an ``ExModelCLScenario``) and :func:`to_expert_stream` (back).

See the guide ``docs/avalanche.md``.
"""

from __future__ import annotations

import warnings

try:
    with warnings.catch_warnings():
        # qpsolvers (imported by Avalanche's GEM plugin, unused here) warns at import when no QP solver is
        # installed; the extra installs none.
        warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
        import avalanche  # noqa: F401
        import avalanche.training  # noqa: F401
except ImportError as e:  # the extra is not installed, or one of the modules Avalanche imports is missing
    raise ImportError("exml_fast.integrations.avalanche needs Avalanche (avalanche-lib 0.6) and the packages it "
                      "imports: pip install exml_fast[avalanche] "
                      f"(importing it failed: {e})") from e

from exml_fast.integrations.avalanche.convert import (AvalancheExpert, to_avalanche_benchmark,  # noqa: E402
                                                      to_exmodel_scenario, to_expert_stream)
from exml_fast.integrations.avalanche.exml_strategy import ExModelDistillationStrategy  # noqa: E402
from exml_fast.integrations.avalanche.replay import DataFreeReplayPlugin  # noqa: E402

__all__ = ["AvalancheExpert", "DataFreeReplayPlugin", "ExModelDistillationStrategy", "to_avalanche_benchmark",
           "to_exmodel_scenario", "to_expert_stream"]
