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

**For the engine**: when the engine can describe what it will store (a list of
``EntrySpec``/``WorkingSpec``, e.g. ``engine.planned_entries(latent_shape,
hidden_shape, branches)``), point :func:`lightcache_entries` at it; memplan then
follows the engine without further changes. Until then the description below
follows ``nodes/dit_cache.py`` as of this commit (see its docstring).
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
                       model_dtype: torch.dtype = torch.bfloat16) -> tuple[list[EntrySpec], list[WorkingSpec]]:
    """What LightCache (``mode``: mix/step/cfg/block) stores in a run with ``branches`` CFG branches.

    latent_shape: one branch's latent ``[1, C, T, H, W]``; hidden_shape: one branch's hidden
    state at the cached block range ``[1, tokens, dim]``.

    From ``nodes/dit_cache.py``: after every computed evaluation
    * ``("step", uuid)`` per branch: DiT output minus input, a latent in the model dtype
      (read by the next evaluation when it reuses the step);
    * ``("cfg", b)`` per non-cond branch: (cond - branch) / sigma of the fp32 outputs
      ``calc_cond_batch`` returns (read when an evaluation reuses the CFG branch);
    * ``("block", uuid)`` per branch, in block/mix modes: the middle-blocks residual, a hidden
      state in the model dtype. Under ``mix`` the default policy picks step reuse first and
      rarely reaches block reuse ("On this fixture mix only ever chose whole-step reuse"), so
      its reuse distance is unbounded (``math.inf``);
    * working set: in block/mix modes the input of the first cached block is held (one view
      of the batched hidden state) from that block to the last cached block.
    """
    entries: list[EntrySpec] = []
    working: list[WorkingSpec] = []
    for b in range(branches):
        entries.append(EntrySpec("step", ("step", b), tuple(latent_shape), model_dtype, 1))
    for b in range(1, branches):
        entries.append(EntrySpec("cfg", ("cfg", b), tuple(latent_shape), torch.float32, 1))
    if mode in ("mix", "block"):
        distance = 1 if mode == "block" else math.inf
        for b in range(branches):
            entries.append(EntrySpec("block", ("block", b), tuple(hidden_shape), model_dtype, distance))
        batched = (hidden_shape[0] * branches,) + tuple(hidden_shape[1:])
        working.append(WorkingSpec("input of the first cached block", batched, model_dtype))
    return entries, working


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
