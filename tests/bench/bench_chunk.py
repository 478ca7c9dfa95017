"""Chunked Model Patch benchmark: peak activation memory and wall time of computed steps vs the unpatched model.

Model: the tiny Wan 2.1 T2V fixture at dim 256 (``fixtures.WAN_T2V_LARGE``: 2 blocks, 2 heads, FFN 768).
Tokens: latent [16, T=20, 64, 64] (512x512 px, 77 frames) -> 20 x 32 x 32 = 20,480 tokens.
HunyuanVideo: the tiny fixture (hidden 128, 1 double + 1 single block), latent [16, 10, 64, 64]
-> 10 x 32 x 32 = 10,240 image tokens (+ 8 text tokens in the single-stream blocks).
Each case runs in its own process (tests/bench/framework.py):

* ``call_*``: one ``apply_model`` call (a computed step), measured alone after the model is loaded;
* ``sampling_*``: a short KSampler run (2 steps, euler), measured around the whole prompt;
* ``*_ops16``: the per-op chunking alone (FFNs, attention, Wan q/k/v; ``ChunkSettings(blocks=False)``),
  against ``*_count16``, which also runs whole blocks along tokens (norms, modulation, residual adds,
  HunyuanVideo's fused single-stream ``linear1``/``linear2``).

Peak memory = peak RSS during the region minus RSS just before it (sampled every 2 ms; on
CUDA, peak allocated minus allocated before). glibc's dynamic mmap threshold is pinned first,
so freed activation buffers go back to the OS as in a fresh process and RSS tracks live memory.
cfg is 1.0 (one batch row per call) to keep the CPU run short; chunking ratios do not depend on it.

Plain functions ``run_call(params)`` / ``run_sampling(params)`` work outside the framework too.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from bench.framework import BenchCase  # noqa: E402

WIDTH, HEIGHT, LENGTH = 512, 512, 77  # -> latent [1, 16, 20, 64, 64], 20,480 tokens
HUNYUAN_LENGTH = 37  # -> latent [1, 16, 10, 64, 64], 10,240 image tokens
STEPS = 2
# Torch threads for every case (baseline and patched alike). Default 1: on a shared, oversubscribed
# CPU runner, multi-threaded timings mostly measure OpenMP barrier stalls, not the code.
THREADS = int(os.environ.get("LIGHTCACHE_BENCH_THREADS", "1"))


def _pin_malloc() -> None:
    """Fixed mmap threshold (128 KiB): large frees return to the OS, so RSS follows live tensors."""
    import torch

    if THREADS > 0:
        torch.set_num_threads(THREADS)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def _chunk_inputs(params: dict) -> dict | None:
    if not params.get("chunk"):
        return None
    return {"mode": params.get("mode", "count"), "chunks": params.get("chunks", 4), "budget_mb": params.get("budget_mb", 0),
            "chunk_ffn": True, "chunk_attention": True, "chunk_resblocks": True}


def _chunk_patches():
    return next(m for n, m in sys.modules.items() if n.endswith("nodes.chunk_patches"))


def _load(ctx, params):
    from harness import fixtures
    from harness.graphs import Graph, out

    fixture = fixtures.HUNYUAN if params.get("model") == "hunyuan" else fixtures.WAN_T2V_LARGE
    fixtures.ensure_fixtures(ctx.models_dir, which=(fixture,))
    g = Graph()
    node = g.add("UNETLoader", unet_name=fixture.name, weight_dtype="default")
    chunk = _chunk_inputs(params)
    if chunk and params.get("blocks", True):
        node = g.add("ChunkedModelPatch", model=out(node), **chunk)
    res = ctx.runner.run(g.prompt())
    patcher = res.output(node)
    if chunk and not params.get("blocks", True):  # the per-op patches alone, through the same installer
        cp = _chunk_patches()
        patcher = patcher.clone()
        policy = cp.ChunkPolicy(mode=chunk["mode"], count=chunk["chunks"], budget_bytes=chunk["budget_mb"] * 2**20)
        cp.install(patcher, cp.ChunkSettings(policy=policy, blocks=False))
    return patcher


def _stats(patcher):
    """This patched model's counters (an empty stand-in for the unpatched model)."""
    found = _chunk_patches().stats_of(patcher)
    return found if found is not None else _chunk_patches().ChunkStats()


def case_call(params: dict, ctx) -> dict:
    """One computed step: ``apply_model`` on 20,480 tokens."""
    import comfy.model_management as mm
    import torch

    _pin_malloc()
    patcher = _load(ctx, params)
    mm.load_models_gpu([patcher])
    device = patcher.load_device
    gen = torch.Generator().manual_seed(0)
    hunyuan = params.get("model") == "hunyuan"
    length = HUNYUAN_LENGTH if hunyuan else LENGTH
    x = torch.randn((1, 16, (length - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8), generator=gen).to(device)
    context = (torch.randn((1, 8, 64 if hunyuan else 4096), generator=gen) * 0.5).to(device)
    extra = {"y": torch.randn((1, 768), generator=gen).to(device), "guidance": torch.tensor([6.0], device=device)} if hunyuan else {}
    sigma = torch.tensor([0.8], device=device)
    opts = dict(patcher.model_options.get("transformer_options", {}))
    stats = _stats(patcher)
    stats.reset()

    def call():
        with torch.no_grad():
            return patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=dict(opts), **extra)

    result, m = ctx.measure(call)
    ctx.save_tensor("call_out", result)
    return {"seconds": m.seconds, "peak_bytes": m.peak_bytes, "tokens": x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2),
            "chunked_ops": int(stats.total_chunks()), "cuda": m.cuda, "note_threads": _threads_note()}


def _threads_note() -> str:
    import torch

    return f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def case_sampling(params: dict, ctx) -> dict:
    """A short KSampler run (every step computed) through the real prompt executor."""
    from harness import fixtures, graphs

    _pin_malloc()
    fixtures.ensure_fixtures(ctx.models_dir, which=(fixtures.WAN_T2V_LARGE,))
    chunk = _chunk_inputs(params)
    prompt, ids = graphs.wan_t2v(model=fixtures.WAN_T2V_LARGE.name, width=WIDTH, height=HEIGHT, length=LENGTH,
                                 decode=None, steps=STEPS, cfg=1.0,
                                 model_patches=[("ChunkedModelPatch", chunk)] if chunk else None)
    ctx.runner.run(graphs.wan_t2v(model=fixtures.WAN_T2V_LARGE.name, width=64, height=64, length=5, decode=None,
                                  steps=1, cfg=1.0)[0])  # warm imports and the loader once, outside the region
    res, m = ctx.measure(lambda: ctx.runner.run(prompt))
    stats = _stats(res.output(ids["patches"][-1])) if chunk else _stats(None)
    samples = res.output(ids["sampler"])["samples"]
    ctx.save_tensor("samples", samples)
    return {"seconds": m.seconds, "peak_bytes": m.peak_bytes, "steps": STEPS, "chunked_ops": int(stats.total_chunks()),
            "cuda": m.cuda, "note_threads": _threads_note()}


def run_call(params: dict) -> dict:
    """Outside the framework: one case in this process (prefer ``make bench BENCH=chunk``)."""
    import tempfile

    from bench.framework import BenchContext

    return case_call(params, BenchContext(Path(tempfile.mkdtemp())))


def run_sampling(params: dict) -> dict:
    import tempfile

    from bench.framework import BenchContext

    return case_sampling(params, BenchContext(Path(tempfile.mkdtemp())))


CHUNKED = {"chunk": True, "mode": "count", "chunks": 16}
AUTO = {"chunk": True, "mode": "auto", "budget_mb": 256}

HUNYUAN = {"model": "hunyuan"}

CASES = [
    BenchCase("chunk_call_unpatched", "chunk_call", case_call, {}),
    BenchCase("chunk_call_ops16", "chunk_call", case_call, {**CHUNKED, "blocks": False}, baseline="chunk_call_unpatched",
              compare_key="call_out"),
    BenchCase("chunk_call_count16", "chunk_call", case_call, CHUNKED, baseline="chunk_call_unpatched", compare_key="call_out"),
    BenchCase("chunk_call_auto256MiB", "chunk_call", case_call, AUTO, baseline="chunk_call_unpatched", compare_key="call_out"),
    BenchCase("chunk_hunyuan_call_unpatched", "chunk_hunyuan_call", case_call, HUNYUAN),
    BenchCase("chunk_hunyuan_call_ops16", "chunk_hunyuan_call", case_call, {**HUNYUAN, **CHUNKED, "blocks": False},
              baseline="chunk_hunyuan_call_unpatched", compare_key="call_out"),
    BenchCase("chunk_hunyuan_call_count16", "chunk_hunyuan_call", case_call, {**HUNYUAN, **CHUNKED},
              baseline="chunk_hunyuan_call_unpatched", compare_key="call_out"),
    BenchCase("chunk_sampling_unpatched", "chunk_sampling", case_sampling, {}),
    BenchCase("chunk_sampling_count16", "chunk_sampling", case_sampling, CHUNKED, baseline="chunk_sampling_unpatched",
              compare_key="samples"),
]
