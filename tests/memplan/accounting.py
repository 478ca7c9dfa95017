"""Device bytes a cache adds, from the real ``CacheStore`` placement logic fed with the real entry shapes.

The caching engines decide per evaluation with ``.item()`` reads that fake tensors
cannot serve, so ``make memplan`` does not run them. Instead:

* :func:`lightcache_entries` describes what the LightCache engine stores in one
  run (one :class:`EntrySpec` per store entry, with the reuse distance the engine
  hands ``CacheStore.put``), plus the tensors the engine itself keeps on the
  device while a computed evaluation runs (:class:`WorkingSpec`);
* :func:`cache_footprint` puts those entries (shapes only: fake tensors) into a
  real ``CacheStore`` with the run's ``cache_device`` and the device's free
  memory, and reads back where each landed.

:func:`lightcache_entries` asks the engine itself (``lightcache_core.engine.planned_entries``),
so memplan follows the engine without changes here.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from lightcache_core import CacheStore, StoreConfig

CACHE_DEVICES = {"gpu": "device", "cpu": "cpu", "auto": "auto"}  # node input -> StoreConfig.placement


@dataclass(frozen=True)
class EntrySpec:
    """One store entry: ``kind`` ("step"/"cfg"/"block"/...), key, shape, dtype, and the reuse
    distance the engine passes to ``put`` (evaluations until it is read; ``math.inf``: the
    default policy may never read it; None: no hint)."""

    kind: str
    key: tuple
    shape: tuple
    dtype: torch.dtype
    reuse_distance: float | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class WorkingSpec:
    """A tensor the engine itself holds on the compute device during a computed evaluation."""

    name: str
    shape: tuple
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Footprint:
    """Where a run's cache lives: bytes on the device for the whole run (``resident``), on the host,
    what a reuse evaluation brings back to the device (``prefetch_by_kind``), and the engine's
    device working set during computed evaluations (``working``)."""

    resident: int = 0
    host: int = 0
    working: int = 0
    prefetch_by_kind: dict = field(default_factory=dict)
    placements: list = field(default_factory=list)  # (key, residence, reason)

    @property
    def transient(self) -> int:
        """Device bytes a reuse evaluation adds at most: the largest kind's prefetched copies."""
        return max(self.prefetch_by_kind.values(), default=0)


def lightcache_entries(mode: str, latent_shape: tuple, hidden_shape: tuple, branches: int, *,
                       model_dtype: torch.dtype = torch.bfloat16, latent_dtype: torch.dtype = torch.float32,
                       block_forecast: bool | None = None) -> tuple[list[EntrySpec], list[WorkingSpec]]:
    """What LightCache (``mode``: mix/step/cfg/block) stores in a run with ``branches`` CFG branches,
    from the engine's own description (``lightcache_core.engine.planned_entries``).

    latent_shape: one branch's latent ``[1, C, T, H, W]`` (ComfyUI samples latents in float32);
    hidden_shape: one branch's hidden state at the cached block range ``[1, tokens, dim]``.
    block_forecast: whether computes store a block residual; by default only in ``block`` mode (on
    the trained tiny Wan ``mix`` at its defaults never forecast block reuse: its calibrated error
    starts pessimistic, see the engine).
    """
    from lightcache_core.engine import EngineConfig, planned_entries
    from lightcache_core.policy import GRANULARITIES

    granularities = GRANULARITIES if mode == "mix" else (mode,)
    if block_forecast is None:
        block_forecast = mode == "block"
    config = EngineConfig(granularities=granularities)
    entries, working = planned_entries(config, latent_shape, latent_dtype, hidden_shape, model_dtype, branches,
                                       block_forecast=block_forecast)
    return ([EntrySpec(kind, key, shape, dtype, distance) for kind, key, shape, dtype, distance in entries],
            [WorkingSpec(name, shape, dtype) for name, shape, dtype in working])


def easycache_entries(latent_shape: tuple, branches: int, *, model_dtype: torch.dtype = torch.bfloat16):
    """ComfyUI's EasyCache: one ``output - x`` diff per branch, kept on the device (its own
    ``offload_cache_diff`` is off); traced for real in memplan, listed here for the validation."""
    return [EntrySpec("easycache", ("diff", b), tuple(latent_shape), model_dtype, 1) for b in range(branches)]


def cache_footprint(entries: list[EntrySpec], cache_device: str, *, free_bytes: int | None = None,
                    working: list[WorkingSpec] = (), config: StoreConfig | None = None) -> Footprint:
    """Put ``entries`` (shapes only) into a real ``CacheStore`` and read back where they live.

    cache_device: the node input ("gpu"/"cpu"/"auto"). free_bytes: device memory the run has
    left at the moments the engine stores (``auto`` reads it; None: unknown). The store runs on
    a CPU compute device, where placement is logical and nothing is copied; fake tensors keep it
    from allocating anything.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    placement = CACHE_DEVICES.get(cache_device, cache_device)
    if config is None:
        config = StoreConfig(placement=placement)
    reader = (lambda: free_bytes) if free_bytes is not None else None
    store = CacheStore("cpu", config, free_memory=reader)
    with FakeTensorMode():
        for e in entries:
            store.put(e.key, torch.empty(e.shape, dtype=e.dtype), reuse_distance=e.reuse_distance)
    fp = Footprint(working=sum(w.nbytes for w in working))
    prefetch: Counter = Counter()
    for e in entries:
        where = store.where(e.key)
        if where == "device":
            fp.resident += store.nbytes(e.key)
        else:
            fp.host += store.nbytes(e.key)
            prefetch[e.kind] += store.nbytes(e.key)
    fp.prefetch_by_kind = dict(prefetch)
    fp.placements = [(k, r, why) for k, r, why in store.placements]
    store.clear()
    return fp
