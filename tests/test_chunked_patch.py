"""Chunked Model Patch: exact chunking per family, LoRA, auto sizing, chunking under LightCache caching,
hooks other packs add (``attn1_patch``, ``attn2_patch``, post-block patches) and clones.

Tolerance: fp32 on CPU, relative max |patched - unpatched| / max |unpatched| <= 1e-5
(observed: bitwise equal or ~1e-7; chunking changes only how BLAS blocks rows).
Counters are read from the patched model (``chunk_patches.stats_of``), never from a global.
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from harness import fixtures, graphs
from harness.graphs import Graph, out

RTOL = 1e-5
COUNT = {"mode": "count", "chunks": 3, "budget_mb": 0, "chunk_ffn": True, "chunk_attention": True, "chunk_resblocks": True}


def chunk_module():
    return next(m for n, m in sys.modules.items() if n.endswith("nodes.chunk_patches"))


def _testing_pack():
    return next(m for n, m in sys.modules.items() if n.endswith("lightcache_testing"))


def stats(result, node_id):
    """The counters of the Chunked Model Patch that node ``node_id`` output (or that its model was cloned from)."""
    found = chunk_module().stats_of(result.output(node_id))
    assert found is not None, f"node {node_id}'s model carries no Chunked Model Patch"
    return found


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# family id -> (loader, conditioning family, latent node + inputs, expected chunked op kinds)
FAMILIES = {
    "wan": (("UNETLoader", {"unet_name": fixtures.WAN_T2V.name, "weight_dtype": "default"}), "wan",
            ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 9, "batch_size": 1}),
            {"wan_block"}),  # whole blocks along tokens (norms, modulation, attention, FFN, residuals)
    "wan_i2v": (("UNETLoader", {"unet_name": fixtures.WAN_I2V.name, "weight_dtype": "default"}), "wan_i2v",
                ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 9, "batch_size": 1}),
                {"wan_block"}),
    "hunyuan_video": (("UNETLoader", {"unet_name": fixtures.HUNYUAN.name, "weight_dtype": "default"}), "hunyuan_video",
                      ("EmptyHunyuanLatentVideo", {"width": 64, "height": 64, "length": 5, "batch_size": 1}),
                      # double blocks: MLPs and joint attention; single blocks whole (fused linear1/linear2)
                      {"hunyuan_mlp", "attention[queries]", "hunyuan_single_block"}),
    "sd15": (("LightCacheTestUNetLoader", {"unet_name": fixtures.SD15_UNET.name, "family": "SD15"}), "sd15",
             ("EmptyLatentImage", {"width": 32, "height": 32, "batch_size": 2}),
             {"unet_ff", "unet_resblock", "unet_upsample", "attention[queries]"}),
    "svd": (("LightCacheTestUNetLoader", {"unet_name": fixtures.SVD_UNET.name, "family": "SVD_img2vid"}), "svd",
            ("EmptyLatentImage", {"width": 32, "height": 32, "batch_size": 3}),
            # spatial attention splits queries; temporal attention (3 frames, 16 positions) splits positions
            {"unet_ff", "unet_resblock", "unet_upsample", "attention[queries]", "attention[batch]"}),
}


def family_graph(family: str, patches: list, steps: int, sampler: str = "KSampler", sampler_inputs: dict | None = None,
                 pre: list | None = None):
    loader, cond_family, latent, _ = FAMILIES[family]
    g = Graph()
    model = g.add(loader[0], **loader[1])
    m = out(model)
    ids = {}
    for class_type, inputs in (pre or []) + patches:
        m = out(g.add(class_type, model=m, **inputs))
        ids[class_type] = m[0]
    ids["model"] = m[0]  # the node whose MODEL the sampler gets
    family_graph.ids = ids
    cond = g.add("LightCacheTestConditioning", family=cond_family, seed=3, prompt_index=0,
                 width=latent[1]["width"], height=latent[1]["height"],
                 length=latent[1].get("length", 4))
    lat = g.add(latent[0], **latent[1])
    ks = g.add(sampler, model=m, positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat),
               **{**graphs.KSAMPLER_DEFAULTS, "steps": steps}, **(sampler_inputs or {}))
    return g.prompt(), ks


def run_sample(runner, family, patches, steps, **kw):
    """(samples, run result, node ids: each patch's class_type -> its (last) id, "model" -> the sampled model's)."""
    prompt, ks = family_graph(family, patches, steps, **kw)
    ids = family_graph.ids
    res = runner.run(prompt)
    s = res.output(ks)
    return (s[0] if isinstance(s, (list, tuple)) else s)["samples"], res, ids


def sample(runner, family, patches, steps, **kw) -> torch.Tensor:
    return run_sample(runner, family, patches, steps, **kw)[0]


@pytest.mark.parametrize("steps", [1, 2], ids=["one_call", "sampling"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_equals_unpatched(runner, family, steps):
    """steps=1 with euler returns the model's (CFG-combined) denoised prediction of one batched call."""
    ref = sample(runner, family, [], steps)
    got, res, ids = run_sample(runner, family, [("ChunkedModelPatch", COUNT)], steps)
    kinds = {k for k, v in stats(res, ids["ChunkedModelPatch"]).chunks.items() if v}
    expected = FAMILIES[family][3]
    assert expected <= kinds, f"chunked ops {kinds}, expected at least {expected}"
    assert got.shape == ref.shape
    assert rel_diff(got, ref) <= RTOL, f"{family}: relative diff {rel_diff(got, ref):.3e}"


def _write_lora(models_dir) -> str:
    """A tiny random LoRA (generic 'diffusion_model.<module>.lora_up/down' keys) for the Wan fixture."""
    from safetensors.torch import save_file

    path = models_dir / "loras" / "tiny_wan_chunk_test_lora.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(7)
        sd = {}
        for block in (0, 1):
            for name, (o, i) in {f"blocks.{block}.ffn.0": (256, 128), f"blocks.{block}.ffn.2": (128, 256),
                                 f"blocks.{block}.self_attn.q": (128, 128), f"blocks.{block}.self_attn.k": (128, 128),
                                 f"blocks.{block}.cross_attn.q": (128, 128)}.items():
                sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, i, generator=gen) * 0.2
                sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(o, 4, generator=gen) * 0.2
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
    return path.name


_LORA_REF: dict = {}


@pytest.mark.parametrize("lora_first", [True, False], ids=["lora_then_chunk", "chunk_then_lora"])
def test_lora_patched_weights(runner, models_dir, lora_first):
    lora = ("LoraLoaderModelOnly", {"lora_name": _write_lora(models_dir), "strength_model": 1.0})
    if "ref" not in _LORA_REF:
        plain = sample(runner, "wan", [], 3)
        _LORA_REF["ref"] = sample(runner, "wan", [lora], 3)
        assert rel_diff(_LORA_REF["ref"], plain) > 1e-3, "the LoRA must change the output (else this test proves nothing)"
    ref = _LORA_REF["ref"]
    chunk = ("ChunkedModelPatch", COUNT)
    got, res, ids = run_sample(runner, "wan", [lora, chunk] if lora_first else [chunk, lora], 3)
    assert stats(res, ids["ChunkedModelPatch"]).chunks["wan_block"] > 0
    assert rel_diff(got, ref) <= RTOL


def _lightcache_available() -> str | None:
    try:
        import nodes as comfy_nodes  # the host's nodes.py

        missing = [n for n in ("LightCacheSampler", "LightCacheModelPatch") if n not in comfy_nodes.NODE_CLASS_MAPPINGS]
    except ImportError:
        return "host not booted"
    return f"{', '.join(missing)} not registered (nodes/sampler_node.py not there yet)" if missing else None


CACHE = {"cache_mode": "step", "threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0, "cache_device": "auto",
         "warmup_steps": 1, "max_consecutive_reuse": 2, "block_first": 1, "block_last": 1}


@pytest.mark.parametrize("order", ["chunk_then_lightcache_patch", "lightcache_patch_then_chunk", "chunk_then_lightcache_sampler"])
def test_chunking_active_in_computed_steps_of_cached_run(runner, order):
    """Counts chunk executions: every computed evaluation of a cached run runs chunked."""
    reason = _lightcache_available()
    if reason:
        pytest.skip(reason)
    steps, blocks = 10, 2  # the tiny Wan fixture has 2 blocks
    chunk = ("ChunkedModelPatch", COUNT)
    lc_patch = ("LightCacheModelPatch", CACHE)
    if order == "chunk_then_lightcache_sampler":
        kw = {"sampler": "LightCacheSampler", "sampler_inputs": CACHE, "pre": [chunk]}
        patches = []
    else:
        kw = {}
        patches = [chunk, lc_patch] if order == "chunk_then_lightcache_patch" else [lc_patch, chunk]
    _, res, ids = run_sample(runner, "wan", patches, steps, **kw)
    counts = stats(res, ids["ChunkedModelPatch"])
    block_calls = counts.calls["wan_block"]
    assert block_calls > 0, "no computed step ran a chunked block: chunking is inactive under caching"
    # every block call that ran was chunked into 3 pieces (COUNT) ...
    assert counts.chunks["wan_block"] == 3 * block_calls
    # ... and caching really skipped work: fewer block evaluations than an uncached run (steps x 2 blocks)
    assert block_calls < steps * blocks, f"{block_calls} block calls: nothing was reused, so the test proves nothing"


def test_auto_mode_without_pressure_leaves_tiny_model_whole(runner):
    ref = sample(runner, "wan", [], 2)
    got, res, ids = run_sample(runner, "wan", [("ChunkedModelPatch", {**COUNT, "mode": "auto"})], 2)
    counts = stats(res, ids["ChunkedModelPatch"])
    assert counts.calls["wan_block"] > 0 and counts.total_chunks() == 0, "the tiny model fits free memory: auto must not chunk"
    assert rel_diff(got, ref) <= RTOL


def test_auto_mode_plans_from_patcher_free_memory_and_budget(comfy_host, caplog):
    """auto: rows = share x free // bytes_per_row (a quarter of free memory), free from the patcher's
    get_free_memory; a budget overrides it."""
    import weakref

    cp = chunk_module()
    asked = []

    class Patcher:
        def get_free_memory(self, device):
            asked.append(device)
            return 1_000_000

    patcher = Patcher()
    planner = cp.Planner(cp.ChunkSettings(policy=cp.ChunkPolicy(mode="auto")), weakref.ref(patcher))
    with caplog.at_level(logging.INFO, logger="LightCache"):
        rows = planner.rows("wan_ffn", 10_000, 1_000, torch.device("cpu"))
    assert asked and rows == 250 and cp.AUTO_SHARE == 0.25  # 0.25 x 1e6 // 1e3
    assert any("wan_ffn 10000 rows -> 40 chunk(s)" in r.getMessage() for r in caplog.records)
    budget = cp.Planner(cp.ChunkSettings(policy=cp.ChunkPolicy(mode="auto", budget_bytes=64_000)), weakref.ref(patcher))
    assert budget.rows("wan_ffn", 10_000, 1_000, torch.device("cpu")) == 64
    count = cp.Planner(cp.ChunkSettings(policy=cp.ChunkPolicy(mode="count", count=3)), None)
    assert count.rows("x", 10, 1, torch.device("cpu")) == 4


def test_unsupported_family_raises_clear_error(comfy_host):
    cp = chunk_module()

    class FakeModel:
        diffusion_model = torch.nn.Linear(2, 2)

    class FakePatcher:
        model = FakeModel()
        model_options = {"transformer_options": {}}
        object_patches = {}

    settings = cp.ChunkSettings(policy=cp.ChunkPolicy(mode="count", count=2))
    with pytest.raises(ValueError) as err:
        cp.install(FakePatcher(), settings)
    text = str(err.value)
    assert "Chunked Model Patch" in text and "'model'" in text and "Supported" in text


def test_input_model_left_unpatched(runner):
    prompt, ks = family_graph("wan", [("ChunkedModelPatch", COUNT)], 1)
    res = runner.run(prompt)
    base, patched = res.output("1"), res.output("2")
    assert not any(k.endswith(".forward") for k in base.object_patches)
    assert any(k.endswith("ffn.forward") for k in patched.object_patches)
    assert "optimized_attention_override" not in base.model_options.get("transformer_options", {})


@pytest.mark.parametrize("backend", ["attention_basic", "attention_sub_quad", "attention_split", "attention_pytorch"])
@pytest.mark.parametrize("layout", ["plain", "skip_reshape", "masked_queries", "temporal_batch"])
def test_attention_override_is_exact(comfy_host, backend, layout):
    """Query (or batch) chunks of every host attention backend equal the unchunked call."""
    import comfy.ldm.modules.attention as attention

    cp = chunk_module()
    func = getattr(attention, backend)
    override = cp.ChunkedAttention(cp.Planner(cp.ChunkSettings(policy=cp.ChunkPolicy(mode="count", count=3))))
    gen = torch.Generator().manual_seed(0)
    heads, d = 2, 16
    b, lq, lk = (24, 5, 5) if layout == "temporal_batch" else (2, 37, 41)
    kwargs = {}
    if layout == "skip_reshape":
        q, k, v = (torch.randn(b, heads, n, d, generator=gen) for n in (lq, lk, lk))
        kwargs["skip_reshape"] = True
    else:
        q, k, v = (torch.randn(b, n, heads * d, generator=gen) for n in (lq, lk, lk))
    if layout == "masked_queries":
        kwargs["mask"] = torch.randn(b, lq, lk, generator=gen)
    ref = func(q, k, v, heads, **kwargs)
    got = override(func, q, k, v, heads, **kwargs)
    assert override.planner.stats.total_chunks() == 3
    assert got.shape == ref.shape
    assert rel_diff(got, ref) <= RTOL


# ---------------------------------------------------------------- hooks other packs add, and clones

HOOKS = ["attn1_patch", "attn2_patch", "double_block"]


@pytest.mark.parametrize("chunk_first", [False, True], ids=["hook_then_chunk", "chunk_then_hook"])
@pytest.mark.parametrize("hook", HOOKS)
def test_block_hooks_called_as_the_host_calls_them(runner, hook, chunk_first):
    """A hook the host's Wan code calls (newer hosts: attn1_patch in self-attention, attn2_patch and
    post-block patches in the block loop) sees the same tensors, as often, with the same block keys,
    whether or not the model is chunk-patched; and the output is unchanged."""
    calls = _testing_pack().HOOK_CALLS
    hook_node = ("LightCacheTestBlockHooks", {"hook": hook, "tag": f"ref-{hook}"})
    ref = sample(runner, "wan", [hook_node], 2)
    ref_calls = calls.pop(f"ref-{hook}", [])
    if not ref_calls:
        pytest.skip(f"this host's Wan never calls {hook!r} hooks")
    hook_node = ("LightCacheTestBlockHooks", {"hook": hook, "tag": f"got-{hook}"})
    chunk = ("ChunkedModelPatch", COUNT)
    got, res, ids = run_sample(runner, "wan", [chunk, hook_node] if chunk_first else [hook_node, chunk], 2)
    got_calls = calls.pop(f"got-{hook}", [])
    assert got_calls == ref_calls, f"{hook} calls differ under Chunked Model Patch:\n{got_calls}\nvs\n{ref_calls}"
    assert rel_diff(got, ref) <= RTOL, f"{hook}: relative diff {rel_diff(got, ref):.3e}"
    assert stats(res, ids["ChunkedModelPatch"]).total_chunks() > 0, "nothing was chunked, so the test proves nothing"
    assert all(c[1] is not None and c[2] == 2 for c in got_calls), f"block keys missing in {got_calls}"


def test_block_chunks_when_no_hook_is_present_and_runs_whole_when_one_is(runner):
    """The chunked block is the default; a hook the block consults makes it run whole (and the
    modules inside it chunk themselves where still exact)."""
    _, res, ids = run_sample(runner, "wan", [("ChunkedModelPatch", COUNT)], 1)
    plain = stats(res, ids["ChunkedModelPatch"])
    assert plain.chunks["wan_block"] == 3 * plain.calls["wan_block"] > 0
    hook_node = ("LightCacheTestBlockHooks", {"hook": "attn2_patch", "tag": "whole"})
    _, res, ids = run_sample(runner, "wan", [("ChunkedModelPatch", COUNT), hook_node], 1)
    called = _testing_pack().HOOK_CALLS.pop("whole", [])
    hooked = stats(res, ids["ChunkedModelPatch"])
    if not called:
        pytest.skip("this host's Wan blocks never call attn2_patch hooks")
    assert hooked.chunks["wan_block"] == 0 and hooked.calls["wan_block"] == 0
    assert hooked.chunks["wan_ffn"] == 3 * hooked.calls["wan_ffn"] > 0


def test_clones_of_a_chunk_patched_model_share_nothing_mutable(runner):
    """A second Chunked Model Patch, a hook and a sampler on clones leave the first patched model as it
    was: its options, object patches and counters; and each install counts only its own chunks."""
    g = Graph()
    loader, cond_family, latent, _ = FAMILIES["wan"]
    model = g.add(loader[0], **loader[1])
    first = g.add("ChunkedModelPatch", model=out(model), **COUNT)
    second = g.add("ChunkedModelPatch", model=out(first), **{**COUNT, "chunks": 2})
    hooked = g.add("LightCacheTestBlockHooks", model=out(first), hook="attn2_patch", tag="clone")
    cond = g.add("LightCacheTestConditioning", family=cond_family, seed=3, prompt_index=0, width=64, height=64, length=9)
    lat = g.add(latent[0], **latent[1])
    samplers = {}
    for name, node in (("first", first), ("second", second), ("hooked", hooked)):
        samplers[name] = g.add("KSampler", model=out(node), positive=out(cond, 0), negative=out(cond, 1),
                               latent_image=out(lat), **{**graphs.KSAMPLER_DEFAULTS, "steps": 1})
    res = runner.run(g.prompt())
    _testing_pack().HOOK_CALLS.pop("clone", None)
    a, b, h = res.output(first), res.output(second), res.output(hooked)
    a_opts = a.model_options.get("transformer_options", {})
    assert a_opts is not b.model_options.get("transformer_options") and a_opts is not h.model_options.get("transformer_options")
    assert "patches" not in a_opts, "a hook added to a clone reached the original model"
    assert a_opts["optimized_attention_override"] is not b.model_options["transformer_options"]["optimized_attention_override"]
    assert not set(map(id, a.object_patches.values())) & set(map(id, b.object_patches.values()))
    sa, sb = stats(res, first), stats(res, second)
    assert sa is not sb
    # first and hooked (a clone of first, same install) ran 3-piece chunks; second ran 2-piece ones
    assert sa.chunks["wan_block"] == 3 * sa.calls["wan_block"] > 0
    assert sb.chunks["wan_block"] == 2 * sb.calls["wan_block"] > 0
    assert stats(res, hooked) is sa
    ref = sample(runner, "wan", [("ChunkedModelPatch", COUNT)], 1)
    first_out = res.output(samplers["first"])["samples"]
    assert torch.equal(first_out, ref), "sampling clones changed what the first patched model computes"


# ---------------------------------------------------------------- the chunked Wan block's passes

def _wan_call(patcher, seed=0):
    """One ``apply_model`` call of the tiny Wan fixture (cond and uncond batched) on 9 x 8 x 8 latent tokens."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])  # applies the object patches
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 16, 3, 16, 16), generator=gen)
    context = torch.randn((2, 8, 4096), generator=gen) * 0.5
    opts = dict(patcher.model_options.get("transformer_options", {}))
    with torch.inference_mode():
        return patcher.model.apply_model(x, torch.tensor([0.7, 0.7]), c_crossattn=context, transformer_options=opts)


def _projection_rows(patcher):
    """Rows every q/k/v/o projection of every Wan self-attention sees in one call: {name: rows}."""
    rows: dict = {}
    handles = []
    for name, module in patcher.model.diffusion_model.named_modules():
        if name.endswith(("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o")):
            def hook(m, args, name=name.rsplit(".", 1)[1]):
                rows[name] = rows.get(name, 0) + args[0].numel() // args[0].shape[-1]
            handles.append(module.register_forward_pre_hook(hook))
    try:
        out = _wan_call(patcher)
    finally:
        for h in handles:
            h.remove()
    return rows, out


@pytest.mark.parametrize("path", ["wan_self_attention_patch", "attention_override"])
def test_chunked_wan_block_runs_each_projection_once_per_token(comfy_host, path, monkeypatch):
    """Through the Wan self-attention patch the chunked block computes every q, k, v and o row once, as the
    unpatched model does (keys and values in the first pass, queries and o in the second, the filed rows in
    the third); through the attention override alone (a self-attention layout the patch does not know) it
    computes q, k and v twice. Both equal the unpatched call."""
    import nodes

    cp = chunk_module()
    base = nodes.UNETLoader().load_unet(fixtures.WAN_T2V.name, "default")[0]
    ref_rows, ref = _projection_rows(base)
    if path == "attention_override":
        monkeypatch.setattr(cp.compat, "wan_self_attention_parts", lambda module: None)
    patched = base.clone()
    report = cp.install(patched, cp.ChunkSettings(policy=cp.ChunkPolicy(mode="count", count=3)))
    assert (report.patched["self_attention"] > 0) == (path == "wan_self_attention_patch")
    rows, got = _projection_rows(patched)
    stats = cp.stats_of(patched)
    assert stats.chunks["wan_block"] == 3 * stats.calls["wan_block"] > 0
    assert rel_diff(got, ref) <= RTOL
    if path == "wan_self_attention_patch":
        assert rows == ref_rows, (rows, ref_rows)
    else:
        assert rows["o"] == ref_rows["o"] and all(rows[p] == 2 * ref_rows[p] for p in "qkv"), (rows, ref_rows)


def test_chunked_wan_block_releases_keys_and_values_before_its_feed_forward(comfy_host):
    """The third pass (feed-forward, cross-attention, residuals) runs with the keys and values released and the
    block's output written over the attention-output buffer: at each FFN call the block holds at most two
    full-size hidden states of its own (the attention output/block output buffer and the block input)."""
    import nodes

    cp = chunk_module()
    base = nodes.UNETLoader().load_unet(fixtures.WAN_T2V.name, "default")[0]
    patched = base.clone()
    cp.install(patched, cp.ChunkSettings(policy=cp.ChunkPolicy(mode="count", count=3), ffn=True))
    seen = []
    ffn = patched.model.diffusion_model.blocks[0].ffn

    def at_ffn(module, args):
        state = cp._block_pass()
        if state is not None:
            seen.append((state.phase, sorted(k for k, v in state.buffers.items() if isinstance(v, torch.Tensor))))

    handle = ffn.register_forward_pre_hook(at_ffn)
    try:
        _wan_call(patched)
    finally:
        handle.remove()
    assert seen and all(phase == "finish" and names == ["y"] for phase, names in seen), seen
