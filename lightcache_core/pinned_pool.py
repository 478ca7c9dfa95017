"""Reusable host buffers for asynchronous device<->host copies, and where their memory comes from.

Pinned (page-locked) memory is what makes ``copy_(..., non_blocking=True)`` truly
asynchronous, but pinning is slow and takes RAM away from the rest of the
machine, so buffers are recycled instead of being allocated for every cached
tensor.  Each buffer travels with the event of the last copy that touched it:
whoever takes a buffer from the pool must make its stream wait on that event
before writing into it.

Where the host memory comes from is a :class:`HostAllocator`:

* :class:`HostAllocator` (the default): page-locked buffers from torch
  (``pin_memory=True``) when CUDA is available, else pageable ones; no budget.
* :class:`BudgetedHostAllocator`: one pinned-memory budget shared with the
  application the store runs in.  It either *registers* pageable buffers
  through the application's own pinning function (which counts them in the
  application's budget), or allocates torch-pinned buffers only while they fit
  what the application says is left.  When the budget is spent, or pinning is
  disabled, it hands out pageable buffers and records a note; it never raises.

The core never imports the application: the ComfyUI nodes build the budgeted
allocator from the host's ``model_management`` (``nodes/compat.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BufferKey = tuple[tuple[int, ...], torch.dtype]


@dataclass
class PooledBuffer:
    """A host tensor plus the event of the last asynchronous copy using it.

    ``tensor``: CPU tensor of any shape; ``last_use``: ``torch.cuda.Event``
    recorded after the most recent copy into or out of ``tensor`` (None when no copy
    is pending or on builds without CUDA).  ``pinned``: whether ``tensor`` is
    page-locked (pageable buffers still work; their copies are synchronous).
    ``registered``: pinned by registering pageable memory (must be unregistered
    before it is freed; the allocator does that).
    """

    tensor: torch.Tensor
    last_use: object | None = None
    pinned: bool = True
    registered: bool = False

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return self.tensor.numel() * self.tensor.element_size()


def _fmt(nbytes: int) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


class HostAllocator:
    """Allocates and frees the pool's host buffers.  Default: torch-pinned when CUDA exists.

    Subclasses override :meth:`allocate` / :meth:`free`.  ``notes`` collects
    human-readable lines about fallbacks (for a run report); ``pinned_bytes`` and
    ``pageable_bytes`` are what this allocator has handed out and not yet freed.
    """

    def __init__(self, pin: bool | None = None) -> None:
        self.pin = torch.cuda.is_available() if pin is None else bool(pin)
        self.pinned_bytes = 0
        self.pageable_bytes = 0
        self.pageable_buffers = 0  # buffers handed out pageable although pinning was wanted, ever
        self._notes: dict[str, None] = {}

    @property
    def notes(self) -> list[str]:
        """Distinct notes, in the order they first occurred."""
        return list(self._notes)

    def note(self, text: str) -> None:
        self._notes.setdefault(text, None)

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> PooledBuffer:
        buffer = PooledBuffer(torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=self.pin), pinned=self.pin)
        self._count(buffer, +1)
        return buffer

    def free(self, buffer: PooledBuffer) -> None:
        """Give ``buffer``'s memory back (the caller has waited for its pending copies)."""
        self._count(buffer, -1)
        buffer.tensor = torch.empty(0)

    def _count(self, buffer: PooledBuffer, sign: int) -> None:
        if buffer.pinned:
            self.pinned_bytes += sign * buffer.nbytes
        else:
            self.pageable_bytes += sign * buffer.nbytes


class BudgetedHostAllocator(HostAllocator):
    """Pinned host buffers within an application's pinned-memory budget; pageable beyond it.

    Give it one of:

    * ``register(tensor) -> bool`` and ``unregister(tensor)``: the application's
      own pinning of an existing pageable CPU tensor (ComfyUI's
      ``model_management.pin_memory`` / ``unpin_memory``), which keeps its own
      budget.  A ``False`` from ``register`` means the budget is spent (or the
      tensor was refused): the buffer stays pageable and a note says so.
    * ``remaining() -> int``: bytes the application's budget has left; buffers
      are then torch-pinned while this allocator's own pinned bytes plus the new
      buffer fit ``remaining()``, pageable otherwise.

    ``disabled``: a reason string when the application turned pinned memory off
    (e.g. ``--disable-pinned-memory``): every buffer is pageable, with that note.
    ``pin_buffer(shape, dtype)``: how a torch-pinned buffer is made (tests inject
    a stand-in; default ``torch.empty(..., pin_memory=True)``).
    """

    def __init__(self, *, register: Callable[[torch.Tensor], bool] | None = None,
                 unregister: Callable[[torch.Tensor], object] | None = None,
                 remaining: Callable[[], int] | None = None, disabled: str | None = None,
                 pin_buffer: Callable[[tuple, torch.dtype], torch.Tensor] | None = None,
                 source: str = "the host") -> None:
        super().__init__(pin=disabled is None)
        if disabled is None and register is None and remaining is None:
            raise ValueError("BudgetedHostAllocator needs register/unregister, remaining, or a disabled reason")
        if register is not None and unregister is None:
            raise ValueError("BudgetedHostAllocator: register needs unregister")
        self._register = register
        self._unregister = unregister
        self._remaining = remaining
        self.disabled = disabled
        self._pin_buffer = pin_buffer or (lambda shape, dtype: torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True))
        self.source = source

    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> PooledBuffer:
        shape = tuple(int(s) for s in shape)
        nbytes = _numel(shape) * dtype.itemsize
        if self.disabled is not None:
            self.note(f"pinned memory is off ({self.disabled}): cache buffers are pageable, so host copies are synchronous")
            return self._pageable(shape, dtype, count=False)
        if self._register is not None:
            tensor = torch.empty(shape, dtype=dtype, device="cpu")
            if nbytes == 0 or self._register(tensor):
                buffer = PooledBuffer(tensor, pinned=nbytes > 0, registered=nbytes > 0)
                self._count(buffer, +1)
                return buffer
            return self._spent(PooledBuffer(tensor, pinned=False), nbytes)
        left = int(self._remaining())
        if self.pinned_bytes + nbytes <= left:
            buffer = PooledBuffer(self._pin_buffer(shape, dtype), pinned=True)
            self._count(buffer, +1)
            return buffer
        return self._spent(PooledBuffer(torch.empty(shape, dtype=dtype, device="cpu"), pinned=False), nbytes)

    def free(self, buffer: PooledBuffer) -> None:
        if buffer.registered and self._unregister is not None:
            self._unregister(buffer.tensor)
            buffer.registered = False
        super().free(buffer)

    def _pageable(self, shape, dtype, count: bool) -> PooledBuffer:
        buffer = PooledBuffer(torch.empty(shape, dtype=dtype, device="cpu"), pinned=False)
        self._count(buffer, +1)
        if count:
            self.pageable_buffers += 1
        return buffer

    def _spent(self, buffer: PooledBuffer, nbytes: int) -> PooledBuffer:
        self._count(buffer, +1)
        self.pageable_buffers += 1
        self.note(f"{self.source}'s pinned-memory budget is spent: some cache buffers are pageable "
                  f"(first one {_fmt(nbytes)}), so their host copies are synchronous")
        return buffer


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class PinnedBufferPool:
    """Free list of host buffers keyed by ``(shape, dtype)``.

    ``max_per_key`` bounds how many idle buffers of one shape are kept; surplus
    buffers are given back to the allocator.  The pool never hands out a buffer
    that another caller still owns: ``acquire`` removes it, ``give_back`` returns it.
    ``allocator``: where buffers come from (default :class:`HostAllocator`).
    """

    def __init__(self, max_per_key: int = 4, allocator: HostAllocator | None = None) -> None:
        if max_per_key < 0:
            raise ValueError(f"max_per_key must be >= 0, got {max_per_key}")
        self._max_per_key = max_per_key
        self._free: dict[BufferKey, list[PooledBuffer]] = {}
        self.allocator = allocator if allocator is not None else HostAllocator()

    @staticmethod
    def key_for(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> BufferKey:
        """Pool key for a buffer of ``shape`` and ``dtype``."""
        return (tuple(int(s) for s in shape), dtype)

    def acquire(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> PooledBuffer:
        """Take an idle buffer of exactly ``shape``/``dtype`` or allocate a new one.

        The returned buffer may still carry ``last_use``; the caller must order its
        write after that event.
        """
        free = self._free.get(self.key_for(shape, dtype))
        if free:
            return free.pop()
        return self.allocator.allocate(tuple(int(s) for s in shape), dtype)

    def give_back(self, buffer: PooledBuffer) -> None:
        """Return ``buffer`` to the pool (or free it when the pool for its shape is full)."""
        key = self.key_for(buffer.tensor.shape, buffer.tensor.dtype)
        free = self._free.setdefault(key, [])
        if len(free) < self._max_per_key:
            free.append(buffer)
        else:
            self._drop(buffer)

    def idle_buffers(self) -> int:
        """Number of idle buffers currently held."""
        return sum(len(v) for v in self._free.values())

    def idle_bytes(self, pinned: bool | None = None) -> int:
        """Host bytes held by idle buffers (only pinned / only pageable ones when ``pinned`` is given)."""
        return sum(b.nbytes for v in self._free.values() for b in v if pinned is None or b.pinned == pinned)

    def release_all(self) -> None:
        """Free every idle buffer.

        Callers must have waited for all pending copies first (the store synchronizes
        its side stream before calling this); a buffer's own pending event is also
        waited on before its memory is unregistered or freed.
        """
        buffers = [b for v in self._free.values() for b in v]
        self._free.clear()
        for buffer in buffers:
            self._drop(buffer)

    def _drop(self, buffer: PooledBuffer) -> None:
        if buffer.last_use is not None:
            buffer.last_use.synchronize()
            buffer.last_use = None
        self.allocator.free(buffer)
