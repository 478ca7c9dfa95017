"""LightCache core: model-agnostic building blocks for memory-efficient diffusion caching.

Pure PyTorch (plus einops/stdlib); never imports ComfyUI, so it can be tested and
reused on its own.  The ComfyUI nodes in ``nodes/`` wire these pieces into models.

Modules:
    cache_store  keyed feature cache; device or pinned-host placement with async
                 side-stream swapping (LightCache "asynchronous cache swapping").
    pinned_pool  reusable pinned host buffers used by the store.
    chunking     exact row-chunked execution into a preallocated output ("feature chunk").
    schedules    DeepCache uniform / non-uniform full-step schedules, reuse windows,
                 sigma -> step index.
    signals      per-granularity error signals (step, CFG, block) kept on the device.
    policy       the hybrid decision: cheapest reuse whose predicted error fits the budget.
    extrapolation  damped first-order prediction of a skipped model output.
    engine       the hybrid cache of one run: trajectories, decision, step/cfg/block reuse.
    report       per-run evaluation records, timelines and summaries.
    metrics      PSNR / SSIM against an uncached reference.
"""

from .cache_store import CacheStats, CacheStore, Placement, StoreConfig
from .chunking import ChunkPolicy, balanced_pieces, plan_chunk_rows, run_chunked
from .memory_probe import PeakMemory
from .metrics import psnr, ssim
from .pinned_pool import PinnedBufferPool, PooledBuffer
from .engine import Decision, EngineConfig, Evaluation, HybridEngine, Trajectory
from .extrapolation import extrapolate, slope
from .policy import GRANULARITIES, HybridPolicy, choose_granularity, forecast_reuse
from .report import DEFAULT_COSTS, GRANULARITY_CODES, DecodeReport, EvalRecord, RunReport, format_bytes
from .schedules import StepWindow, nonuniform_full_steps, step_index_for_sigma, uniform_full_steps
from .signals import BlockSignals, TrajectorySignals

__all__ = [
    "BlockSignals",
    "PeakMemory",
    "balanced_pieces",
    "CacheStats",
    "CacheStore",
    "ChunkPolicy",
    "DEFAULT_COSTS",
    "Decision",
    "DecodeReport",
    "EngineConfig",
    "Evaluation",
    "EvalRecord",
    "GRANULARITY_CODES",
    "GRANULARITIES",
    "HybridEngine",
    "HybridPolicy",
    "PinnedBufferPool",
    "Placement",
    "PooledBuffer",
    "RunReport",
    "StepWindow",
    "StoreConfig",
    "choose_granularity",
    "extrapolate",
    "forecast_reuse",
    "format_bytes",
    "nonuniform_full_steps",
    "plan_chunk_rows",
    "psnr",
    "run_chunked",
    "ssim",
    "slope",
    "step_index_for_sigma",
    "Trajectory",
    "TrajectorySignals",
    "uniform_full_steps",
]
