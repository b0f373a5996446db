"""The class-incremental strategies by their old address: one module per family now holds each
(:mod:`.cil_base`: :class:`DataStrategy`; :mod:`.finetune`: :class:`FineTune`, :class:`Joint`; :mod:`.lwf`;
:mod:`.icarl`; :mod:`.deepinversion_cil`: :class:`DeepInversionCIL`, :class:`SyntheticExemplars`; :mod:`.skd`).
This module re-exports their names so that code importing ``exml_fast.cl.strategies.cil`` keeps working."""

from __future__ import annotations

from exml_fast.cl.strategies.cil_base import CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, data_strategy_kwargs
from exml_fast.cl.strategies.deepinversion_cil import (DI_CIL_OPTIONS, SYNTH_DEFAULTS, SYNTH_EXEMPLAR_OPTIONS,
                                                       SYNTH_OPTIONS, DeepInversionCIL, SyntheticExemplars)
from exml_fast.cl.strategies.finetune import FineTune, Joint
from exml_fast.cl.strategies.icarl import ICARL_CLASSIFIERS, ICARL_OPTIONS, ICaRL
from exml_fast.cl.strategies.lwf import LWF_FORMS, LWF_OPTIONS, LwF
from exml_fast.cl.strategies.skd import SKD_DEFAULTS, SKD_OPTIONS, SKDCIL

__all__ = ["CIL_DEFAULTS", "CIL_OPTIONS", "DI_CIL_OPTIONS", "ICARL_CLASSIFIERS", "ICARL_OPTIONS", "LWF_FORMS",
           "LWF_OPTIONS", "SKDCIL", "SKD_DEFAULTS", "SKD_OPTIONS", "SYNTH_DEFAULTS", "SYNTH_EXEMPLAR_OPTIONS",
           "SYNTH_OPTIONS", "DataStrategy", "DeepInversionCIL", "FineTune", "ICaRL", "Joint", "LwF",
           "SyntheticExemplars", "data_strategy_kwargs"]
