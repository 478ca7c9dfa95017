"""The engine's three reuse pieces against a synthetic executor with a known output (no host, no model).

The executor's output is linear in sigma per CFG branch, ``out_b(sigma) = A_b + sigma * B_b``, so a
first-order prediction from two full computes is exact, and a block range whose residual is a known
tensor must be rebuilt exactly. Each test has its broken twin next to it, so the check can fail.
"""
from __future__ import annotations

import pytest
import torch

from lightcache_core.engine import Decision, EngineConfig, Evaluation, HybridEngine
from lightcache_core.policy import COMPUTE
from lightcache_core.report import RunReport

CPU = torch.device("cpu")
SHAPE = (1, 4, 2, 6, 6)


def _engine(**config) -> HybridEngine:
    report = RunReport(node="test", mode="mix", total_steps=20)
    return HybridEngine(EngineConfig(**config), total_steps=20, cfg_scale=5.0, report=report)


def _executor():
    g = torch.Generator().manual_seed(0)
    a = {b: torch.randn(SHAPE, generator=g) for b in (0, 1)}
    slope = {b: torch.randn(SHAPE, generator=g) for b in (0, 1)}
    return lambda b, sigma: a[b] + sigma * slope[b]


def _computed(engine: HybridEngine, out, sigmas=(0.9, 0.8)):
    trajectory = engine.trajectory("cond-uuid", CPU)
    x = torch.randn(SHAPE)
    for sigma in sigmas:
        trajectory.check_input(x)
        trajectory.record_compute(x, {b: out(b, sigma) for b in (0, 1)}, sigma, last_step=False)
    return trajectory


@pytest.mark.parametrize("damping", [1.0, 0.5, 0.0])
def test_step_reuse_extrapolates_from_the_last_two_computes(damping):
    out = _executor()
    trajectory = _computed(_engine(extrapolation=damping), out)
    for b in (0, 1):
        held, truth = out(b, 0.8), out(b, 0.7)
        expected = held + damping * (truth - held)  # damped first-order prediction of a linear output
        assert torch.allclose(trajectory.predict(b, 0.7), expected, atol=1e-5)
    # the broken twin: a prediction that holds the last output is off unless damping is 0
    if damping > 0:
        assert not torch.allclose(trajectory.predict(0, 0.7), out(0, 0.8), atol=1e-3)


def test_cfg_reuse_rebuilds_the_negative_branch_from_the_fresh_positive_one():
    out = _executor()
    trajectory = _computed(_engine(extrapolation=1.0), out)
    rebuilt = trajectory.rebuild_branch(out(0, 0.7), 1, 0.7)
    assert torch.allclose(rebuilt, out(1, 0.7), atol=1e-5)
    # broken twin (uncond := cond) is far from the truth
    assert (out(0, 0.7) - out(1, 0.7)).abs().mean() > 0.5


def test_block_reuse_adds_the_residual_the_range_really_made_even_when_blocks_work_in_place():
    engine = _engine(granularities=("block",), extrapolation=0.0)
    trajectory = engine.trajectory("cond-uuid", CPU)
    g = torch.Generator().manual_seed(1)
    residual = torch.randn(2, 16, 8, generator=g)  # what the cached range adds, rows 0 (cond) and 1 (uncond)
    compute = Evaluation(trajectory, Decision(step=4, sigma=0.7, decision=COMPUTE, forecast=["block"]))
    h = torch.randn(2, 16, 8, generator=g)
    engine.blocks.model_input(compute, "group", h)
    assert engine.blocks.first_blocks_done(compute, "group", {"img": h}) is False  # computes, keeps the input
    h += residual  # the range's blocks update their input in place, as Flux-style blocks do
    engine.blocks.range_done(compute, "group", (0, 1), {"img": h})

    reuse = Evaluation(trajectory, Decision(step=5, sigma=0.6, decision="block"))
    fresh_input = torch.randn(2, 16, 8, generator=g)
    rebuilt = engine.blocks.add_residual(reuse, (0, 1), {"img": fresh_input})["img"]
    assert torch.allclose(rebuilt, fresh_input + residual, atol=1e-6)
    stored = [k for k in engine.store_for(CPU).keys() if k[0] == "block"]
    assert sorted(stored) == sorted(("block", trajectory.key, r, "img") for r in (0, 1))  # one per CFG row


def test_block_reuse_of_a_range_that_was_not_stored_changes_nothing():
    """The dropped-residual control: without a stored residual the range output is its input."""
    engine = _engine(granularities=("block",))
    trajectory = engine.trajectory("cond-uuid", CPU)
    reuse = Evaluation(trajectory, Decision(step=5, sigma=0.6, decision="block"))
    h = torch.randn(2, 16, 8)
    assert torch.equal(engine.blocks.add_residual(reuse, (0, 1), {"img": h})["img"], h)
