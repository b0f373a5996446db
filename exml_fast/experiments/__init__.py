"""Experiments built on the library: run budgets and records, the papers' tables (Table 2, zero-shot KD),
the Ex-Model Distillation ablation and its presets, the demos."""

#: ``exml-fast reproduce`` experiments: Table 2 (MNIST), the ED ablation, zero-shot KD from Data Impressions.
EXPERIMENTS = ("exml-mnist", "exml-mnist-ablation", "zskd-mnist", "zskd-fmnist", "cil-mnist", "cil-fmnist")
