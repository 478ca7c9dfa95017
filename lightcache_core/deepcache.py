"""DeepCache's host-agnostic parts: settings, the full-step schedule and the branch plan.

A UNet with ``N`` down (input) blocks and ``N`` up (output) blocks caches, for
branch ``b``, the hidden state entering up block ``k = N - 1 - b``; cache steps
run down blocks ``0..b``, up blocks ``k..N-1`` and the head, and skip the rest.
The ComfyUI glue (``nodes/unet_cache.py``) and the diffusers adapter
(``lightcache_core/diffusers_adapter/``) both build on these; neither the
settings nor the plan touch a model.
"""
from __future__ import annotations

from dataclasses import dataclass

from .schedules import nonuniform_full_steps, uniform_full_steps
from .settings import CACHE_DEVICES as PLACEMENT

SCHEDULES = ("uniform", "nonuniform")
CACHE_DEVICES = tuple(PLACEMENT)
NONUNIFORM_MIN_STEPS = 10  # shorter runs (8-step Lightning) use the uniform schedule
DEFAULT_THRESHOLD = 0.6  # the Sampler's default quality/speed knob maps to DeepCacheSettings()


class DeepCacheError(ValueError):
    """A setting or model the deepcache mode cannot serve; the message names the fix."""


# ---------------------------------------------------------------- settings

@dataclass(frozen=True)
class DeepCacheSettings:
    """Immutable deepcache configuration (stored on the patched model).

    interval: one full step then ``interval - 1`` cache steps (1 = every step full).
    branch: skip branch. 0 recomputes ``input_blocks[0]`` (conv_in) and the last
        output block; ``b`` recomputes ``input_blocks[0..b]`` and the last ``b + 1``
        output blocks (higher = closer to the full model, slower).
    schedule: "uniform" (full steps 0, I, 2I, ...) or "nonuniform" (default; DeepCache's
        schedule: the same number of full steps, ceil(steps / I), packed around
        ``center``; runs under 10 steps, e.g. 8-step Lightning, use uniform).
    center: where the nonuniform schedule is densest, as a fraction of the run (0..1).
    power: how strongly the nonuniform schedule packs around ``center`` (>= 1).
    start_percent / end_percent: cache steps only where ``step / steps`` lies in
        ``[start_percent, end_percent)``; every other step is full.
    cache_device: "auto" | "gpu" | "cpu": where the cached branch tensors live.
    final_full_steps: the last steps always computed in full (the final denoise).
    """

    interval: int = 3
    branch: int = 0
    schedule: str = "nonuniform"
    center: float = 0.3
    power: float = 1.4
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache_device: str = "auto"
    final_full_steps: int = 1

    def __post_init__(self) -> None:
        if int(self.interval) != self.interval or self.interval < 1:
            raise DeepCacheError(f"deepcache interval must be an integer >= 1, got {self.interval}. Fix: use 1 (off) to 10.")
        if int(self.branch) != self.branch or self.branch < 0:
            raise DeepCacheError(f"deepcache branch must be an integer >= 0, got {self.branch}.")
        if self.schedule not in SCHEDULES:
            raise DeepCacheError(f"deepcache schedule must be one of {SCHEDULES}, got {self.schedule!r}.")
        if not 0.0 <= self.center <= 1.0:
            raise DeepCacheError(f"deepcache center is a fraction of the run (0..1), got {self.center}.")
        if self.power < 1.0:
            raise DeepCacheError(f"deepcache power must be >= 1, got {self.power}.")
        if not (0.0 <= self.start_percent <= 1.0 and 0.0 <= self.end_percent <= 1.0) or self.start_percent > self.end_percent:
            raise DeepCacheError(f"deepcache start_percent/end_percent must satisfy 0 <= start <= end <= 1, got "
                                 f"{self.start_percent}/{self.end_percent}. Fix: set start_percent <= end_percent.")
        if self.cache_device not in CACHE_DEVICES:
            raise DeepCacheError(f"deepcache cache_device must be one of {CACHE_DEVICES}, got {self.cache_device!r}.")
        if self.final_full_steps < 0:
            raise DeepCacheError(f"deepcache final_full_steps must be >= 0, got {self.final_full_steps}.")

    @classmethod
    def from_threshold(cls, threshold: float, **overrides) -> "DeepCacheSettings":
        """Map the Sampler's quality/speed knob to an interval.

        0 computes every step (interval 1); the Sampler's default 0.6 gives interval 3
        (DeepCache's own default); each further 0.3 adds one cache step per full step.
        """
        threshold = float(threshold)
        interval = 1 if threshold <= 0 else max(2, int(round(1 + threshold / 0.3)))
        return cls(**{"interval": interval, **overrides})

    def full_steps(self, total_steps: int) -> list[int]:
        """The 0-based steps computed in full for a run of ``total_steps``."""
        if total_steps <= 0:
            return []
        if self.schedule == "nonuniform" and total_steps >= NONUNIFORM_MIN_STEPS:
            base = nonuniform_full_steps(total_steps, self.interval, self.center * (total_steps - 1), self.power)
        else:
            base = uniform_full_steps(total_steps, self.interval)
        full = set(base) | {0}
        for step in range(total_steps):
            progress = step / total_steps
            if not self.start_percent <= progress < self.end_percent:
                full.add(step)
        full |= set(range(max(total_steps - self.final_full_steps, 0), total_steps))
        return sorted(full)

    def describe(self) -> str:
        sched = f"nonuniform(center={self.center:g}, power={self.power:g})" if self.schedule == "nonuniform" else "uniform"
        return (f"interval {self.interval}, branch {self.branch}, {sched}, window [{self.start_percent:g}, "
                f"{self.end_percent:g}), final full {self.final_full_steps}, cache_device {self.cache_device}")


# ---------------------------------------------------------------- branch plan

@dataclass(frozen=True)
class BranchPlan:
    """Which blocks a cache step runs for one branch of one UNet."""

    branch: int
    n_blocks: int
    skip_input: tuple[int, ...]
    skip_output: tuple[int, ...]
    entry_output: int  # k: first recomputed output block; its incoming h is the cached tensor

    @property
    def run_input(self) -> tuple[int, ...]:
        return tuple(range(self.branch + 1))

    @property
    def run_output(self) -> tuple[int, ...]:
        return tuple(range(self.entry_output, self.n_blocks))

    def describe(self, down: str = "input_blocks", up: str = "output_blocks", mid: str = "middle_block") -> str:
        """One line; ``down`` / ``up`` / ``mid`` name the host's block lists (ComfyUI's by default)."""
        k, n = self.entry_output, self.n_blocks
        return (f"branch {self.branch}: cache steps run {down}[0..{self.branch}], {up}[{k}..{n - 1}] and "
                f"the head; skip {down}[{self.branch + 1}..{n - 1}], {mid}"
                + (f", {up}[0..{k - 1}]" if k > 0 else "") + f"; cached: h entering {up}[{k}]")


def plan_for_blocks(n_blocks: int, branch: int, what: str = "UNet") -> BranchPlan:
    """The plan of ``branch`` for a UNet with ``n_blocks`` down and ``n_blocks`` up blocks."""
    n = int(n_blocks)
    if branch > n - 1:
        raise DeepCacheError(f"deepcache branch {branch} is too deep for this {what} ({n} input blocks: branch "
                             f"0..{n - 1}). Fix: use branch 0 (fastest) to {n - 1}.")
    k = n - 1 - branch
    return BranchPlan(branch=branch, n_blocks=n, skip_input=tuple(range(branch + 1, n)), skip_output=tuple(range(k)),
                      entry_output=k)
