"""CacheStore on a CPU compute device: API, accounting, isolation, cleanup, dtype error."""

import pytest
import torch

from lightcache_core import CacheStats, CacheStore, StoreConfig

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
