"""CacheStore on a CPU compute device: API, accounting, isolation, cleanup, dtype error;
``auto`` placement decisions; and the CUDA path's order of calls through a recording
stand-in for its stream/event/copy surface (``store_recorder``)."""

import math

import pytest
import torch

from core.store_recorder import Recorder
from lightcache_core import CacheStats, CacheStore, StoreConfig
from lightcache_core.pinned_pool import HostAllocator

MiB = 2**20


def assert_empty(store):
    stats = store.stats
    assert len(store) == 0 and stats.entries == 0
    assert stats.device_bytes == 0 and stats.host_bytes == 0
    assert store.pinned_bytes == 0


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs", [
    dict(placement="gpu"),
    dict(storage_dtype=torch.int8),
    dict(storage_dtype="float16"),
    dict(device_budget_bytes=-1),
    dict(offload_min_bytes=1.5),
    dict(measure_waits="yes"),
    dict(free_fraction=1.5),
    dict(free_fraction=True),
    dict(near_reuse=-1),
])
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        StoreConfig(**kwargs)


def test_config_is_frozen():
    with pytest.raises(Exception):
        StoreConfig().placement = "cpu"


# ------------------------------------------------------------------ basic API
def test_put_get_without_copy_on_cpu():
    store = CacheStore(torch.device("cpu"), StoreConfig(placement="device"))
    t = torch.randn(2, 3, 4)
    store.put(("block", (2, 5), "run", "cond"), t)
    got = store.get(("block", (2, 5), "run", "cond"))
    assert got is t  # just the reference: no copy, no extra memory
    assert ("block", (2, 5), "run", "cond") in store and len(store) == 1
    assert store.nbytes(("block", (2, 5), "run", "cond")) == t.numel() * 4
    assert store.keys() == [("block", (2, 5), "run", "cond")]


def test_hits_misses_puts():
    store = CacheStore("cpu")
    assert store.get("missing") is None
    store.put("a", torch.ones(3))
    store.get("a")
    store.get("a")
    stats = store.stats
    assert (stats.hits, stats.misses, stats.puts) == (2, 1, 1)
    assert isinstance(stats, CacheStats)
    assert stats.as_dict()["hits"] == 2


def test_stats_is_a_snapshot():
    store = CacheStore("cpu")
    snap = store.stats
    snap.hits = 99
    assert store.stats.hits == 0


def test_cpu_placement_is_logical_on_cpu_device():
    store = CacheStore("cpu", StoreConfig(placement="cpu"))
    t = torch.randn(8)
    store.put("k", t)
    assert store.where("k") == "host"
    assert store.get("k") is t  # no copy even though it is "host" placed
    stats = store.stats
    assert stats.host_bytes == 32 and stats.device_bytes == 0
    assert stats.bytes_to_host == 0 and stats.bytes_to_device == 0
    store.prefetch(["k", "absent"])  # no-op on CPU
    assert store.stats.prefetches == 0 and store.stats.late_prefetches == 0


def test_auto_placement_by_size_and_budget():
    config = StoreConfig(placement="auto", device_budget_bytes=3 * MiB, offload_min_bytes=2 * MiB)
    store = CacheStore("cpu", config)
    store.put("small1", torch.zeros(MiB // 4))  # 1 MiB fp32
    store.put("small2", torch.zeros(MiB // 4))
    store.put("small3", torch.zeros(MiB // 4))  # budget full (3 MiB)
    store.put("small4", torch.zeros(MiB // 4))  # over budget -> host
    store.put("big", torch.zeros(MiB))  # 4 MiB >= offload_min -> host
    assert [store.where(k) for k in ("small1", "small2", "small3", "small4", "big")] == \
        ["device", "device", "device", "host", "host"]
    stats = store.stats
    assert stats.device_bytes == 3 * MiB and stats.host_bytes == 5 * MiB
    assert stats.peak_device_bytes == 3 * MiB
    # Replacing an entry frees its old budget share first.
    store.put("small1", torch.zeros(MiB // 4))
    assert store.where("small1") == "device"
    assert store.stats.device_bytes == 3 * MiB


def test_replacing_and_dropping_keep_byte_counts_exact():
    store = CacheStore("cpu", StoreConfig(placement="cpu"))
    store.put("k", torch.zeros(100))
    store.put("k", torch.zeros(50))
    assert store.stats.host_bytes == 200 and len(store) == 1
    store.drop("k")
    store.drop("k")  # no-op
    store.release("k")  # no-op
    assert_empty(store)


def test_two_branch_keys_are_independent():
    store = CacheStore("cpu")
    cond, uncond = torch.full((4,), 1.0), torch.full((4,), 2.0)
    store.put(("deep", "run", "cond"), cond)
    store.put(("deep", "run", "uncond"), uncond)
    assert torch.equal(store.get(("deep", "run", "cond")), cond)
    assert torch.equal(store.get(("deep", "run", "uncond")), uncond)
    store.put(("deep", "run", "cond"), torch.zeros(4))
    assert torch.equal(store.get(("deep", "run", "uncond")), uncond)
    store.drop(("deep", "run", "uncond"))
    assert ("deep", "run", "cond") in store and ("deep", "run", "uncond") not in store


def test_two_stores_never_share_entries():
    first, second = CacheStore("cpu"), CacheStore("cpu")
    first.put("k", torch.ones(2))
    assert second.get("k") is None and "k" not in second
    second.put("k", torch.zeros(2))
    assert torch.equal(first.get("k"), torch.ones(2))
    first.clear()
    assert torch.equal(second.get("k"), torch.zeros(2))


def test_unhashable_key_and_non_tensor_rejected():
    store = CacheStore("cpu")
    with pytest.raises(TypeError):
        store.put(["list", "key"], torch.ones(1))
    with pytest.raises(TypeError):
        store.put("k", [1, 2, 3])
    with pytest.raises(KeyError):
        store.where("missing")


# ------------------------------------------------------------------ cleanup
def test_context_manager_clears():
    with CacheStore("cpu", StoreConfig(placement="cpu")) as store:
        store.put("a", torch.ones(10))
        store.put("b", torch.ones(10))
        assert len(store) == 2
    assert_empty(store)


def test_context_manager_clears_on_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with CacheStore("cpu", StoreConfig(placement="auto")) as store:
            store.put("a", torch.ones(10))
            store.put("b", torch.ones(2 * MiB))
            raise RuntimeError("boom")
    assert_empty(store)


def test_clear_keeps_store_usable_and_peak():
    store = CacheStore("cpu", StoreConfig(placement="device"))
    store.put("a", torch.ones(256))
    store.clear()
    assert_empty(store)
    assert store.stats.peak_device_bytes == 1024
    store.put("a", torch.ones(2))
    assert len(store) == 1
    store.reset_stats()
    assert store.stats.puts == 0 and store.stats.peak_device_bytes == 8


# ------------------------------------------------------------------ storage dtype
@pytest.mark.parametrize("dtype,bound", [(torch.float16, 2.0**-11), (torch.bfloat16, 2.0**-8)])
def test_storage_dtype_error_bound(dtype, bound):
    torch.manual_seed(0)
    store = CacheStore("cpu", StoreConfig(placement="cpu", storage_dtype=dtype))
    magnitude = torch.exp(torch.empty(4096).uniform_(-9.0, 11.0))  # ~1.2e-4 .. 6e4: fp16 normal range
    x = magnitude * torch.sign(torch.randn(4096))
    store.put("x", x)
    assert store.nbytes("x") == x.numel() * 2  # half the fp32 bytes
    y = store.get("x")
    assert y.dtype == torch.float32 and y.shape == x.shape
    rel = ((y - x).abs() / x.abs()).max().item()
    assert 0 < rel <= bound


def test_storage_dtype_only_narrows_floats():
    store = CacheStore("cpu", StoreConfig(storage_dtype=torch.bfloat16))
    ints = torch.arange(10)
    halfs = torch.randn(10, dtype=torch.float16)
    store.put("ints", ints)
    store.put("halfs", halfs)
    assert store.get("ints") is ints  # integers untouched
    assert store.get("halfs") is halfs  # fp16 is not converted to bf16 (same width)
    assert store.nbytes("halfs") == 20


def test_storage_dtype_on_device_placement_returns_original_dtype():
    store = CacheStore("cpu", StoreConfig(placement="device", storage_dtype=torch.float16))
    x = torch.randn(3, 5, dtype=torch.float64)
    store.put("x", x)
    y = store.get("x")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x, rtol=2.0**-11, atol=1e-4)


# ------------------------------------------------------------------ auto placement: free memory and reuse distance
def store_bytes(t):
    return t.numel() * t.element_size()


def test_auto_keeps_near_entries_within_free_fraction():
    free = {"bytes": 100 * MiB}
    store = CacheStore("cpu", StoreConfig(placement="auto", free_fraction=0.25), free_memory=lambda: free["bytes"])
    store.put("step", torch.zeros(10 * MiB // 4), reuse_distance=1)  # 10 MiB, read next evaluation
    assert store.where("step") == "device"
    free["bytes"] -= 10 * MiB  # what the device has left now that the entry lives there
    # 10 + 20 MiB > 25 % of (90 MiB free + 10 MiB the store holds): over the free-memory share
    store.put("near_big", torch.zeros(20 * MiB // 4), reuse_distance=1)
    assert store.where("near_big") == "host"
    assert "free_fraction" in store.placements[-1][2]
    # 10 + 12 MiB fits 25 MiB: size alone never sends a near entry to host (no fixed line)
    store.put("near_12", torch.zeros(12 * MiB // 4), reuse_distance=2)
    assert store.where("near_12") == "device"


def test_auto_sends_far_entries_to_host_however_small():
    store = CacheStore("cpu", StoreConfig(placement="auto"), free_memory=lambda: 10 * 2**30)
    store.put("never", torch.zeros(16), reuse_distance=math.inf)
    store.put("later", torch.zeros(16), reuse_distance=3)  # beyond near_reuse (2)
    store.put("soon", torch.zeros(16), reuse_distance=2)
    assert [store.where(k) for k in ("never", "later", "soon")] == ["host", "host", "device"]
    reasons = {key: reason for key, _, reason in store.placements}
    assert "later than near_reuse" in reasons["never"] and "in 2 evaluation" in reasons["soon"]


def test_issue_example_wan14b_480p_step_residual_on_device_block_residual_on_host():
    """Wan 14B 480p: the bf16 step residual (4,193,280 B, read at the next evaluation) stays on the device;
    a block residual the default policy never reads (a 320 MiB hidden state) goes to host."""
    store = CacheStore("cpu", StoreConfig(placement="auto"), free_memory=lambda: 40 * 2**30)
    step = torch.zeros(1, 16, 21, 60, 104, dtype=torch.bfloat16)
    hidden = torch.zeros(1, dtype=torch.bfloat16).expand(1, 32760, 5120)  # 320 MiB of bytes, no memory
    assert store_bytes(step) == 4_193_280 and store_bytes(hidden) == 32760 * 5120 * 2
    store.put("step", step, reuse_distance=1)
    store.put("block", hidden, reuse_distance=math.inf)
    assert store.where("step") == "device" and store.where("block") == "host"
    assert store.nbytes("step") == 4_193_280
    # The same residual without a hint goes by the legacy size line (4 MiB = 4,194,304 B): device.
    store.put("step_nohint", step)
    assert store.where("step_nohint") == "device"


def test_auto_budget_still_caps_near_entries():
    store = CacheStore("cpu", StoreConfig(placement="auto", device_budget_bytes=MiB), free_memory=lambda: 2**40)
    store.put("a", torch.zeros(MiB // 4), reuse_distance=1)
    store.put("b", torch.zeros(4), reuse_distance=1)
    assert store.where("a") == "device" and store.where("b") == "host"
    assert store.placements[-1][2] == "over device_budget_bytes"


def test_reuse_distance_validation():
    store = CacheStore("cpu")
    for bad in (-1, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            store.put("k", torch.zeros(1), reuse_distance=bad)
    assert len(store) == 0 and store.stats.puts == 0


def test_explicit_placements_ignore_hints():
    dev = CacheStore("cpu", StoreConfig(placement="device"), free_memory=lambda: 0)
    host = CacheStore("cpu", StoreConfig(placement="cpu"), free_memory=lambda: 2**40)
    dev.put("k", torch.zeros(8), reuse_distance=math.inf)
    host.put("k", torch.zeros(8), reuse_distance=0)
    assert dev.where("k") == "device" and host.where("k") == "host"


# ------------------------------------------------------------------ CUDA path: order of calls (recorded on CPU)
def cuda_store(rec, placement="cpu", **kwargs):
    allocator = HostAllocator(pin=False)
    return CacheStore(torch.device("cuda", 0), StoreConfig(placement=placement, **kwargs), stream_ops=rec,
                      host_allocator=allocator)


def test_offload_copies_on_the_side_stream_after_the_producer():
    rec = Recorder()
    store = cuda_store(rec)
    value = rec.device(torch.arange(6.0))
    store.put("k", value)
    assert store.where("k") == "host" and store.stats.bytes_to_host == 24
    log = rec.log
    # the side stream waits for the compute stream (the producer), then copies device->host, then records
    assert log[:6] == [("wait_stream", "side", "compute"), ("enter", "side"), ("copy", "d2h", "side"),
                       ("record", "e1", "side"), ("exit", "side"), ("record_stream", "side")]
    assert not any(e[0] == "alloc" for e in log)  # same dtype: no device allocation at all


def test_prefetch_allocates_from_the_compute_streams_pool():
    rec = Recorder()
    store = cuda_store(rec)
    value = rec.device(torch.arange(6.0))
    store.put("k", value)
    rec.log.clear()
    store.prefetch(["k"])
    log = rec.log
    alloc = log.index(("alloc", "compute", (6,)))
    wait = log.index(("wait_stream", "side", "compute"))
    copy = log.index(("copy", "h2d", "side"))
    assert alloc < wait < copy  # allocated on compute, side waits for compute's earlier users, then copies
    assert ("wait_event", "side", "e1") in log[wait:copy]  # ... and for the device->host copy into the buffer
    assert log[-1] == ("record_stream", "side")  # freed on compute, not reused before the copy is done
    assert all(e[1] != "side" for e in log if e[0] == "alloc")  # nothing is ever allocated on the side stream
    rec.log.clear()
    got = store.get("k")
    assert torch.equal(got, value)
    assert rec.log == [("wait_event", "compute", "e2")]  # the consumer waits on the copy; no host sync
    assert store.stats.prefetches == 1 and store.stats.late_prefetches == 0
    store.release("k")
    assert store.stats.device_bytes == 0


def test_get_without_prefetch_copies_late_and_other_stream_consumers_are_recorded():
    rec = Recorder()
    store = cuda_store(rec)
    store.put("k", rec.device(torch.ones(4)))
    other = type(rec.side)("other", rec)
    with rec.use(other):
        rec.log.clear()
        got = store.get("k")
    assert torch.equal(got, torch.ones(4)) and store.stats.late_prefetches == 1
    assert ("alloc", "other", (4,)) in rec.log  # the consumer's own stream pool
    assert rec.log[-2] == ("wait_event", "other", "e2")


def test_clear_waits_for_the_side_stream_before_freeing_host_buffers():
    rec = Recorder()
    store = cuda_store(rec)
    store.put("k", rec.device(torch.ones(4)))
    rec.log.clear()
    store.clear()
    assert rec.log[0] == ("synchronize", "side")
    assert store.pinned_bytes == 0 and len(store) == 0


def test_auto_on_cuda_reads_free_memory_at_each_put():
    rec = Recorder()
    reads = []

    def free():
        reads.append(1)
        return 64 * MiB

    store = CacheStore(torch.device("cuda", 0), StoreConfig(placement="auto"), stream_ops=rec, free_memory=free,
                       host_allocator=HostAllocator(pin=False))
    store.put("near", rec.device(torch.zeros(MiB // 4)), reuse_distance=1)
    store.put("far", rec.device(torch.zeros(MiB // 4)), reuse_distance=math.inf)
    assert store.where("near") == "device" and store.where("far") == "host" and len(reads) == 2
    assert store.stats.device_bytes == MiB and store.stats.host_bytes == MiB
