"""``make memplan``'s parts at tiny size: the live-bytes tracker, host scalars under fake tensors, fused
attention on a pretend GPU, the cache accounting, traced rows of the real host code, and the check that a
trace agrees with the CPU allocator's own count for the same configuration."""
from __future__ import annotations

import math

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

from memplan.accounting import cache_footprint, lightcache_entries
from memplan.sdpa import cuda_kernels
from memplan.tracker import HostScalars, LiveBytes, no_fake_constants

MiB = 2**20


# ---------------------------------------------------------------- tracker

def test_tracker_counts_each_storage_once_until_it_is_freed():
    tracker = LiveBytes("cuda")
    with torch.inference_mode(), no_fake_constants(), FakeTensorMode(allow_non_fake_inputs=True), tracker:
        with tracker.phase("weights"):
            w = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        x = torch.empty(2 * MiB, dtype=torch.uint8, device="cuda")
        view = x[: MiB].view(torch.int8)  # same storage: not counted again
        y = x * 2
        assert tracker.current == 5 * MiB and tracker.by_label["weights"] == MiB  # w + x + y
        del x, view, y
        assert tracker.current == MiB
        host = torch.empty(8 * MiB, dtype=torch.uint8)  # CPU: not the tracked device
        z = torch.empty(MiB, dtype=torch.uint8, device="cuda")
        del z, host
    assert tracker.peak == 5 * MiB
    assert tracker.dominant(1)[0][1] == 2 * MiB and w is not None


def test_host_scalars_answer_host_values_and_refuse_model_data():
    with torch.inference_mode(), no_fake_constants(), FakeTensorMode(allow_non_fake_inputs=True), HostScalars():
        sigma = torch.tensor([0.75], device="cuda")
        assert (sigma[0] > 0.5).item() is True
        assert float(torch.cat([sigma] * 2).max()) == 0.75
        data = torch.empty(4, 4, device="cuda")
        with pytest.raises(DataDependentOutputException):
            (data.abs().mean() > 0).item()


def test_attention_on_a_pretend_gpu_takes_the_fused_kernel():
    """Without a GPU, PyTorch's SDPA on CUDA tensors would materialise the scores (4096^2 x 8 heads x 2 B
    = 256 MiB); a CUDA build's flash kernel holds the output and its log-sum-exp only."""
    tracker = LiveBytes("cuda")
    with torch.inference_mode(), no_fake_constants(), FakeTensorMode(allow_non_fake_inputs=True), tracker, cuda_kernels():
        q = torch.empty(1, 8, 4096, 64, dtype=torch.bfloat16, device="cuda")
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        del out
    assert tracker.peak < 2 * 4 * MiB + MiB  # q + output (+ 128 KiB log-sum-exp)


# ---------------------------------------------------------------- accounting

def test_cache_footprint_follows_the_store_placement():
    latent, hidden = (1, 16, 21, 60, 104), (1, 32760, 5120)  # Wan 14B 480p
    # per branch: the step output y, its change dy (extrapolation) and the last full output yr (cfg/block rebuild)
    entries, working = lightcache_entries("mix", latent, hidden, branches=2, block_forecast=True)
    assert [e.kind for e in entries] == ["step"] * 6 + ["block"] * 2
    step_bytes = 16 * 21 * 60 * 104 * 4  # one fp32 latent (ComfyUI samples in float32)
    block = 32760 * 5120 * 2  # one branch's bf16 hidden state
    gpu = cache_footprint(entries, "gpu", free_bytes=100 * 2**30, working=working)
    cpu = cache_footprint(entries, "cpu", free_bytes=100 * 2**30, working=working)
    auto = cache_footprint(entries, "auto", free_bytes=100 * 2**30, working=working)
    assert gpu.resident == 6 * step_bytes + 2 * block and gpu.host == 0
    assert cpu.resident == 0 and cpu.prefetch_by_kind == {"step": 6 * step_bytes, "block": 2 * block}
    # auto: everything is read again next evaluation; the step entries stay, block residuals go where the budget allows
    assert auto.resident >= 6 * step_bytes and auto.resident + auto.host == gpu.resident
    clone = [w for w in working if "clone" in w.name]
    assert len(clone) == 1 and clone[0].nbytes == 2 * block  # the batched input of the cached range
    # little free memory: even near entries go to host
    tight = cache_footprint(entries, "auto", free_bytes=8 * MiB)
    assert tight.resident < 6 * step_bytes


def test_mix_at_defaults_plans_no_block_memory():
    """mix without a block forecast stores step entries only and keeps no block input alive."""
    entries, working = lightcache_entries("mix", (1, 16, 3, 8, 8), (1, 48, 128), branches=2)
    assert {e.kind for e in entries} == {"step"} and not [w for w in working if "clone" in w.name]


def test_step_only_mode_stores_no_block_residuals():
    entries, working = lightcache_entries("step", (1, 16, 3, 8, 8), (1, 48, 128), branches=1)
    assert {e.kind for e in entries} == {"step"} and working == []


# ---------------------------------------------------------------- traces of the real host code

@pytest.fixture(scope="module")
def host(comfy_host):
    return comfy_host


def test_traced_sampler_rows_at_tiny_size(host):
    from memplan import run

    records = run.trace_dit("WAN_TINY", 128, 128, 9, device_bytes=2 * 2**30)
    by = {r["config"]: r for r in records}
    assert list(by) == run.DIT_CONFIGS
    for r in records:
        assert {"model", "size", "config", "peak_bytes", "weights_bytes"} <= set(r)
        assert r["peak_bytes"] > r["weights_bytes"] > 0 and "note" not in r  # nothing left live after a run
    ks = by["KSampler"]["peak_bytes"]
    assert by["EasyCache"]["peak_bytes"] > ks  # its first evaluation's diffs are live during the second
    assert by["LightCache cache_device gpu"]["peak_bytes"] > by["LightCache cache_device cpu"]["peak_bytes"] > ks
    assert by[f"KSampler + Chunked Model Patch (count {run.CHUNK_COUNT})"]["peak_bytes"] < ks
    assert by["KSampler"]["model_calls_per_evaluation"] == 1  # cond and uncond batched on a 2 GiB device


def test_traced_decode_rows_at_tiny_size(host):
    from memplan import drive, run

    records = run.trace_vae("WAN_VAE_TINY", 96, 64, 9, device_bytes=2 * 2**30)
    assert [r["config"] for r in records] == list(drive.DECODES)
    assert all(r["peak_bytes"] > r["weights_bytes"] > 0 for r in records)


@pytest.mark.parametrize("config", ["KSampler", "KSampler + Chunked Model Patch (count 4)"])
def test_trace_agrees_with_the_cpu_allocator(host, config):
    """The same configuration run for real (peak of the CPU allocator's live bytes) and traced."""
    from memplan import validate

    row = validate._row("tiny Wan", config, validate._measure_sampler, validate._trace_sampler)
    assert "error" not in row, row
    assert abs(row["difference"]) <= validate.TOLERANCE, row
    assert math.isfinite(row["measured_bytes"]) and row["measured_bytes"] > MiB


def test_card_free_memory_follows_comfyui_loading(host):
    """A card that cannot hold every weight keeps ComfyUI's activation estimate plus its reserve free; one
    that can keeps what the weights leave."""
    from memplan import run
    from memplan.drive import GiB

    import comfy.model_management as mm

    class Model:
        def memory_required(self, shape):
            assert shape[0] == 1  # ComfyUI's minimum: one batch entry
            return 10 * GiB

    class Patcher:
        model = Model()

    reserve = int(mm.minimum_inference_memory()) + int(mm.extra_reserved_memory())
    small, how = run.card_free_bytes(Patcher(), (2, 16, 21, 90, 160), 24, weights_bytes=26 * GiB)
    assert small == 10 * GiB + reserve and "24 GB card" in how
    big, _ = run.card_free_bytes(Patcher(), (2, 16, 21, 90, 160), 80, weights_bytes=26 * GiB)
    assert big == int((80 - run.CUDA_CONTEXT_GIB) * GiB) - 26 * GiB
