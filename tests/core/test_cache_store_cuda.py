"""CacheStore on CUDA: async offload accounting, peak memory, reserved memory, prefetch overlap,
reuse-aware placement and pinned host buffers.

Skipped without a GPU (``make gpu-check`` runs them on one).
"""

import math

import pytest
import torch

from lightcache_core import CacheStore, StoreConfig
from lightcache_core.pinned_pool import BudgetedHostAllocator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MiB = 2**20


@pytest.fixture
def device():
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.device("cuda", torch.cuda.current_device())


def test_offloaded_entry_is_not_on_device(device):
    store = CacheStore(device, StoreConfig(placement="cpu"))
    source = torch.randn(4 * MiB // 4, device=device)  # 4 MiB
    expected = source.clone()
    store.put("k", source)
    del source
    assert store.where("k") == "host"
    stats = store.stats
    assert stats.device_bytes == 0 and stats.host_bytes == 4 * MiB and stats.bytes_to_host == 4 * MiB
    assert store.pinned_bytes == 4 * MiB
    got = store.get("k")
    assert torch.equal(got, expected)
    assert store.stats.late_prefetches == 1 and store.stats.device_bytes == 4 * MiB
    store.release("k")
    assert store.stats.device_bytes == 0
    store.clear()
    assert store.pinned_bytes == 0 and len(store) == 0


def test_auto_keeps_small_entries_on_device(device):
    store = CacheStore(device, StoreConfig(placement="auto", offload_min_bytes=MiB))
    store.put("small", torch.ones(16, device=device))
    store.put("large", torch.ones(MiB, device=device))
    assert store.where("small") == "device" and store.where("large") == "host"


def test_repeated_puts_reuse_pinned_buffer_and_stay_correct(device):
    with CacheStore(device, StoreConfig(placement="cpu")) as store:
        for i in range(20):
            value = torch.full((256, 1024), float(i), device=device)
            store.put(("k", "cond"), value)
            store.prefetch([("k", "cond")])
            got = store.get(("k", "cond"))
            assert torch.equal(got, value)
            store.release(("k", "cond"))
            assert store.pinned_bytes == 256 * 1024 * 4  # one buffer, reused
    assert store.pinned_bytes == 0 and store.stats.host_bytes == 0


def test_storage_dtype_on_cuda(device):
    with CacheStore(device, StoreConfig(placement="cpu", storage_dtype=torch.bfloat16)) as store:
        x = torch.randn(1000, device=device) * 10
        store.put("x", x)
        assert store.nbytes("x") == 2000
        y = store.get("x")
        assert y.dtype == torch.float32 and y.device.type == "cuda"
        assert ((y - x).abs() / x.abs().clamp_min(1e-30)).max().item() <= 2.0**-8


def _simulated_run(device, store, steps=10, interval=3):
    """DeepCache-like: full steps produce the feature, cache steps read it back."""
    torch.manual_seed(0)
    weight = torch.randn(1024, 1024, device=device) / 32
    x = torch.randn(2048, 1024, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    for step in range(steps):
        if store is None or step % interval == 0:
            feature = torch.tanh(x @ weight)  # the "deep" part
            if store is not None:
                store.put("feature", feature)
        else:
            store.prefetch(["feature"])
            feature = store.get("feature")
        out = feature @ weight  # the "shallow" consumer
        if store is not None:
            store.release("feature")
        del feature, out
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def test_peak_memory_within_one_entry_of_baseline(device):
    entry_bytes = 2048 * 1024 * 4
    baseline_peak = _simulated_run(device, None)
    with CacheStore(device, StoreConfig(placement="cpu")) as store:
        cached_peak = _simulated_run(device, store)
        assert store.stats.device_bytes == 0
    assert cached_peak <= baseline_peak + entry_bytes


def test_prefetch_one_step_ahead_has_finished(device):
    with CacheStore(device, StoreConfig(placement="cpu", measure_waits=True)) as store:
        value = torch.randn(8 * MiB // 4, device=device)
        store.put("k", value)
        store.prefetch(["k"])  # issued at the start of the previous step
        a = torch.randn(2048, 2048, device=device)
        for _ in range(10):  # that step's compute
            a = torch.tanh(a @ a / 2048)
        torch.cuda.current_stream(device).synchronize()  # e.g. the sampler's per-step .item()
        got = store.get("k")
        assert torch.equal(got, value)
        stats = store.stats
        assert stats.prefetches == 1 and stats.late_prefetches == 0
        assert stats.prefetch_wait_s < 0.005


def test_prefetch_keeps_reserved_memory_flat(device):
    """Prefetch buffers come from the compute stream's pool: a released copy is reused by the next
    activation of the same size, so reserved memory does not grow by the prefetch set."""
    size = 64 * MiB
    with CacheStore(device, StoreConfig(placement="cpu")) as store:
        value = torch.randn(size // 4, device=device)
        store.put("k", value)
        del value
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        activation = torch.empty(size, dtype=torch.uint8, device=device)  # one step's activation
        del activation
        reserved = torch.cuda.memory_reserved(device)
        for _ in range(4):
            store.prefetch(["k"])
            got = store.get("k")
            total = got.sum()
            store.release("k")
            del got, total
            torch.cuda.synchronize()
            activation = torch.empty(size, dtype=torch.uint8, device=device)
            activation.fill_(1)
            del activation
        torch.cuda.synchronize()
        assert torch.cuda.memory_reserved(device) <= reserved


def test_auto_uses_reuse_distance_on_cuda(device):
    with CacheStore(device, StoreConfig(placement="auto")) as store:
        step = torch.randn(1, 16, 21, 60, 104, device=device).to(torch.bfloat16)  # 4,193,280 B
        store.put("step", step, reuse_distance=1)
        store.put("block", torch.randn(MiB, device=device), reuse_distance=math.inf)
        assert store.where("step") == "device" and store.where("block") == "host"


def test_budgeted_pinned_buffers_on_cuda(device):
    allocator = BudgetedHostAllocator(remaining=lambda: 6 * MiB)
    with CacheStore(device, StoreConfig(placement="cpu"), host_allocator=allocator) as store:
        a, b = torch.randn(MiB, device=device), torch.randn(MiB, device=device)  # 4 MiB each
        store.put("a", a)
        store.put("b", b)
        stats = store.stats
        assert stats.pinned_host_bytes == 4 * MiB and stats.pageable_host_bytes == 4 * MiB
        assert stats.pageable_fallbacks == 1 and store.notes
        assert torch.equal(store.get("a"), a) and torch.equal(store.get("b"), b)
    assert allocator.pinned_bytes == 0 and allocator.pageable_bytes == 0
