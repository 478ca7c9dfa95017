"""The hybrid decision: cheapest granularity whose predicted error fits the budget."""

import pytest

from lightcache_core import HybridPolicy, choose_granularity, forecast_reuse

COSTS = {"step": 0.0, "cfg": 0.5, "block": 0.33}


def test_cheapest_feasible_wins_not_a_fixed_order():
    policy = HybridPolicy(budget=0.3)
    assert choose_granularity({"step": 0.1, "cfg": 0.05, "block": 0.01}, COSTS, 0.0, policy) == "step"
    # step does not fit: the cheaper of the rest that fits
    assert choose_granularity({"step": 0.4, "cfg": 0.05, "block": 0.2}, COSTS, 0.0, policy) == "block"
    assert choose_granularity({"step": 0.4, "cfg": 0.05, "block": 0.35}, COSTS, 0.0, policy) == "cfg"
    # the accumulated error counts against every candidate
    assert choose_granularity({"step": 0.1, "cfg": 0.05, "block": 0.2}, COSTS, 0.22, policy) == "cfg"
    assert choose_granularity({"step": 0.1, "cfg": 0.1, "block": 0.1}, COSTS, 0.25, policy) == "compute"
    # equal cost: the smaller error
    assert choose_granularity({"step": 0.1, "cfg": 0.05}, {"step": 0.5, "cfg": 0.5}, 0.0, policy) == "cfg"


def test_unknown_and_unmeasured_errors_never_reuse():
    policy = HybridPolicy(budget=1.0)
    assert choose_granularity({"step": float("inf"), "cfg": float("nan")}, COSTS, 0.0, policy) == "compute"
    assert choose_granularity({}, COSTS, 0.0, policy) == "compute"
    assert choose_granularity({"step": 0.0}, COSTS, 0.0, HybridPolicy(budget=0.0)) == "compute"
    with pytest.raises(ValueError):
        choose_granularity({"bogus": 0.1}, COSTS, 0.0, policy)


def test_policy_validation_and_cap():
    with pytest.raises(ValueError):
        HybridPolicy(budget=-1)
    with pytest.raises(ValueError):
        HybridPolicy(budget=float("nan"))
    with pytest.raises(ValueError):
        HybridPolicy(max_consecutive_reuse=-1)
    assert HybridPolicy(max_consecutive_reuse=3).cap_reached(3)
    assert not HybridPolicy(max_consecutive_reuse=0).cap_reached(100)


def test_forecast_follows_the_rule_ahead():
    policy = HybridPolicy(budget=1.0)
    # errors grow 0.1, 0.2, 0.3 ... per evaluation: step reuses while 0.1 + 0.2 + 0.3 + 0.4 <= 1.0
    assert forecast_reuse({"step": 0.1}, COSTS, policy, 10) == ["step"] * 4 + ["compute"]
    # block's error grows slower: once step stops fitting, block takes over
    plan = forecast_reuse({"step": 0.1, "block": 0.01}, COSTS, HybridPolicy(budget=1.06), 10)
    assert plan == ["step"] * 4 + ["block", "compute"]
    assert forecast_reuse({"step": 0.1}, COSTS, policy, 2) == ["step", "step"]
    assert forecast_reuse({"step": 0.1}, COSTS, HybridPolicy(budget=1.0, max_consecutive_reuse=2), 10) == \
        ["step", "step", "compute"]
    assert forecast_reuse({}, COSTS, policy, 5) == ["compute"]
