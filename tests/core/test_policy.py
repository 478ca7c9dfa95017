"""MixCache-style granularity choice."""

import pytest

from lightcache_core import MixPolicyConfig, choose_granularity, estimated_error

ALL = ("step", "cfg", "block")


def test_small_change_picks_step():
    assert choose_granularity(0.05, 0.05, MixPolicyConfig(), ALL) == "step"


def test_growing_change_steps_down_granularity():
    config = MixPolicyConfig(error_budget=0.25, step_weight=1.0, cfg_weight=0.5, block_weight=0.25)
    assert choose_granularity(0.2, 0.05, config, ALL) == "step"  # 1.0 * 0.25 <= 0.25
    assert choose_granularity(0.3, 0.1, config, ALL) == "cfg"  # 0.5 * 0.4 = 0.2
    assert choose_granularity(0.6, 0.3, config, ALL) == "block"  # 0.25 * 0.9 = 0.225
    assert choose_granularity(1.0, 0.1, config, ALL) == "compute"  # 0.25 * 1.1 > 0.25


def test_allowed_restricts_choice():
    config = MixPolicyConfig()
    assert choose_granularity(0.0, 0.01, config, ["cfg", "block"]) == "cfg"
    assert choose_granularity(0.0, 0.01, config, ["block"]) == "block"
    assert choose_granularity(0.0, 0.01, config, []) == "compute"
    assert choose_granularity(0.3, 0.1, config, ["step"]) == "compute"


def test_zero_budget_never_reuses_with_change():
    config = MixPolicyConfig(error_budget=0.0)
    assert choose_granularity(0.0, 0.01, config, ALL) == "compute"


def test_estimated_error_and_validation():
    config = MixPolicyConfig()
    assert estimated_error("cfg", 0.2, 0.2, config) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        estimated_error("bogus", 0.1, 0.1, config)
    with pytest.raises(ValueError):
        choose_granularity(0.1, 0.1, config, ["bogus"])
    with pytest.raises(ValueError):
        MixPolicyConfig(error_budget=-1)
