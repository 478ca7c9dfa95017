"""LightCache for diffusers: the core engine and DeepCache driven through diffusers' ``HookRegistry``.

The ComfyUI nodes are one host adapter of ``lightcache_core``; this module is the
second. It decides nothing itself: per denoiser call it asks the same
``HybridEngine`` (``engine.py``) the ComfyUI glue (``nodes/dit_cache.py``) asks,
and caches in the same ``CacheStore`` with the same ``cache_device`` choice; the
UNet path runs the same ``DeepCacheSettings`` schedule and branch plan
(``deepcache.py``) as ``nodes/unet_cache.py``.

Importing this module imports neither diffusers nor ComfyUI; diffusers is imported
when a cache is applied (``pip install lightcache[diffusers]``).

Use::

    from lightcache_core.diffusers_adapter import apply_lightcache

    cache = apply_lightcache(pipe)            # WanPipeline: mode "mix"; SVD / AnimateDiff: "deepcache"
    video = pipe(...).frames
    print(cache.last_report.to_text())        # what each evaluation did
    cache.remove()                            # the pipeline is as before

What is hooked (one ``ModelHook`` class per concern, all under names starting
``lightcache``, removed by ``LightCacheHandle.remove``):

* DiTs (``WanTransformer3DModel``; any model whose blocks are a ``blocks`` /
  ``transformer_blocks`` ``ModuleList`` of blocks that take and return one hidden
  state): ``LightCacheDenoiserHook`` on the model decides per call. diffusers'
  Wan pipelines call the transformer once per CFG branch inside
  ``cache_context("cond")`` / ``cache_context("uncond")``; the two calls of a step
  are one engine evaluation with branches 0 (cond) and 1 (uncond): the decision is
  taken at the step's first call, ``step`` reuse runs neither call, ``cfg`` reuse
  runs the cond call and rebuilds the uncond output, ``block`` and ``compute`` run
  both. A call outside any cache context (a batched-CFG pipeline, a direct model
  call) is one branch holding all its rows. ``LightCacheBlockHook`` on each block
  of the list reports to the engine's ``BlockReuse`` and skips the cached range.
* UNets (``UNetSpatioTemporalConditionModel`` for SVD, ``UNet2DConditionModel`` and
  ``UNetMotionModel`` for AnimateDiff): ``DeepCacheStepHook`` on the model picks
  full or cache step from the schedule; ``DeepCacheSkipHook`` on every skipped down
  / mid / up block returns an empty placeholder in cache steps (the UNet's own
  loop then only moves empty tensors); ``DeepCacheEntryHook`` on the first
  recomputed up block stores, or puts back, the hidden state entering it.
* ``AutoencoderKLWan``: ``sliced_wan_decode`` (and ``enable_sliced_decode``, which
  makes ``vae.decode`` use it) decodes latent frame by latent frame with the
  VAE's causal cache carried across calls, writing each slice into a
  preallocated output: the same frames as ``vae.decode``.

Step indices come from the ``CacheContext`` diffusers pipelines pass
(``step_index``, ``num_inference_steps``, ``sigma``), else from the pipeline's
scheduler (the call's timestep looked up in ``scheduler.timesteps``); a call
whose step cannot be placed runs uncached (with a note in the report).
A run ends when the pipeline resets stateful hooks after its call (Wan), after
the last step's calls, or when a call's step index goes back (a new run): no
state survives from one pipeline call to the next.

Modules, one concept each: ``config`` (names, ``DitCacheConfig``, the error),
``hooks`` (diffusers' hook framework, lazily; registering and removing hooks),
``arguments`` (a forward call's arguments and output packing), ``clock`` (the
step clock), ``dit`` (the engine per transformer call), ``unet`` (DeepCache per
UNet call), ``wan_vae`` (the sliced Wan decode), ``apply`` (``apply_lightcache``,
``LightCacheHandle``).
"""

from .apply import LightCacheHandle, apply_lightcache, remove_lightcache
# Re-exported: the names users and tests reach through this package.
from .config import (  # noqa: F401
    BLOCK_HOOK,
    BLOCK_LISTS,
    BRANCH_IDS,
    DEEPCACHE_ENTRY_HOOK,
    DEEPCACHE_SKIP_HOOK,
    DEEPCACHE_STEP_HOOK,
    DENOISER_HOOK,
    DIT_MODES,
    HOOK_PREFIX,
    MAX_REPORTS,
    UNET_MODES,
    DitCacheConfig,
    LightCacheDiffusersError,
)
from .wan_vae import _SlicedDecode, disable_sliced_decode, enable_sliced_decode, sliced_wan_decode  # noqa: F401

__all__ = ["DitCacheConfig", "LightCacheDiffusersError", "LightCacheHandle", "apply_lightcache",
           "disable_sliced_decode", "enable_sliced_decode", "remove_lightcache", "sliced_wan_decode"]
