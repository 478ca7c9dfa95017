"""Error signals (step / cfg / block) and the damped first-order prediction."""

import pytest
import torch

from lightcache_core import BlockSignals, TrajectorySignals, extrapolate, slope
from lightcache_core.signals import guided_output, subsample_latent, subsample_tokens


def test_subsampling_copies_so_in_place_updates_do_not_leak():
    x = torch.randn(1, 4, 3, 8, 8)
    sub = subsample_latent(x, 2)
    assert sub.shape == (1, 4, 3, 4, 4) and sub.dtype == torch.float32
    x.add_(1.0)  # a block updating its input in place
    assert not torch.equal(sub, x[..., ::2, ::2])
    h = torch.randn(2, 16, 8)
    hs = subsample_tokens(h, 4)
    h.mul_(0)
    assert hs.abs().sum() > 0 and hs.shape == (2, 4, 2)


def test_guided_output():
    c, u = torch.full((2,), 2.0), torch.full((2,), 1.0)
    assert torch.equal(guided_output({0: c, 1: u}, 5.0), u + 5 * (c - u))
    assert guided_output({0: c}, 5.0) is c


def test_trajectory_signals_ratios_and_errors():
    signals = TrajectorySignals(stride=1, cfg_scale=3.0)
    x0 = torch.ones(1, 2, 4, 4)
    out0 = {0: torch.zeros(1, 2, 4, 4), 1: torch.zeros(1, 2, 4, 4)}
    signals.observe_compute(x0, out0)
    assert not signals.calibrated
    x1 = x0 * 0.9  # |dx| = 0.1
    out1 = {0: torch.full((1, 2, 4, 4), 0.2), 1: torch.full((1, 2, 4, 4), 0.1)}
    signals.observe_compute(x1, out1)
    assert signals.calibrated
    # guided output g = u + 3 (c - u): 0 -> 0.4; k_out = 0.4 / 0.1
    assert float(signals.k_out) == pytest.approx(4.0, rel=1e-4)
    # difference d = c - u: 0 -> 0.1; k_diff = (s - 1) * 0.1 / 0.1
    assert float(signals.k_diff) == pytest.approx(2.0, rel=1e-4)
    x2 = x1 * 0.9  # moved 0.09 = 0.1 of |x2| = 0.81 ... relative distance 0.09 / 0.81
    distance = signals.distance(x2)
    assert float(distance) == pytest.approx(0.09 / 0.81, rel=1e-4)
    errors = signals.predicted_errors(distance)
    assert float(errors["step"]) == pytest.approx(4.0 * 0.09 / 0.81, rel=1e-4)
    assert float(errors["cfg"]) == pytest.approx(2.0 * 0.09 / 0.81, rel=1e-4)
    # a different shape is "unknown", never a reuse
    assert float(signals.distance(torch.ones(1, 2, 2, 2))) == float("inf")


def test_hindsight_calibration_scales_each_formula_by_its_realized_error():
    signals = TrajectorySignals(stride=1, cfg_scale=1.0)
    x = [torch.full((1, 1, 4, 4), v) for v in (1.0, 0.9, 0.8)]
    outs = [{0: torch.full((1, 1, 4, 4), v)} for v in (0.0, 0.1, 0.2)]
    signals.observe_compute(x[0], outs[0])
    signals.observe_compute(x[1], outs[1])
    # at the third compute the formula predicts k_out * distance = 1.0 * 0.125; holding the last output errs by 0.1/0.8
    perfect = {0: outs[2][0].clone()}
    signals.observe_compute(x[2], outs[2], predicted=perfect, held=outs[1])
    assert float(signals.calibration["step"]) == pytest.approx(0.0, abs=1e-6)  # the prediction was exact
    assert float(signals.calibration["hold"]) == pytest.approx(1.0, rel=1e-3)
    errors = signals.predicted_errors(torch.tensor(0.1))
    assert float(errors["step"]) == pytest.approx(0.0, abs=1e-6) and float(errors["hold"]) == pytest.approx(0.1, rel=1e-3)


def test_block_signals_fresh_error():
    signals = BlockSignals(stride=1)
    first0, middle0, final0 = torch.ones(1, 4, 2), torch.ones(1, 4, 2), torch.ones(1, 4, 2)
    signals.observe_compute(first0, middle0, final0, None)
    assert not signals.calibrated
    # between computes the first residual drifts 10 %, the middle moves 0.05, the output 0.1, the latent 0.2
    signals.observe_compute(first0 * 1.1, middle0 + 0.05, final0 + 0.1, torch.tensor(0.2))
    assert signals.calibrated
    assert float(signals.share) == pytest.approx(0.5, rel=1e-4)
    assert float(signals.first_rate) == pytest.approx(0.1 / 0.2, rel=1e-4)
    # now the first residual drifted 5 % -> a latent distance of 0.1 -> error share * k * 0.1
    fresh = signals.fresh_error(first0 * 1.1 * 1.05, torch.tensor(2.0))
    assert float(fresh) == pytest.approx(0.5 * 2.0 * 0.05 / 0.5, rel=1e-3)


def test_slope_and_damped_extrapolation():
    y0, y1 = torch.zeros(3), torch.ones(3)
    dy = slope(y1, y0, 0.5, 1.0)  # sigma went 1.0 -> 0.5
    assert torch.allclose(dy, torch.full((3,), -2.0))
    # half a step towards sigma 0.25: 1 + 0.5 * (-2) * (0.25 - 0.5)
    assert torch.allclose(extrapolate(y1, dy, 0.25, 0.5, 0.5), torch.full((3,), 1.25))
    assert extrapolate(y1, dy, 0.25, 0.5, 0.0) is y1  # damping 0 holds the output
    assert extrapolate(y1, None, 0.25, 0.5, 0.5) is y1
    assert slope(y1, y0, 0.5, 0.5) is None and slope(y1, torch.zeros(4), 0.5, 1.0) is None
