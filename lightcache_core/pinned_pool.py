"""Reusable page-locked (pinned) host buffers for asynchronous device<->host copies.

Pinned memory is what makes ``copy_(..., non_blocking=True)`` truly asynchronous,
but ``cudaHostAlloc`` is slow and page-locks RAM, so buffers are recycled instead of
being allocated for every cached tensor.  Each buffer travels with the event of the
last copy that touched it: whoever takes a buffer from the pool must make its stream
wait on that event before writing into it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BufferKey = tuple[tuple[int, ...], torch.dtype]


@dataclass
class PooledBuffer:
    """A pinned host tensor plus the event of the last asynchronous copy using it.

    ``tensor``: pinned CPU tensor of any shape; ``last_use``: ``torch.cuda.Event``
    recorded after the most recent copy into or out of ``tensor`` (None when no copy
    is pending or on builds without CUDA).
    """

    tensor: torch.Tensor
    last_use: object | None = None

    @property
    def nbytes(self) -> int:
        """Size of the buffer in bytes."""
        return self.tensor.numel() * self.tensor.element_size()


class PinnedBufferPool:
    """Free list of pinned host buffers keyed by ``(shape, dtype)``.

    ``max_per_key`` bounds how many idle buffers of one shape are kept; surplus
    buffers are released to the allocator.  The pool never hands out a buffer that
    another caller still owns: ``acquire`` removes it, ``give_back`` returns it.
    """

    def __init__(self, max_per_key: int = 4) -> None:
        if max_per_key < 0:
            raise ValueError(f"max_per_key must be >= 0, got {max_per_key}")
        self._max_per_key = max_per_key
        self._free: dict[BufferKey, list[PooledBuffer]] = {}

    @staticmethod
    def key_for(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> BufferKey:
        """Pool key for a buffer of ``shape`` and ``dtype``."""
        return (tuple(int(s) for s in shape), dtype)

    def acquire(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> PooledBuffer:
        """Take an idle buffer of exactly ``shape``/``dtype`` or allocate a new pinned one.

        The returned buffer may still carry ``last_use``; the caller must order its
        write after that event.
        """
        free = self._free.get(self.key_for(shape, dtype))
        if free:
            return free.pop()
        tensor = torch.empty(tuple(shape), dtype=dtype, device="cpu", pin_memory=True)
        return PooledBuffer(tensor=tensor)

    def give_back(self, buffer: PooledBuffer) -> None:
        """Return ``buffer`` to the pool (or drop it when the pool for its shape is full)."""
        key = self.key_for(buffer.tensor.shape, buffer.tensor.dtype)
        free = self._free.setdefault(key, [])
        if len(free) < self._max_per_key:
            free.append(buffer)

    def idle_buffers(self) -> int:
        """Number of idle buffers currently held."""
        return sum(len(v) for v in self._free.values())

    def idle_bytes(self) -> int:
        """Pinned bytes held by idle buffers."""
        return sum(b.nbytes for v in self._free.values() for b in v)

    def release_all(self) -> None:
        """Drop every idle buffer.

        Callers must have waited for all pending copies first (the store synchronizes
        its side stream before calling this).
        """
        self._free.clear()
