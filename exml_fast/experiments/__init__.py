"""Experiments built on the library: run budgets and records, the papers' tables (Table 2, zero-shot KD),
the Ex-Model Distillation ablation and its presets, the demos."""
