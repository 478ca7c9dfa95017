"""Keyed feature cache with optional asynchronous offload to pinned host memory.

One ``CacheStore`` holds the tensors a caching scheme needs between steps (DeepCache
branch features, step residuals, CFG deltas...).  Each entry lives either on the
compute device or in host RAM:

* ``device`` entries keep a reference to the tensor (no copy unless ``storage_dtype``
  converts it).
* ``host`` entries on CUDA are copied device->host on a dedicated side stream into a
  reusable host buffer (pinned, ``non_blocking``), and copied back host->device on the
  same side stream by ``prefetch``; ``get`` only makes the consumer's stream wait on the
  copy's event, so transfers overlap compute and the host never blocks (unless
  ``StoreConfig.measure_waits`` asks it to, for timing).
* The device buffer a prefetch fills is allocated from the *compute* stream's memory
  pool (the side stream first waits for the compute work enqueued before the prefetch,
  which may still be using that block).  When it is released the block goes back to
  the pool the model's activations come from, so reserved device memory stays flat;
  nothing is ever allocated on the side stream.
* Where host buffers come from is an injected ``HostAllocator`` (``pinned_pool``): by
  default torch-pinned memory, or an application's pinned-memory budget with a
  pageable fallback and a note (``CacheStore.notes``) when that budget is spent.
* On a CPU compute device the host *is* the device: entries keep the placement they
  were given (so reports and tests read the same on CPU and CUDA) but no copy is made.

The store is a context manager; leaving the ``with`` block (also on an exception)
drops every entry and releases all pinned memory.

Contract for callers: do not modify a tensor in place after ``put``-ing it (the
device->host copy may still be reading it, and device entries alias it), and do not
modify tensors returned by ``get`` in place (they may alias the stored entry).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Literal

import torch

from .pinned_pool import HostAllocator, PinnedBufferPool, PooledBuffer

Placement = Literal["device", "cpu", "auto"]
Residence = Literal["device", "host"]

_PLACEMENTS = ("device", "cpu", "auto")


@dataclass(frozen=True)
class StoreConfig:
    """How a ``CacheStore`` places and encodes entries.

    placement: ``"device"`` keeps every entry on the compute device, ``"cpu"`` swaps
        every entry to host memory, ``"auto"`` decides per entry (see
        ``CacheStore.put``): an entry stays on the device when the store's device total
        after it fits both ``device_budget_bytes`` and ``free_fraction`` of the device
        memory left to the run, and the entry is read again soon (its reuse distance
        is at most ``near_reuse`` evaluations; without a hint, when it is smaller than
        ``offload_min_bytes``); otherwise it is swapped to host.
    storage_dtype: optional narrower floating dtype (``torch.float16``/``bfloat16``) to
        store floating tensors in; ``get`` converts back to the original dtype.  Only
        applied when it is narrower than the input dtype.  Rounding error per element
        (round-to-nearest, values in the normal range): relative error <= 2**-11 for
        float16 (normal range 6.1e-5 .. 65504) and <= 2**-8 for bfloat16.  On a CPU
        compute device the conversion costs one converted copy of the tensor.
    device_budget_bytes: bytes the ``auto`` placement may keep on the device (a hard cap).
    offload_min_bytes: ``auto``, entries put *without* a reuse hint: those of at least
        this many bytes are swapped (entries with a hint ignore it).
    free_fraction: ``auto``: the store keeps on the device at most this fraction of
        the device memory left to the run (free memory at ``put`` time plus what the
        store already keeps there).  Needs a free-memory reader (CUDA has one built in);
        without one only ``device_budget_bytes`` applies.
    near_reuse: ``auto``: entries read again within this many evaluations stay on the
        device (when they fit); entries read later, or never (``math.inf``), go to host.
    measure_waits: when True, ``get`` blocks the host on the prefetch event and adds
        the blocked seconds to ``CacheStats.prefetch_wait_s``; when False the wait is
        enqueued on the stream only (no host blocking) and is not measured.
    """

    placement: str = "auto"
    storage_dtype: torch.dtype | None = None
    device_budget_bytes: int = 512 * 2**20
    offload_min_bytes: int = 4 * 2**20
    measure_waits: bool = False
    free_fraction: float = 0.25
    near_reuse: float = 2

    def __post_init__(self) -> None:
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {self.placement!r}")
        if self.storage_dtype is not None:
            if not isinstance(self.storage_dtype, torch.dtype):
                raise ValueError(f"storage_dtype must be a torch.dtype or None, got {self.storage_dtype!r}")
            if not self.storage_dtype.is_floating_point:
                raise ValueError(f"storage_dtype must be a floating dtype, got {self.storage_dtype}")
        for name in ("device_budget_bytes", "offload_min_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int (bytes), got {value!r}")
        if not isinstance(self.measure_waits, bool):
            raise ValueError(f"measure_waits must be a bool, got {self.measure_waits!r}")
        if isinstance(self.free_fraction, bool) or not isinstance(self.free_fraction, (int, float)) \
                or not 0.0 <= self.free_fraction <= 1.0:
            raise ValueError(f"free_fraction must be a number in [0, 1], got {self.free_fraction!r}")
        if isinstance(self.near_reuse, bool) or not isinstance(self.near_reuse, (int, float)) or self.near_reuse < 0:
            raise ValueError(f"near_reuse must be a non-negative number of evaluations, got {self.near_reuse!r}")


@dataclass
class CacheStats:
    """Counters of one store.  Bytes are bytes; times are seconds.

    hits / misses: ``get`` calls that found / did not find the key.
    puts: ``put`` calls.  entries: entries held now.
    device_bytes: bytes held on the compute device now (device entries plus device
        copies of host entries handed out by ``prefetch``/``get`` and not yet released).
    peak_device_bytes: maximum of ``device_bytes`` over the store's life.
    host_bytes: bytes of host-resident entries now.
    bytes_to_host / bytes_to_device: bytes actually copied in each direction.
    prefetches: host->device copies started by ``prefetch``.
    late_prefetches: host->device copies ``get`` had to start itself (no prefetch).
    prefetch_wait_s: seconds ``get`` blocked on in-flight copies (only measured with
        ``StoreConfig.measure_waits``).
    pinned_host_bytes / pageable_host_bytes: host buffer bytes (entries and idle pool
        buffers) that are page-locked / pageable now (CUDA only; 0 elsewhere).
    pageable_fallbacks: host buffers that had to be pageable because the pinned-memory
        budget was spent (see ``CacheStore.notes``).
    """

    hits: int = 0
    misses: int = 0
    puts: int = 0
    entries: int = 0
    device_bytes: int = 0
    peak_device_bytes: int = 0
    host_bytes: int = 0
    bytes_to_host: int = 0
    bytes_to_device: int = 0
    prefetches: int = 0
    late_prefetches: int = 0
    prefetch_wait_s: float = 0.0
    pinned_host_bytes: int = 0
    pageable_host_bytes: int = 0
    pageable_fallbacks: int = 0

    def as_dict(self) -> dict:
        """Plain-dict copy (JSON-serialisable)."""
        return asdict(self)


@dataclass
class _Entry:
    residence: Residence
    original_dtype: torch.dtype
    stored_nbytes: int
    # Device residence, or host residence on a CPU compute device: the stored tensor.
    resident: torch.Tensor | None = None
    # Host residence on CUDA: host buffer (with the event of its last copy).
    pinned: PooledBuffer | None = None
    # Host residence on other accelerators: plain host tensor (synchronous copies).
    host: torch.Tensor | None = None
    # Host residence: copy on the compute device made by prefetch/get, until released.
    device_copy: torch.Tensor | None = None
    device_copy_ready: object | None = None  # torch.cuda.Event of the host->device copy
    device_copy_stream: object | None = None  # the stream whose pool the device copy came from


def _normalize_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class CudaStreamOps:
    """Every CUDA stream, event and copy call the store makes, in one place.

    Tests substitute a recorder with the same methods to check the order of calls
    on a machine without a GPU (``tests/core/test_cache_store.py``).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.side = torch.cuda.Stream(device=device)

    def current_stream(self):
        return torch.cuda.current_stream(self.device)

    def use(self, stream):
        """Context manager: make ``stream`` current."""
        return torch.cuda.stream(stream)

    def new_event(self):
        return torch.cuda.Event()

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A device buffer from the pool of the stream that is current now."""
        return torch.empty(shape, dtype=dtype, device=self.device)

    def to_device(self, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=dtype)

    def is_on_device(self, tensor: torch.Tensor) -> bool:
        return tensor.device == self.device

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src, non_blocking=True)

    def record_stream(self, tensor: torch.Tensor, stream) -> None:
        tensor.record_stream(stream)


def cuda_free_bytes(device: torch.device) -> int:
    """Device memory a run can still use: free memory plus what the allocator caches unused."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


class CacheStore:
    """Keyed tensor cache for one sampling run (see module docstring).

    compute_device: device the consumers run on; ``get`` returns tensors there.
    Keys are any hashable, e.g. ``("block", (2, 5), run_uuid, "cond")``.
    Tensors may have any shape; ``get`` returns the same shape and original dtype.

    Optional keyword arguments (all additive):

    free_memory: ``() -> int``, bytes of device memory the run can still use, read
        by ``auto`` placement at each ``put`` (default on CUDA: ``cuda_free_bytes``;
        elsewhere none, and only ``device_budget_bytes`` caps ``auto``).
    host_allocator: where host buffers come from on CUDA (``pinned_pool.HostAllocator``;
        default: torch-pinned memory).  Pass a ``BudgetedHostAllocator`` to share an
        application's pinned-memory budget.
    stream_ops: the CUDA call surface (default ``CudaStreamOps``); tests only.
    """

    def __init__(self, compute_device: torch.device | str, config: StoreConfig = StoreConfig(), *,
                 free_memory: Callable[[], int] | None = None, host_allocator: HostAllocator | None = None,
                 stream_ops: object | None = None) -> None:
        self.compute_device = _normalize_device(compute_device)
        self.config = config
        self._entries: dict[Hashable, _Entry] = {}
        self._stats = CacheStats()
        self._resident_device_bytes = 0  # device-placed entries only (the auto budget)
        self._copy_device_bytes = 0  # device copies of host entries
        self._host_bytes = 0
        self._is_cuda = self.compute_device.type == "cuda"
        self._host_is_device = self.compute_device.type == "cpu"
        self._ops = None
        self._pool = None
        if self._is_cuda:
            self._ops = stream_ops if stream_ops is not None else CudaStreamOps(self.compute_device)
            self._pool = PinnedBufferPool(allocator=host_allocator)
            if free_memory is None and stream_ops is None:
                device = self.compute_device
                free_memory = lambda: cuda_free_bytes(device)  # noqa: E731
        self._free_memory = free_memory
        self.placements: list[tuple[Hashable, Residence, str]] = []  # (key, residence, reason) of recent puts
        self._max_placements = 64

    # ------------------------------------------------------------------ queries
    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._entries))

    def keys(self) -> list[Hashable]:
        """Keys currently stored (a copy)."""
        return list(self._entries)

    def nbytes(self, key: Hashable) -> int:
        """Bytes of the stored representation of ``key`` (after ``storage_dtype``)."""
        return self._entries[key].stored_nbytes

    def where(self, key: Hashable) -> Residence:
        """``"device"`` or ``"host"``: where the entry for ``key`` is kept."""
        return self._entries[key].residence

    @property
    def stats(self) -> CacheStats:
        """Snapshot of the counters (a copy; mutating it does not affect the store)."""
        pinned = pageable = fallbacks = 0
        if self._pool is not None:
            buffers = [e.pinned for e in self._entries.values() if e.pinned is not None]
            pinned = sum(b.nbytes for b in buffers if b.pinned) + self._pool.idle_bytes(pinned=True)
            pageable = sum(b.nbytes for b in buffers if not b.pinned) + self._pool.idle_bytes(pinned=False)
            fallbacks = self._pool.allocator.pageable_buffers
        return replace(
            self._stats,
            entries=len(self._entries),
            device_bytes=self._device_bytes(),
            host_bytes=self._host_bytes,
            pinned_host_bytes=pinned,
            pageable_host_bytes=pageable,
            pageable_fallbacks=fallbacks,
        )

    @property
    def pinned_bytes(self) -> int:
        """Host bytes held in buffers, by entries and by idle pooled buffers (pinned or pageable fallback)."""
        if self._pool is None:
            return 0
        in_use = sum(e.pinned.nbytes for e in self._entries.values() if e.pinned is not None)
        return in_use + self._pool.idle_bytes()

    @property
    def notes(self) -> list[str]:
        """Lines for a run report: e.g. that the pinned-memory budget was spent and buffers went pageable."""
        return self._pool.allocator.notes if self._pool is not None else []

    def reset_stats(self) -> None:
        """Zero the counters (current byte totals are kept; peak restarts from them)."""
        self._stats = CacheStats(peak_device_bytes=self._device_bytes())

    # ------------------------------------------------------------------ writes
    def put(self, key: Hashable, tensor: torch.Tensor, *, reuse_distance: float | None = None) -> None:
        """Store ``tensor`` (any shape/dtype) under ``key``, replacing an older entry.

        ``reuse_distance`` (optional hint for ``auto`` placement): how many model
        evaluations from now the entry will next be read: 1 = the next evaluation,
        ``math.inf`` = the current policy may never read it, None = unknown.  ``auto``
        keeps the entry on the device when the store's device total after it fits
        ``device_budget_bytes`` and ``free_fraction`` x (free device memory + the
        store's device bytes), and the entry is near (distance <= ``near_reuse``; with
        no hint: smaller than ``offload_min_bytes``); otherwise it goes to host.
        ``placements`` records each decision with its reason.

        Device entries keep a reference (or a converted copy).  Host entries on CUDA
        are copied asynchronously into the key's host buffer (reused when shape and
        dtype match) on the side stream; the source is kept alive for the copy with
        ``record_stream``.  Any device copy handed out for the old entry is released.
        """
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"CacheStore.put expects a torch.Tensor, got {type(tensor).__name__}")
        hash(key)
        if reuse_distance is not None and (isinstance(reuse_distance, bool) or not isinstance(reuse_distance, (int, float))
                                           or reuse_distance < 0 or math.isnan(reuse_distance)):
            raise ValueError(f"reuse_distance must be None or a number of evaluations >= 0, got {reuse_distance!r}")
        stored_dtype = self._stored_dtype(tensor)
        nbytes = tensor.numel() * _itemsize(stored_dtype)
        old = self._entries.get(key)
        residence, reason = self._choose_residence(nbytes, old, reuse_distance)
        self._stats.puts += 1
        self.placements.append((key, residence, reason))
        if len(self.placements) > self._max_placements:
            del self.placements[0]

        reusable_pinned: PooledBuffer | None = None
        if old is not None and old.pinned is not None:
            reusable_pinned, old.pinned = old.pinned, None
        self._discard(key)

        entry = _Entry(residence=residence, original_dtype=tensor.dtype, stored_nbytes=nbytes)
        if residence == "device" or self._host_is_device:
            if self._is_cuda:
                entry.resident = self._ops.to_device(tensor, stored_dtype)
            else:
                entry.resident = tensor.to(device=self.compute_device, dtype=stored_dtype)
        elif self._is_cuda:
            entry.pinned = self._pinned_for(tensor.shape, stored_dtype, reusable_pinned)
            reusable_pinned = None
            self._copy_to_pinned(tensor, stored_dtype, entry.pinned)
        else:
            entry.host = tensor.to(device="cpu", dtype=stored_dtype)
            self._stats.bytes_to_host += nbytes
        if reusable_pinned is not None:
            self._pool.give_back(reusable_pinned)

        self._entries[key] = entry
        if residence == "device":
            self._resident_device_bytes += nbytes
            self._update_peak()
        else:
            self._host_bytes += nbytes

    def prefetch(self, keys: Iterable[Hashable]) -> None:
        """Start host->device copies for host entries among ``keys``.

        On CUDA the copy runs on the side stream into a device buffer taken from the
        compute stream's pool, and returns at once; an entry whose device copy is
        still valid is skipped (the buffer is reused).  Missing keys and device
        entries are ignored.  No-op on CPU.
        """
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.residence != "host" or self._host_is_device:
                continue
            if entry.device_copy is not None:
                continue
            self._start_device_copy(entry)
            self._stats.prefetches += 1

    def get(self, key: Hashable) -> torch.Tensor | None:
        """Tensor for ``key`` on the compute device in its original dtype, or None.

        For host entries on CUDA the current stream waits on the prefetch event (the
        host does not block unless ``measure_waits``); without a prior ``prefetch`` the
        copy is started here and counted in ``late_prefetches``.  The device copy stays
        counted in ``device_bytes`` until ``release(key)``, ``put`` or ``drop``.
        """
        entry = self._entries.get(key)
        if entry is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        if entry.residence == "device" or self._host_is_device:
            stored = entry.resident
        else:
            if entry.device_copy is None:
                self._stats.late_prefetches += 1
                self._start_device_copy(entry)
            if self._is_cuda:
                self._wait_for_device_copy(entry)
            stored = entry.device_copy
        if stored.dtype != entry.original_dtype:
            return stored.to(entry.original_dtype)
        return stored

    def release(self, key: Hashable) -> None:
        """Free the device copy of a host entry once its consumer has been enqueued.

        The block returns to the compute stream's pool; the allocator keeps it until
        the side stream's copy into it is done (``record_stream``).  No-op for device
        entries and missing keys.
        """
        entry = self._entries.get(key)
        if entry is not None:
            self._free_device_copy(entry)

    def drop(self, key: Hashable) -> None:
        """Remove ``key`` (no-op when missing); its host buffer returns to the pool."""
        if key in self._entries:
            self._discard(key)

    def clear(self, release_buffers: bool = True) -> None:
        """Drop every entry; with ``release_buffers`` also free all host buffers.

        On CUDA this waits for the side stream's pending copies (host blocks on the
        side stream only) before host buffers are released (and unpinned).
        """
        for key in list(self._entries):
            self._discard(key)
        if release_buffers and self._pool is not None:
            self._ops.side.synchronize()
            self._pool.release_all()

    def __enter__(self) -> CacheStore:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.clear(release_buffers=True)
        return False

    def __repr__(self) -> str:
        s = self.stats
        return (f"CacheStore(device={self.compute_device}, placement={self.config.placement}, "
                f"entries={s.entries}, device_bytes={s.device_bytes}, host_bytes={s.host_bytes})")

    # ------------------------------------------------------------------ internals
    def _device_bytes(self) -> int:
        return self._resident_device_bytes + self._copy_device_bytes

    def _update_peak(self) -> None:
        self._stats.peak_device_bytes = max(self._stats.peak_device_bytes, self._device_bytes())

    def _stored_dtype(self, tensor: torch.Tensor) -> torch.dtype:
        target = self.config.storage_dtype
        if target is None or not tensor.is_floating_point():
            return tensor.dtype
        # Only narrow: widening wastes memory and bf16<->fp16 trades range for precision.
        return target if _itemsize(target) < tensor.element_size() else tensor.dtype

    def _choose_residence(self, nbytes: int, old: _Entry | None, reuse_distance: float | None) -> tuple[Residence, str]:
        """(residence, reason) for an entry of ``nbytes`` (see ``put``)."""
        config = self.config
        if config.placement == "device":
            return "device", "placement device"
        if config.placement == "cpu":
            return "host", "placement cpu"
        old_device = old.stored_nbytes if old is not None and old.residence == "device" else 0
        resident_after = self._resident_device_bytes - old_device + nbytes
        if resident_after > config.device_budget_bytes:
            return "host", "over device_budget_bytes"
        if self._free_memory is not None:
            # What the run has left: free memory now plus what the store itself already keeps there.
            available = max(int(self._free_memory()), 0) + self._resident_device_bytes - old_device
            if resident_after > config.free_fraction * available:
                return "host", f"over free_fraction of {available} B left on the device"
        if reuse_distance is None:
            if nbytes < config.offload_min_bytes:
                return "device", "no reuse hint, under offload_min_bytes"
            return "host", "no reuse hint, at least offload_min_bytes"
        if reuse_distance <= config.near_reuse:
            return "device", f"read again in {reuse_distance:g} evaluation(s)"
        return "host", f"read again in {reuse_distance:g} evaluations (later than near_reuse)"

    def _discard(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self._free_device_copy(entry)
        if entry.residence == "device":
            self._resident_device_bytes -= entry.stored_nbytes
        else:
            self._host_bytes -= entry.stored_nbytes
        if entry.pinned is not None:
            self._pool.give_back(entry.pinned)
            entry.pinned = None
        entry.resident = entry.host = None

    def _free_device_copy(self, entry: _Entry) -> None:
        if entry.device_copy is not None:
            self._copy_device_bytes -= entry.stored_nbytes
        entry.device_copy = None
        entry.device_copy_ready = None
        entry.device_copy_stream = None

    def _pinned_for(self, shape: torch.Size, dtype: torch.dtype, previous: PooledBuffer | None) -> PooledBuffer:
        if previous is not None and tuple(previous.tensor.shape) == tuple(shape) and previous.tensor.dtype == dtype:
            return previous
        if previous is not None:
            self._pool.give_back(previous)
        return self._pool.acquire(shape, dtype)

    def _copy_to_pinned(self, tensor: torch.Tensor, stored_dtype: torch.dtype, pinned: PooledBuffer) -> None:
        nbytes = tensor.numel() * _itemsize(stored_dtype)
        ops = self._ops
        if not ops.is_on_device(tensor) and tensor.device.type == "cpu":
            # Host source: a plain host copy; the buffer may still feed an async copy.
            if pinned.last_use is not None:
                pinned.last_use.synchronize()
            pinned.tensor.copy_(tensor.to(stored_dtype))
            pinned.last_use = None
            self._stats.bytes_to_host += nbytes
            return
        source = ops.to_device(tensor, stored_dtype)
        current = ops.current_stream()
        side = ops.side
        # The producer of `source` was enqueued on the current stream.
        side.wait_stream(current)
        with ops.use(side):
            if pinned.last_use is not None:
                side.wait_event(pinned.last_use)
            ops.copy(pinned.tensor, source)
            done = ops.new_event()
            done.record(side)
        # Keeps the allocator from recycling `source` before the side stream read it.
        ops.record_stream(source, side)
        pinned.last_use = done
        self._stats.bytes_to_host += nbytes

    def _start_device_copy(self, entry: _Entry) -> None:
        if self._is_cuda:
            ops = self._ops
            side = ops.side
            pinned = entry.pinned
            current = ops.current_stream()
            # From the compute stream's pool: released copies go back where activations come from.
            buffer = ops.empty(pinned.tensor.shape, pinned.tensor.dtype)
            # The block may still be in use by compute work enqueued before this call.
            side.wait_stream(current)
            with ops.use(side):
                if pinned.last_use is not None:
                    side.wait_event(pinned.last_use)
                ops.copy(buffer, pinned.tensor)
                ready = ops.new_event()
                ready.record(side)
            # Freed on the compute stream, the block is not reused before the side stream's copy is done.
            ops.record_stream(buffer, side)
            pinned.last_use = ready
            entry.device_copy = buffer
            entry.device_copy_ready = ready
            entry.device_copy_stream = current
        else:
            entry.device_copy = entry.host.to(self.compute_device)
        self._copy_device_bytes += entry.stored_nbytes
        self._stats.bytes_to_device += entry.stored_nbytes
        self._update_peak()

    def _wait_for_device_copy(self, entry: _Entry) -> None:
        ops = self._ops
        current = ops.current_stream()
        ready = entry.device_copy_ready
        if ready is not None:
            if self.config.measure_waits and not ready.query():
                start = time.perf_counter()
                ready.synchronize()
                self._stats.prefetch_wait_s += time.perf_counter() - start
            current.wait_event(ready)
        if entry.device_copy_stream is not None and current != entry.device_copy_stream:
            # A consumer on another stream than the one whose pool the copy came from.
            ops.record_stream(entry.device_copy, current)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize
