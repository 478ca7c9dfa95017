"""The adapter's names (modes, hook names) and its DiT settings, and the error it raises."""
from __future__ import annotations

from dataclasses import dataclass

from ..deepcache import PLACEMENT
from ..engine import EngineConfig
from ..policy import GRANULARITIES


DIT_MODES = ("off", "step", "cfg", "block", "mix")
UNET_MODES = ("off", "deepcache")
HOOK_PREFIX = "lightcache"
DENOISER_HOOK = "lightcache_denoiser"
BLOCK_HOOK = "lightcache_block"
DEEPCACHE_STEP_HOOK = "lightcache_deepcache_step"
DEEPCACHE_SKIP_HOOK = "lightcache_deepcache_skip"
DEEPCACHE_ENTRY_HOOK = "lightcache_deepcache_entry"
BLOCK_LISTS = ("blocks", "transformer_blocks")
BRANCH_IDS = {"cond": 0, "uncond": 1}
MAX_REPORTS = 16


class LightCacheDiffusersError(ValueError):
    """A model, pipeline or setting the adapter cannot serve; the message names the fix."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DitCacheConfig:
    """The DiT settings, with the defaults (and meaning) of the ComfyUI sampler's inputs.

    mode: "mix" | "step" | "cfg" | "block" ("off" installs nothing).
    threshold: error budget between full computes; 0 never reuses.
    cache_device: "auto" | "gpu" | "cpu" (``CacheStore`` placement "auto" | "device" | "cpu").
    block_first / block_last: blocks always computed before / after the cached range.
    The rest: see ``engine.EngineConfig``.
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
            raise LightCacheDiffusersError(f"mode {self.mode!r} is not one of {DIT_MODES} for a transformer.")
        if self.cache_device not in PLACEMENT:
            raise LightCacheDiffusersError(f"cache_device {self.cache_device!r} is not one of {tuple(PLACEMENT)}.")
        for name in ("warmup_steps", "final_compute_steps", "max_consecutive_reuse", "block_first", "block_last"):
            if getattr(self, name) < 0:
                raise LightCacheDiffusersError(f"{name} must be >= 0, got {getattr(self, name)}.")
        try:
            self.engine_config(n_blocks=0)
        except ValueError as exc:
            raise LightCacheDiffusersError(str(exc)) from exc

    def block_range(self, n_blocks: int) -> tuple[int, int] | None:
        """(start, end) of the cached range, end exclusive; as the ComfyUI glue shrinks it on shallow models."""
        first, last = self.block_first, self.block_last
        while n_blocks - first - last < 1 and last > 0:
            last -= 1
        while n_blocks - first - last < 1 and first > 0:
            first -= 1
        if n_blocks - first - last < 1:
            return None
        return first, n_blocks - last

    def granularities(self, n_blocks: int) -> tuple[str, ...]:
        wanted = GRANULARITIES if self.mode == "mix" else (self.mode,) if self.mode in GRANULARITIES else ()
        return tuple(g for g in wanted if g != "block" or self.block_range(n_blocks) is not None)

    def engine_config(self, n_blocks: int) -> EngineConfig:
        rng = self.block_range(n_blocks)
        block_cost = 1.0 - (rng[1] - rng[0]) / n_blocks if rng is not None and n_blocks else 1.0
        return EngineConfig(granularities=self.granularities(n_blocks), threshold=float(self.threshold),
                            start_percent=self.start_percent, end_percent=self.end_percent,
                            warmup_steps=self.warmup_steps, final_compute_steps=self.final_compute_steps,
                            max_consecutive_reuse=self.max_consecutive_reuse, extrapolation=self.extrapolation,
                            block_cost=block_cost, placement=PLACEMENT[self.cache_device])
