"""Ex-Model Continual Learning: experts and expert streams, scenarios, the synthetic buffer, the strategies
(a registry keyed by command-line name), the run loop and its metrics."""
