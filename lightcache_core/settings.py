"""The DiT cache settings a user sets, shared by every host adapter.

The ComfyUI nodes (``nodes/dit_cache.CacheConfig``) and the diffusers adapter
(``diffusers_adapter/config.DitCacheConfig``) take the same settings with the
same defaults and meaning; each adds what its host knows about the model's
blocks and raises its own error type. This module owns the fields, their
validation and their translation into the engine's ``EngineConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass

from .engine import EngineConfig
from .policy import GRANULARITIES

DIT_MODES = ("off", "step", "cfg", "block", "mix")
# the node input / keyword -> ``CacheStore`` placement
CACHE_DEVICES = {"auto": "auto", "gpu": "device", "cpu": "cpu"}


def cached_block_range(length: int, first: int, last: int) -> tuple[int, int] | None:
    """``(start, end)`` (end exclusive) of the middle blocks block reuse skips, in a run of ``length`` blocks
    with ``first`` blocks always computed before it and ``last`` after it. On a model too shallow for both,
    ``last`` then ``first`` shrink so that at least one block is cached; None when no block is left."""
    while length - first - last < 1 and last > 0:
        last -= 1
    while length - first - last < 1 and first > 0:
        first -= 1
    if length - first - last < 1:
        return None
    return first, length - last


@dataclass(frozen=True)
class DitCacheSettings:
    """What a user sets for a transformer (DiT) cache (dimensionless unless noted).

    mode: "off" | "step" | "cfg" | "block" | "mix" (mix may choose any of the three).
    threshold: error budget between full computes (``policy.py``); 0 never reuses.
    start_percent / end_percent: part of the run (fraction of steps) where reuse may happen.
    cache_device: "auto" | "gpu" | "cpu" (``CacheStore`` placement, see ``CACHE_DEVICES``).
    warmup_steps / final_compute_steps: steps that always compute at the start / end.
    max_consecutive_reuse: safety cap on reuses in a row (0 = none); the threshold ends runs.
    block_first / block_last: blocks always computed before / after the cached range.
    extrapolation: damping of the first-order prediction of reused outputs (0 = hold).

    Invalid values raise ``ValueError``; adapters re-raise it as their own error type.
    """

    mode: str = "mix"
    threshold: float = 0.6
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache_device: str = "auto"
    warmup_steps: int = 3
    final_compute_steps: int = 1
    max_consecutive_reuse: int = 8
    block_first: int = 1
    block_last: int = 1
    extrapolation: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in DIT_MODES:
            raise ValueError(f"cache_mode {self.mode!r} is not one of {DIT_MODES}.")
        if self.cache_device not in CACHE_DEVICES:
            raise ValueError(f"cache_device {self.cache_device!r} is not one of {tuple(CACHE_DEVICES)}.")
        for name in ("warmup_steps", "final_compute_steps", "max_consecutive_reuse", "block_first", "block_last"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        self.engine_config_for(cached_blocks=0, total_blocks=0)  # the engine validates the rest

    def granularities_for(self, has_block_range: bool) -> tuple[str, ...]:
        """The reuse granularities this mode may choose (block only where the model has a cached range)."""
        wanted = GRANULARITIES if self.mode == "mix" else (self.mode,) if self.mode in GRANULARITIES else ()
        return tuple(g for g in wanted if g != "block" or has_block_range)

    def engine_config_for(self, cached_blocks: int, total_blocks: int) -> EngineConfig:
        """The engine's settings for a model whose block reuse skips ``cached_blocks`` of ``total_blocks``
        (0 cached: no block reuse)."""
        block_cost = 1.0 - cached_blocks / total_blocks if cached_blocks and total_blocks else 1.0
        return EngineConfig(granularities=self.granularities_for(cached_blocks > 0), threshold=float(self.threshold),
                            start_percent=self.start_percent, end_percent=self.end_percent,
                            warmup_steps=self.warmup_steps, final_compute_steps=self.final_compute_steps,
                            max_consecutive_reuse=self.max_consecutive_reuse, extrapolation=self.extrapolation,
                            block_cost=block_cost, placement=CACHE_DEVICES[self.cache_device])
