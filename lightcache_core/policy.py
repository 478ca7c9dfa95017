"""MixCache-style hybrid decision: which reuse granularity, if any, for this step.

MixCache (arXiv 2508.12691) mixes step-, CFG- and block-level reuse; its equations are
not public, so this is our explicit, testable rule (algorithms.md sections 4 and 5.3):

* The caller tracks the accumulated relative change of the model input/output since
  the last full compute (``schedules.AccumulatedChange``) and this step's change.
* Reusing at granularity ``g`` is estimated to cost
  ``weight_g * (accumulated_change + step_change)`` of error.
* Weights order the granularities by how much of the output they replace:
  step reuse replaces the entire output (largest error, weight 1); CFG reuse keeps
  the cond branch fresh and only approximates the guidance delta (smaller, 0.5);
  block reuse recomputes the first/last blocks and approximates only the middle
  residual (smallest, 0.25).
* The most aggressive granularity whose estimate fits ``error_budget`` wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Granularity = Literal["compute", "step", "cfg", "block"]

REUSE_ORDER: tuple[str, ...] = ("step", "cfg", "block")  # most to least aggressive


@dataclass(frozen=True)
class MixPolicyConfig:
    """Error budget and per-granularity error weights (all dimensionless fractions).

    error_budget: accumulated relative change allowed between full computes.
    step_weight / cfg_weight / block_weight: fraction of the accumulated change that
        reuse at that granularity is assumed to turn into output error.
    """

    error_budget: float = 0.25
    step_weight: float = 1.0
    cfg_weight: float = 0.5
    block_weight: float = 0.25

    def __post_init__(self) -> None:
        for name in ("error_budget", "step_weight", "cfg_weight", "block_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"MixPolicyConfig.{name} must be >= 0, got {getattr(self, name)}")

    def weight(self, granularity: str) -> float:
        """Error weight of ``granularity`` ("step", "cfg" or "block")."""
        try:
            return {"step": self.step_weight, "cfg": self.cfg_weight, "block": self.block_weight}[granularity]
        except KeyError:
            raise ValueError(f"unknown reuse granularity {granularity!r}; expected one of {REUSE_ORDER}") from None


def estimated_error(granularity: str, accumulated_change: float, step_change: float, config: MixPolicyConfig) -> float:
    """Estimated relative output error of reusing at ``granularity`` this step."""
    return config.weight(granularity) * (accumulated_change + step_change)


def choose_granularity(
    accumulated_change: float,
    step_change: float,
    config: MixPolicyConfig,
    allowed: Sequence[str],
) -> str:
    """Most aggressive allowed granularity within budget, else ``"compute"``.

    accumulated_change: relative change accumulated since the last full compute.
    step_change: relative change of the current step.
    allowed: granularities the caller can serve now (e.g. no "cfg" without a cached
        guidance delta, nothing during warm-up); unknown names raise ValueError.
    Returns one of "step", "cfg", "block", "compute".
    """
    allowed_set = set(allowed)
    unknown = allowed_set - set(REUSE_ORDER) - {"compute"}
    if unknown:
        raise ValueError(f"unknown granularities {sorted(unknown)}; expected a subset of {REUSE_ORDER}")
    for granularity in REUSE_ORDER:
        if granularity in allowed_set and \
                estimated_error(granularity, accumulated_change, step_change, config) <= config.error_budget:
            return granularity
    return "compute"
