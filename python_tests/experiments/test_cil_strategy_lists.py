"""Which class-incremental strategies the reproduce tables and the demo run."""

from exml_fast.cl.strategies.registry import STRATEGIES
from exml_fast.experiments.cil import CIL_STRATEGIES, DEMO_CIL_STRATEGIES


def test_the_tables_run_every_class_incremental_strategy():
    assert sorted(CIL_STRATEGIES) == sorted(n for n, s in STRATEGIES.items() if s.data)
    assert len(set(CIL_STRATEGIES)) == len(CIL_STRATEGIES)


def test_the_demo_runs_all_but_skd_in_the_tables_order():
    # skd's delegator takes about 40 min a run at the demo budget on one core: the demo must stay under 15 min
    assert DEMO_CIL_STRATEGIES == tuple(s for s in CIL_STRATEGIES if s != "skd") and "skd" in CIL_STRATEGIES
