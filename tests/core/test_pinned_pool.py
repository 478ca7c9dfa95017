"""Host buffers and the shared pinned-memory budget, on CPU.

A stand-in for an application's pinning (ComfyUI's ``model_management.pin_memory``/
``unpin_memory`` keep ``TOTAL_PINNED_MEMORY`` under ``MAX_PINNED_MEMORY``) checks the
bookkeeping: buffers are pinned through it while the budget lasts, pageable (with a
note, never an error) once it is spent, pageable when pinning is off, and every
registered buffer is unregistered when the store lets it go.
"""

import pytest
import torch

from core.store_recorder import Recorder
from lightcache_core import CacheStore, StoreConfig
from lightcache_core.pinned_pool import BudgetedHostAllocator, HostAllocator, PinnedBufferPool, PooledBuffer

KiB = 1024


class FakeHostPinning:
    """ComfyUI-like: one process-wide budget; pin_memory registers a pageable CPU tensor if it fits."""

    def __init__(self, max_bytes: int) -> None:
        self.MAX_PINNED_MEMORY = max_bytes
        self.TOTAL_PINNED_MEMORY = 0
        self.PINNED_MEMORY: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []

    def pin_memory(self, tensor: torch.Tensor) -> bool:
        size = tensor.numel() * tensor.element_size()
        self.calls.append(("pin", size))
        if self.TOTAL_PINNED_MEMORY + size > self.MAX_PINNED_MEMORY:
            return False
        self.PINNED_MEMORY[tensor.data_ptr()] = size
        self.TOTAL_PINNED_MEMORY += size
        return True

    def unpin_memory(self, tensor: torch.Tensor) -> bool:
        size = self.PINNED_MEMORY.pop(tensor.data_ptr(), None)
        self.calls.append(("unpin", -1 if size is None else size))
        if size is None:
            return False
        self.TOTAL_PINNED_MEMORY -= size
        return True


def budget_store(allocator, placement="cpu"):
    rec = Recorder()
    store = CacheStore(torch.device("cuda", 0), StoreConfig(placement=placement), stream_ops=rec, host_allocator=allocator)
    return store, rec


def test_buffers_pinned_through_the_host_until_its_budget_is_spent():
    host = FakeHostPinning(max_bytes=10 * KiB)
    host.TOTAL_PINNED_MEMORY = 2 * KiB  # the host has pinned model weights already
    allocator = BudgetedHostAllocator(register=host.pin_memory, unregister=host.unpin_memory, source="ComfyUI")
    store, rec = budget_store(allocator)
    values = {k: rec.device(torch.full((KiB,), float(i))) for i, k in enumerate("abc")}  # 4 KiB each
    for k, v in values.items():
        store.put(k, v)
    # 2 + 4 + 4 = 10 KiB fits; the third would make 14 KiB: pageable, and a note for the report
    assert host.TOTAL_PINNED_MEMORY == 10 * KiB
    stats = store.stats
    assert stats.pinned_host_bytes == 8 * KiB and stats.pageable_host_bytes == 4 * KiB
    assert stats.pageable_fallbacks == 1
    assert len(store.notes) == 1 and "pinned-memory budget is spent" in store.notes[0] and "ComfyUI" in store.notes[0]
    for k, v in values.items():  # pageable entries still round-trip
        assert torch.equal(store.get(k), v)
        store.release(k)
    store.clear()
    assert host.TOTAL_PINNED_MEMORY == 2 * KiB and host.PINNED_MEMORY == {}
    assert [c for c in host.calls if c[0] == "unpin"] == [("unpin", 4 * KiB), ("unpin", 4 * KiB)]
    assert store.stats.pinned_host_bytes == 0 and store.stats.pageable_host_bytes == 0


def test_budget_freed_by_the_host_is_used_again():
    host = FakeHostPinning(max_bytes=4 * KiB)
    allocator = BudgetedHostAllocator(register=host.pin_memory, unregister=host.unpin_memory)
    store, rec = budget_store(allocator)
    store.put("a", rec.device(torch.zeros(KiB)))
    store.put("b", rec.device(torch.zeros(KiB)))
    assert store.stats.pageable_fallbacks == 1
    store.drop("a")  # idle in the pool: still pinned, still counted by the host
    assert host.TOTAL_PINNED_MEMORY == 4 * KiB
    store.put("c", rec.device(torch.zeros(KiB)))  # same shape: takes the idle pinned buffer
    assert store.stats.pinned_host_bytes == 4 * KiB and host.calls.count(("pin", 4 * KiB)) == 2


def test_disabled_pinning_gives_pageable_buffers_with_a_note():
    allocator = BudgetedHostAllocator(disabled="--disable-pinned-memory")
    store, rec = budget_store(allocator)
    store.put("a", rec.device(torch.ones(8)))
    assert torch.equal(store.get("a"), torch.ones(8))
    stats = store.stats
    assert stats.pinned_host_bytes == 0 and stats.pageable_host_bytes == 32 and stats.pageable_fallbacks == 0
    assert store.notes and "--disable-pinned-memory" in store.notes[0]


def test_remaining_budget_mode_pins_own_buffers_only_while_they_fit():
    left = {"bytes": 6 * KiB}
    made = []

    def pin_buffer(shape, dtype):  # stand-in for torch.empty(..., pin_memory=True)
        made.append(shape)
        return torch.empty(shape, dtype=dtype)

    allocator = BudgetedHostAllocator(remaining=lambda: left["bytes"], pin_buffer=pin_buffer)
    first = allocator.allocate((KiB,), torch.float32)  # 4 KiB <= 6 KiB
    second = allocator.allocate((KiB,), torch.float32)  # 4 + 4 > 6: pageable
    assert first.pinned and not second.pinned and made == [(KiB,)]
    assert allocator.pinned_bytes == 4 * KiB and allocator.pageable_bytes == 4 * KiB
    allocator.free(first)
    assert allocator.pinned_bytes == 0
    third = allocator.allocate((KiB,), torch.float32)
    assert third.pinned and allocator.notes and allocator.pageable_buffers == 1


def test_budgeted_allocator_needs_a_source():
    with pytest.raises(ValueError):
        BudgetedHostAllocator()
    with pytest.raises(ValueError):
        BudgetedHostAllocator(register=lambda t: True)


def test_pool_frees_surplus_through_the_allocator_after_its_copy():
    host = FakeHostPinning(max_bytes=1 << 20)
    allocator = BudgetedHostAllocator(register=host.pin_memory, unregister=host.unpin_memory)
    pool = PinnedBufferPool(max_per_key=1, allocator=allocator)
    a, b = pool.acquire((16,), torch.float32), pool.acquire((16,), torch.float32)
    rec = Recorder()
    b.last_use = rec.new_event()
    pool.give_back(a)
    pool.give_back(b)  # surplus: waits for b's pending copy, then unregisters it
    assert b.last_use is None and ("event_synchronize", "e1") in rec.log
    assert host.TOTAL_PINNED_MEMORY == 64 and pool.idle_buffers() == 1
    pool.release_all()
    assert host.TOTAL_PINNED_MEMORY == 0 and pool.idle_bytes() == 0 and allocator.pinned_bytes == 0


def test_default_allocator_without_cuda_is_pageable():
    allocator = HostAllocator(pin=False)
    buffer = allocator.allocate((4,), torch.float16)
    assert isinstance(buffer, PooledBuffer) and not buffer.pinned and buffer.nbytes == 8
    assert allocator.pageable_bytes == 8 and allocator.pageable_buffers == 0 and allocator.notes == []
