"""The adapter's names (modes, hook names) and its DiT settings, and the error it raises."""
from __future__ import annotations

from dataclasses import dataclass

from ..engine import EngineConfig
from ..settings import DIT_MODES, DitCacheSettings, cached_block_range  # noqa: F401 (DIT_MODES re-exported)

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
class DitCacheConfig(DitCacheSettings):
    """The DiT settings (``settings.DitCacheSettings``: the defaults and meaning of the ComfyUI sampler's
    inputs); the cached range is counted in the model's one block list of ``n_blocks`` blocks."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise LightCacheDiffusersError(str(exc)) from exc

    def block_range(self, n_blocks: int) -> tuple[int, int] | None:
        """(start, end) of the cached range, end exclusive; as the ComfyUI glue shrinks it on shallow models."""
        return cached_block_range(n_blocks, self.block_first, self.block_last)

    def granularities(self, n_blocks: int) -> tuple[str, ...]:
        return self.granularities_for(self.block_range(n_blocks) is not None)

    def engine_config(self, n_blocks: int) -> EngineConfig:
        rng = self.block_range(n_blocks)
        return self.engine_config_for(rng[1] - rng[0] if rng is not None else 0, n_blocks)
