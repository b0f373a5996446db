"""Experiments built on the library: run budgets and records, the papers' tables (Table 2, zero-shot KD),
the Ex-Model Distillation ablation and its presets, the demos."""

#: ``exml-fast reproduce`` experiments: Table 2 (MNIST), the ED ablation, zero-shot KD from Data Impressions and
#: from trained generators, the class-incremental tables.
EXPERIMENTS = ("exml-mnist", "exml-mnist-ablation", "zskd-mnist", "zskd-fmnist", "dfkd-mnist", "cil-mnist",
               "cil-fmnist")
