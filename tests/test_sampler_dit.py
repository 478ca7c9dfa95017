"""LightCache Sampler / Model Patch on video DiTs, through ComfyUI's execution (CPU, tiny fixtures).

Block evaluations are counted with a global module forward hook on the DiT
block classes (test-only instrumentation). Test-only nodes (split-CFG forcing,
an exception injector) are registered into the host's NODE_CLASS_MAPPINGS for
the duration of this module.
"""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch

from harness import fixtures, graphs
from harness.graphs import Graph, out
from harness.model_nodes import ModelPatchNode
from harness.runner import PromptFailed

STEPS = 10  # more than the few-step rule's 8, so reuse may happen
# Force reuse on the random-weight fixtures: generous budget, short warm-up.
FORCE = dict(threshold=3.0, start_percent=0.0, end_percent=1.0, cache_device="auto", warmup_steps=1,
             max_consecutive_reuse=2)
PSNR_FLOOR = 20.0  # dB against KSampler on the random tiny Wan at 10 steps with the forced settings above


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    rng = float(b.max() - b.min())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng * rng / mse)).item()


@contextlib.contextmanager
def count_blocks():
    """Counts per-sample forward evaluations of DiT blocks (Wan attention blocks, HunyuanVideo double/single blocks)."""
    counts = {"n": 0, "calls": 0}
    names = {"WanAttentionBlock", "DoubleStreamBlock", "SingleStreamBlock"}

    def hook(module, args, output):
        # one block evaluation per batch row (batched CFG runs both branches in one call)
        if type(module).__name__ in names:
            first = output[0] if isinstance(output, (tuple, list)) else output
            counts["n"] += int(first.shape[0])
            counts["calls"] += 1

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def _dit_cache_module():
    for name, mod in sys.modules.items():
        if name.endswith("nodes.dit_cache") and hasattr(mod, "DitRun"):
            return mod
    raise AssertionError("dit_cache module not loaded")


# ----------------------------------------------------------------------------- test-only nodes

class _SplitCFG(ModelPatchNode):
    """MODEL -> MODEL that makes ComfyUI run cond and uncond in separate calls.

    Real mechanism: ``_calc_cond_batch`` batches conds only while
    ``model.memory_required(...) * 1.5 < free_memory``; an object patch of the
    BaseModel's ``memory_usage_factor`` makes every batch "too big".
    """

    def patch(self, model):
        m = model.clone()
        m.add_object_patch("memory_usage_factor", 1e12)
        return (m,)


class _RaiseMidRun(ModelPatchNode):
    """MODEL -> MODEL whose DIFFUSION_MODEL wrapper raises on the n-th call."""

    EXTRA_INPUTS = {"after": ("INT", {"default": 5, "tooltip": "calls before raising"})}

    def patch(self, model, after):
        import comfy.patcher_extension

        calls = {"n": 0}

        def wrapper(executor, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] > after:
                raise RuntimeError("injected failure")
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "lightcache_test_raise", wrapper)
        return (m,)


TEST_NODES = {"LightCacheTestSplitCFG": _SplitCFG, "LightCacheTestRaiseMidRun": _RaiseMidRun}


@pytest.fixture(scope="module", autouse=True)
def test_nodes(comfy_host):
    mapping = comfy_host.nodes.NODE_CLASS_MAPPINGS
    mapping.update(TEST_NODES)
    yield
    for k in TEST_NODES:
        mapping.pop(k, None)


@pytest.fixture(scope="module")
def reference(runner):
    """KSampler on the tiny random Wan, 8 euler steps, CFG 5."""
    p, ids = graphs.wan_t2v(steps=STEPS, decode=None)
    with count_blocks() as c:
        res = runner.run(p)
    return res.output(ids["sampler"])["samples"], c["n"]


def _lc(runner, mode, count=False, **kw):
    inputs = {**FORCE, "cache_mode": mode, **kw.pop("inputs", {})}
    p, ids = graphs.wan_t2v(steps=kw.pop("steps", STEPS), decode=None, sampler="LightCacheSampler", sampler_inputs=inputs, **kw)
    with count_blocks() as c:
        res = runner.run(p)
    res.block_calls = c["calls"]
    return res.output(ids["sampler"])["samples"], res.output(ids["sampler"], 1), c["n"], res, ids


# ----------------------------------------------------------------------------- tests

def test_off_is_bit_identical_to_ksampler(runner, reference):
    ref, ref_blocks = reference
    samples, report, blocks, res, ids = _lc(runner, "off")
    assert torch.equal(samples, ref)
    assert blocks == ref_blocks
    assert "off" in report


@pytest.mark.parametrize("mode", ["step", "cfg", "block", "mix"])
def test_each_granularity_reduces_block_evaluations(runner, reference, mode):
    ref, ref_blocks = reference
    samples, report, blocks, res, ids = _lc(runner, mode)
    assert blocks < ref_blocks, report
    assert _psnr(samples, ref) > PSNR_FLOOR, report
    ui = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert ui["reused"] > 0 and len(ui["timeline"]) == ui["evaluations"] == 2 * STEPS  # one cell per branch evaluation
    if mode != "mix":
        assert set(ui["reused_by_granularity"]) == {mode}
    assert res.progress_texts(ids["sampler"]), "no progress text sent to the node"


def test_split_and_batched_cfg_agree(runner):
    batched, rep_b, rows_b, res_b, _ = _lc(runner, "mix")
    split, rep_s, rows_s, res_s, _ = _lc(runner, "mix", model_patches=[("LightCacheTestSplitCFG", {})])
    # the mechanism really split: same block rows, one row per block call instead of two
    assert rows_b == rows_s and res_s.block_calls == rows_s and res_b.block_calls < rows_b
    # same decisions (timeline lines) and the same output up to batched-vs-split float order
    assert rep_b.splitlines()[1:3] == rep_s.splitlines()[1:3]
    assert torch.allclose(batched, split, atol=1e-4, rtol=1e-4)


def test_cfg_1_drops_uncond(runner):
    samples, report, blocks, res, ids = _lc(runner, "mix", cfg=1.0)
    assert samples.isfinite().all()
    ui = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert {c["branch"] for c in ui["timeline"]} == {"cond"}
    assert ui["reused"] > 0


@pytest.mark.parametrize("sampler_name", ["heun", "dpm_2"])
def test_multi_evaluation_samplers(runner, sampler_name):
    samples, report, blocks, res, ids = _lc(runner, "mix", steps=6, sampler_name=sampler_name)
    assert samples.isfinite().all()
    ui = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert ui["evaluations"] > 2 * 6  # several model evaluations per step (2 branches each)


def test_ksampler_advanced_partial_schedule(runner):
    patch = ("LightCacheModelPatch", {**FORCE, "cache_mode": "mix"})
    p, ids = graphs.wan_t2v(steps=10, decode=None, sampler="KSamplerAdvanced", model_patches=[patch],
                            sampler_inputs=dict(add_noise="enable", noise_seed=0, start_at_step=3, end_at_step=8,
                                                return_with_leftover_noise="disable"))
    for k in ("seed", "denoise"):
        p[ids["sampler"]]["inputs"].pop(k, None)
    res = runner.run(p)
    assert res.output(ids["sampler"])["samples"].isfinite().all()


def test_degenerate_sigmas_compute_everything(runner):
    """A 1-step run (sigmas [s, 0]) never reuses and matches KSampler exactly."""
    samples, report, *_ = _lc(runner, "mix", steps=1)
    p, ids = graphs.wan_t2v(steps=1, decode=None)
    ref = runner.run(p).output(ids["sampler"])["samples"]
    assert torch.equal(samples, ref)
    assert "reused 0" in report


def test_state_isolation_between_runs_and_clones(runner):
    a, rep_a, *_ = _lc(runner, "mix")
    b, rep_b, *_ = _lc(runner, "mix")
    assert torch.equal(a, b) and rep_a.splitlines()[1:] == rep_b.splitlines()[1:]
    # two samplers on one patched model (two clones of one model) in one graph
    g = Graph()
    model = g.add("UNETLoader", unet_name=fixtures.WAN_T2V.name, weight_dtype="default")
    cond = g.add("LightCacheTestConditioning", family="wan", seed=0, prompt_index=0, width=64, height=64, length=9)
    lat = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1)
    params = {**graphs.KSAMPLER_DEFAULTS, "steps": STEPS, **FORCE}
    s1 = g.add("LightCacheSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1),
               latent_image=out(lat), cache_mode="mix", **params)
    s2 = g.add("LightCacheSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1),
               latent_image=out(lat), cache_mode="step", **params)
    res = runner.run(g.prompt())
    assert torch.equal(res.output(s1)["samples"], a)
    step_alone, *_ = _lc(runner, "step")
    assert torch.equal(res.output(s2)["samples"], step_alone)


def test_cleanup_after_injected_exception(runner, monkeypatch):
    dc = _dit_cache_module()
    runs = []
    orig_init = dc.DitRun.__init__

    def tracking_init(self, *a, **k):
        orig_init(self, *a, **k)
        runs.append(self)

    monkeypatch.setattr(dc.DitRun, "__init__", tracking_init)
    patch = ("LightCacheModelPatch", {**FORCE, "cache_mode": "mix", "cache_device": "cpu"})
    p, ids = graphs.wan_t2v(steps=STEPS, decode=None, model_patches=[patch, ("LightCacheTestRaiseMidRun", {"after": 3})])
    res = runner.run(p, raise_on_error=False)
    assert res.error is not None and "injected failure" in str(res.error.get("exception_message"))
    assert len(runs) == 1
    run = runs[0]
    assert run.engine.stores, "the run never stored anything: the test did not exercise the cache"
    for store in run.engine.stores.values():
        assert len(store) == 0 and store.pinned_bytes == 0 and store.stats.device_bytes == 0
    assert not run.engine.trajectories  # per-trajectory state (signals, block scratch) is gone too
    patched = res.outputs[ids["patches"][0]][0]
    to = patched.model_options.get("transformer_options", {})
    assert dc.RUN_KEY not in to
    assert "dit" not in to.get("patches_replace", {})


def test_model_patch_composes_with_sampler_custom_advanced(runner, reference):
    ref, ref_blocks = reference

    def graph(with_patch: bool):
        g = Graph()
        model = out(g.add("UNETLoader", unet_name=fixtures.WAN_T2V.name, weight_dtype="default"))
        if with_patch:
            model = out(g.add("LightCacheModelPatch", model=model, cache_mode="mix", **FORCE))
        cond = g.add("LightCacheTestConditioning", family="wan", seed=0, prompt_index=0, width=64, height=64, length=9)
        lat = g.add("EmptyHunyuanLatentVideo", width=64, height=64, length=9, batch_size=1)
        guider = g.add("CFGGuider", model=model, positive=out(cond, 0), negative=out(cond, 1), cfg=5.0)
        sampler = g.add("KSamplerSelect", sampler_name="euler")
        sigmas = g.add("BasicScheduler", model=model, scheduler="simple", steps=STEPS, denoise=1.0)
        noise = g.add("RandomNoise", noise_seed=0)
        sca = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(guider), sampler=out(sampler),
                    sigmas=out(sigmas), latent_image=out(lat))
        return g.prompt(), sca

    p, sca = graph(True)
    with count_blocks() as c:
        res = runner.run(p)
    samples = res.output(sca)
    samples = samples["samples"] if isinstance(samples, dict) else samples
    assert c["n"] < ref_blocks
    assert _psnr(samples, ref) > PSNR_FLOOR


@pytest.mark.parametrize("mode", ["step", "cfg", "block"])
def test_hunyuan_video_modes(runner, mode):
    with count_blocks() as base:
        p, ids = graphs.wan_t2v(model=fixtures.HUNYUAN.name, family="hunyuan_video", length=5, steps=10, decode=None)
        runner.run(p)
    samples, report, blocks, res, ids = _lc(runner, mode, model=fixtures.HUNYUAN.name, family="hunyuan_video",
                                            length=5, steps=10)
    assert samples.isfinite().all()
    assert blocks < base["n"], report


def test_wan_i2v_36_channels(runner):
    samples, report, blocks, res, ids = _lc(runner, "mix", model=fixtures.WAN_I2V.name, family="wan_i2v", length=5)
    assert samples.shape[1] == 16 and samples.isfinite().all()
    assert "reused 0" not in report


def test_block_mode_on_model_without_block_loop_is_a_clear_error(runner):
    g = Graph()
    model = g.add("LightCacheTestUNetLoader", unet_name=fixtures.SD15_UNET.name, family="SD15")
    cond = g.add("LightCacheTestConditioning", family="sd15", seed=0, prompt_index=0, width=64, height=64, length=1)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)
    g.add("LightCacheSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat),
          **{**graphs.KSAMPLER_DEFAULTS, **FORCE, "steps": 2, "cache_mode": "block"})
    with pytest.raises(PromptFailed) as err:
        runner.run(g.prompt())
    msg = str(err.value)
    assert "LightCache Sampler" in msg and "block" in msg and "Fix" in msg
