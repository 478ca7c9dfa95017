"""LightCache core: model-agnostic building blocks for memory-efficient diffusion caching.

Pure PyTorch (plus einops/stdlib); never imports ComfyUI, so it can be tested and
reused on its own.  The ComfyUI nodes in ``nodes/`` wire these pieces into models.

Modules:
    cache_store  keyed feature cache; device or pinned-host placement with async
                 side-stream swapping (LightCache "asynchronous cache swapping").
    pinned_pool  reusable pinned host buffers used by the store.
    chunking     exact row-chunked execution into a preallocated output ("feature chunk").
    schedules    DeepCache uniform / non-uniform full-step schedules, reuse windows,
                 accumulated-change gate, sigma -> step index.
    policy       MixCache-style choice between step / CFG / block reuse.
    report       per-run evaluation records, timelines and summaries.
    metrics      PSNR / SSIM against an uncached reference.
"""

from .cache_store import CacheStats, CacheStore, Placement, StoreConfig
from .chunking import ChunkPolicy, balanced_pieces, plan_chunk_rows, run_chunked
from .memory_probe import PeakMemory
from .metrics import psnr, ssim
from .pinned_pool import PinnedBufferPool, PooledBuffer
from .policy import REUSE_ORDER, Granularity, MixPolicyConfig, choose_granularity, estimated_error
from .report import DEFAULT_COSTS, GRANULARITY_CODES, DecodeReport, EvalRecord, RunReport, format_bytes
from .schedules import (
    AccumulatedChange,
    StepWindow,
    nonuniform_full_steps,
    relative_l1,
    step_index_for_sigma,
    uniform_full_steps,
)

__all__ = [
    "AccumulatedChange",
    "PeakMemory",
    "balanced_pieces",
    "CacheStats",
    "CacheStore",
    "ChunkPolicy",
    "DEFAULT_COSTS",
    "DecodeReport",
    "EvalRecord",
    "GRANULARITY_CODES",
    "Granularity",
    "MixPolicyConfig",
    "PinnedBufferPool",
    "Placement",
    "PooledBuffer",
    "REUSE_ORDER",
    "RunReport",
    "StepWindow",
    "StoreConfig",
    "choose_granularity",
    "estimated_error",
    "format_bytes",
    "nonuniform_full_steps",
    "plan_chunk_rows",
    "psnr",
    "relative_l1",
    "run_chunked",
    "ssim",
    "step_index_for_sigma",
    "uniform_full_steps",
]
