"""An exml_fast strategy from outside the package: fine-tuning with an L2 pull towards the weights before the
task (the "L2" baseline of class-incremental learning), an option of its own and the public hooks."""

from exml_fast.cl.strategies import (CIL_DEFAULTS, CIL_OPTIONS, DataStrategy, StrategyOption, build_data_learner,
                                     data_strategy_kwargs, register_strategy)


class L2Anchor(DataStrategy):
    """Cross-entropy over the classes seen + ``weight * ||θ - θ_before||²`` from the second task on."""

    name = "l2-anchor"

    def __init__(self, model, *, weight=1.0, **kwargs):
        super().__init__(model, **kwargs)
        self.weight, self.anchor = float(weight), None

    def config(self):  # what decides the results: recorded in result.json, checked on --resume
        return {**super().config(), "weight": self.weight}

    def before_experience(self, experience, i):
        if self.experiences_seen:
            self.anchor = [p.detach().clone() for p in self.model.parameters()]

    def cleanup_experience(self):
        self.anchor = None

    def criterion(self, logits, x, y, step):
        loss = super().criterion(logits, x, y, step)
        if self.anchor is not None:
            loss = loss + self.weight * sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), self.anchor))
        return loss


WEIGHT = StrategyOption("anchor_weight", float, 1.0, "l2-anchor: weight of the pull to the old weights (default: 1)")


@register_strategy("l2-anchor", keeps_data=False, data=True, defaults=CIL_DEFAULTS, options=[*CIL_OPTIONS, WEIGHT],
                   help="class-incremental: fine-tuning pulled towards the weights before each task (a plugin)")
def build(ctx, opt):
    return L2Anchor(build_data_learner(ctx, opt), weight=opt["anchor_weight"], **data_strategy_kwargs(ctx, opt))
