"""Full-step schedules, reuse windows and sigma -> step lookup."""

import math

import pytest
import torch

from lightcache_core import StepWindow, nonuniform_full_steps, step_index_for_sigma, uniform_full_steps


# ------------------------------------------------------------------ uniform
def test_uniform_schedule():
    assert uniform_full_steps(10, 3) == [0, 3, 6, 9]
    assert uniform_full_steps(8, 2) == [0, 2, 4, 6]
    assert uniform_full_steps(25, 8) == [0, 8, 16, 24]
    assert uniform_full_steps(5, 1) == [0, 1, 2, 3, 4]
    assert uniform_full_steps(10, 4, start_step=3) == [3, 7]
    assert uniform_full_steps(0, 3) == []
    with pytest.raises(ValueError):
        uniform_full_steps(10, 0)


# ------------------------------------------------------------------ non-uniform
CASES = [(50, 5, 15.0), (50, 3, 15.0), (25, 3, 10.0), (30, 4, 0.0), (30, 4, 29.0), (20, 2, 7.5), (7, 3, 3.0)]


@pytest.mark.parametrize("total,interval,center", CASES)
def test_nonuniform_invariants(total, interval, center):
    steps = nonuniform_full_steps(total, interval, center)
    assert len(steps) == math.ceil(total / interval)
    assert steps[0] == 0
    assert steps == sorted(set(steps))
    assert all(0 <= s < total for s in steps)


def test_nonuniform_known_values():
    # Formula in the docstring, computed by hand for the DeepCache paper setting.
    assert nonuniform_full_steps(50, 5, 15, 1.4) == [0, 6, 11, 14, 17, 21, 27, 33, 41, 49]


@pytest.mark.parametrize("center", [15.0, 25.0, 35.0])
def test_nonuniform_denser_near_center(center):
    total, interval = 50, 3
    steps = nonuniform_full_steps(total, interval, center, power=1.6)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    near = [g for g, m in zip(gaps, mids) if abs(m - center) <= 5]
    far = [g for g, m in zip(gaps, mids) if abs(m - center) >= 12]
    assert near and far
    assert sum(near) / len(near) < sum(far) / len(far)


def test_nonuniform_degenerate_inputs():
    assert nonuniform_full_steps(0, 3, 5) == []
    assert nonuniform_full_steps(5, 1, 2) == [0, 1, 2, 3, 4]
    assert nonuniform_full_steps(5, 10, 2) == [0]
    assert nonuniform_full_steps(3, 2, 100.0) == [0, 2]  # center clamped into range
    with pytest.raises(ValueError):
        nonuniform_full_steps(10, 0, 5)
    with pytest.raises(ValueError):
        nonuniform_full_steps(10, 2, 5, power=0.5)


def test_power_one_is_near_uniform():
    steps = nonuniform_full_steps(40, 4, 20.0, power=1.0)
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert max(gaps) - min(gaps) <= 1


# ------------------------------------------------------------------ window
def test_step_window_rules():
    window = StepWindow(start_percent=0.2, end_percent=0.8, warmup_steps=3, final_compute_steps=2,
                        max_consecutive_reuse=2)
    total = 20
    assert not window.allows_reuse(2, total, 0)  # before start (progress 0.1)
    assert not window.allows_reuse(3, total, 0)  # progress 0.15 < 0.2
    assert window.allows_reuse(4, total, 0)
    assert window.allows_reuse(4, total, 1)
    assert not window.allows_reuse(4, total, 2)  # consecutive cap
    assert window.allows_reuse(15, total, 0)
    assert not window.allows_reuse(16, total, 0)  # progress 0.8 is excluded
    assert not window.allows_reuse(0, 0, 0)


def test_step_window_warmup_final_and_unlimited():
    window = StepWindow(warmup_steps=2, final_compute_steps=1, max_consecutive_reuse=0)
    assert [s for s in range(10) if window.allows_reuse(s, 10, 100)] == list(range(2, 9))
    default = StepWindow()
    assert not default.allows_reuse(9, 10, 0)  # last step always computes
    assert not default.allows_reuse(3, 10, 3)


@pytest.mark.parametrize("kwargs", [dict(start_percent=-0.1), dict(end_percent=1.5),
                                    dict(start_percent=0.6, end_percent=0.5), dict(warmup_steps=-1)])
def test_step_window_validation(kwargs):
    with pytest.raises(ValueError):
        StepWindow(**kwargs)



# ------------------------------------------------------------------ sigma -> step
SIGMAS = torch.tensor([14.6, 7.0, 3.5, 1.6, 0.7, 0.3, 0.0])


def test_sigma_exact_matches():
    for i, s in enumerate(SIGMAS.tolist()):
        assert step_index_for_sigma(SIGMAS, s) == i
    assert step_index_for_sigma(SIGMAS, torch.tensor([3.5, 3.5])) == 2  # batched sigma
    assert step_index_for_sigma(SIGMAS, torch.tensor(7.0 * (1 + 5e-5))) == 1  # within rtol


def test_sigma_between_steps_maps_to_interval():
    assert step_index_for_sigma(SIGMAS, 5.0) == 1  # DPM2-style midpoint between 7.0 and 3.5
    assert step_index_for_sigma(SIGMAS, 0.1) == 5
    assert step_index_for_sigma(SIGMAS, 20.0) == 0  # above the schedule clamps
    assert step_index_for_sigma(SIGMAS, -1.0) == len(SIGMAS) - 1


def test_heun_like_repeated_evaluations():
    # Heun evaluates at sigma_i and again at sigma_{i+1}; both map to exact indices.
    seen = []
    for i in range(len(SIGMAS) - 1):
        seen.append(step_index_for_sigma(SIGMAS, SIGMAS[i]))
        if SIGMAS[i + 1] > 0:
            seen.append(step_index_for_sigma(SIGMAS, SIGMAS[i + 1]))
    assert seen == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_partial_schedule():
    partial = SIGMAS[3:]  # e.g. a refiner or a denoise < 1 run starting at step 3
    assert step_index_for_sigma(partial, 1.6) == 0
    assert step_index_for_sigma(partial, 0.5) == 1
    assert step_index_for_sigma(partial, 0.0) == 3


def test_degenerate_sigma_lists():
    assert step_index_for_sigma(torch.tensor([0.0, 0.0]), 0.0) is None
    assert step_index_for_sigma(torch.tensor([1.0]), 1.0) is None
    assert step_index_for_sigma(torch.tensor([]), 1.0) is None
    assert step_index_for_sigma([2.0, 2.0, 2.0], 2.0) is None
    assert step_index_for_sigma([1.0, 0.0], 1.0) == 0
