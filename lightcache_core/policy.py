"""The hybrid reuse decision: which granularity (if any) one model evaluation reuses.

MixCache (arXiv 2508.12691) mixes step-, CFG- and block-level reuse, but its
equations are not public.  This module is our written-down rule; the reasons are
measured on the trained tiny Wan fixture (README, "How mix decides"):

* Every granularity ``g`` gets its own predicted error ``e_g`` for this evaluation,
  in one unit: the mean absolute error of the CFG-combined model output it would
  cause, relative to the mean magnitude of the input latent (``signals.py``
  measures them: step from the output drift since the last full compute, cfg from
  the drift of the guidance difference, block from the first blocks' fresh
  residual).
* Every granularity has a cost: the fraction of a full evaluation's transformer
  block evaluations it still runs (step 0, cfg the uncond rows' share, block the
  first + last blocks' share), taken from the model's real block counts.
* An accumulated error ``A`` is the sum of the predicted errors of the reuses
  since the last full compute.  A granularity is *feasible* when
  ``A + e_g <= budget``.  The cheapest feasible granularity wins (ties: the
  smaller error); none feasible means a full compute, which resets ``A``.
  So the knob (``budget``) ends reuse runs; a consecutive-reuse cap is only a
  safety net.

``forecast_reuse`` runs the same rule ahead on scalar extrapolations of the
signals, to decide at a full compute which caches the coming reuse run can read:
what the forecast does not need is not stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

GRANULARITIES: tuple[str, ...] = ("step", "cfg", "block")
COMPUTE = "compute"


@dataclass(frozen=True)
class HybridPolicy:
    """The decision's knobs (dimensionless unless noted).

    budget: accumulated predicted relative error allowed between full computes
        (the user's ``threshold``); 0 never reuses.
    max_consecutive_reuse: safety cap on reuses in a row (0 = no cap).
    """

    budget: float = 0.3
    max_consecutive_reuse: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.budget, (int, float)) and math.isfinite(self.budget) and self.budget >= 0):
            raise ValueError(f"HybridPolicy.budget must be a finite number >= 0, got {self.budget!r}")
        if int(self.max_consecutive_reuse) != self.max_consecutive_reuse or self.max_consecutive_reuse < 0:
            raise ValueError(f"HybridPolicy.max_consecutive_reuse must be an integer >= 0, got {self.max_consecutive_reuse!r}")

    def cap_reached(self, consecutive_reuse: int) -> bool:
        return self.max_consecutive_reuse > 0 and consecutive_reuse >= self.max_consecutive_reuse


def choose_granularity(errors: Mapping[str, float], costs: Mapping[str, float], accumulated: float,
                       policy: HybridPolicy) -> str:
    """The cheapest granularity whose predicted error fits the budget, else ``"compute"``.

    errors: predicted relative error per candidate granularity (only the ones the
        caller can serve now; NaN or inf means "unknown": never feasible).
    costs: fraction of a full evaluation each candidate still runs (0 = free).
    accumulated: predicted error of the reuses since the last full compute.
    """
    unknown = set(errors) - set(GRANULARITIES)
    if unknown:
        raise ValueError(f"unknown granularities {sorted(unknown)}; expected a subset of {GRANULARITIES}")
    feasible = []
    for g, e in errors.items():
        if math.isfinite(e) and e >= 0 and accumulated + e <= policy.budget:
            feasible.append((float(costs.get(g, 1.0)), float(e), GRANULARITIES.index(g), g))
    if not feasible or policy.budget <= 0:
        return COMPUTE
    return min(feasible)[3]


def forecast_reuse(error_growth: Mapping[str, float], costs: Mapping[str, float], policy: HybridPolicy,
                   steps_left: int) -> list[str]:
    """The decisions the rule would take in the evaluations after a full compute.

    error_growth: per granularity, the predicted error of reusing ``j`` evaluations
        after the compute is ``j * error_growth[g]`` (signals grow about linearly
        with the distance the latent has moved since the compute).
    steps_left: how many evaluations may reuse before a compute is forced anyway.
    Returns the decisions up to and including the first ``"compute"`` (or
    ``steps_left`` decisions); a pure function of scalars, so it is cheap.
    """
    decisions: list[str] = []
    accumulated = 0.0
    for j in range(1, max(int(steps_left), 0) + 1):
        if policy.cap_reached(len(decisions)):
            decisions.append(COMPUTE)
            break
        errors = {g: j * rate for g, rate in error_growth.items()}
        choice = choose_granularity(errors, costs, accumulated, policy)
        decisions.append(choice)
        if choice == COMPUTE:
            break
        accumulated += errors[choice]
    return decisions
