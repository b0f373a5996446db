"""Bridges to other continual-learning libraries; each is an optional extra (``pip install exml_fast[NAME]``).

- :mod:`exml_fast.integrations.avalanche` — Avalanche (ContinualAI): Ex-Model Distillation as an Avalanche
  strategy on its ``ExModelCLScenario``, a data-free replay plugin for any Avalanche strategy, and converters
  between exml_fast's scenarios and expert streams and Avalanche's benchmarks.

Nothing here is imported by ``import exml_fast``.
"""
