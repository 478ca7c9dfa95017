"""deepcache (UNet branch caching) through ComfyUI's real execution, on the tiny SD1.5 and SVD UNets.

Most graphs use the pack's ``LightCacheSampler`` (cache_mode "deepcache").
Settings the node does not expose (branch, interval, an injected failure, a
``forward_timestep_embed_patch`` standing in for AnimateDiff-Evolved's motion
modules) go through ``LightCacheTestDeepCache``, a MODEL -> MODEL node defined
and registered by this test module only; it calls the public
``unet_cache.apply_deepcache`` and feeds ComfyUI's own ``KSampler``.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from harness import fixtures
from harness.graphs import Graph, out

STEPS = 6  # interval 3 (uniform under 10 steps), final step full: full {0, 3, 5}, cache {1, 2, 4}
CACHE_STEPS = {1, 2, 4}
BATCH = 2
REPORTS: list = []
LATENT_HW = 8  # 64 px


def _unet_cache(comfy_host):
    pkg = comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheSampler"].__module__.rsplit(".", 1)[0]
    return importlib.import_module(pkg + ".unet_cache")


class LightCacheTestDeepCache:
    """Test-only: ``apply_deepcache`` with explicit settings and optional fault/patch injection."""

    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    module = None

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "model"}),
            "interval": ("INT", {"default": 3, "min": 1, "max": 100, "tooltip": "interval"}),
            "branch": ("INT", {"default": 0, "min": 0, "max": 100, "tooltip": "branch"}),
            "schedule": (["uniform", "nonuniform"], {"tooltip": "schedule"}),
            "fail_at_call": ("INT", {"default": -1, "min": -1, "max": 1000, "tooltip": "raise inside this UNet call"}),
            "embed_patch": ("BOOLEAN", {"default": False, "tooltip": "count a forward_timestep_embed_patch"}),
        }}

    def patch(self, model, interval, branch, schedule, fail_at_call, embed_patch):
        uc = self.module
        settings = uc.DeepCacheSettings(interval=interval, branch=branch, schedule=schedule)
        m = uc.apply_deepcache(model, settings)
        if embed_patch:
            from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

            def handler(layer, x, emb, context, transformer_options, output_shape, time_context, num_video_frames,
                        image_only_indicator):
                EMBED_CALLS.append(tuple(x.shape))
                return layer(x)

            m.set_model_patch((Downsample, handler), "forward_timestep_embed_patch")
        if fail_at_call >= 0:
            calls = {"n": 0}

            def fail(executor, *args, **kwargs):
                calls["n"] += 1
                if calls["n"] > fail_at_call:
                    STATE.append(uc._ACTIVE.get())
                    raise RuntimeError("injected failure")
                return executor(*args, **kwargs)

            import comfy.patcher_extension

            m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "lightcache_test_fail", fail)
        return (m,)


EMBED_CALLS: list = []
STATE: list = []


@pytest.fixture(scope="module")
def uc(comfy_host):
    module = _unet_cache(comfy_host)
    LightCacheTestDeepCache.module = module
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    mappings["LightCacheTestDeepCache"] = LightCacheTestDeepCache
    yield module
    mappings.pop("LightCacheTestDeepCache", None)


SD15 = (fixtures.SD15_UNET, "SD15", "sd15")
SVD = (fixtures.SVD_UNET, "SVD_img2vid", "svd")


def _graph(family=SD15, sampler="KSampler", sampler_inputs=None, patch=None, steps=STEPS, batch=BATCH, seed=0):
    fixture, cls, cond_family = family
    g = Graph()
    model = g.add("LightCacheTestUNetLoader", unet_name=fixture.name, family=cls)
    model_out = out(model)
    if patch is not None:
        model_out = out(g.add("LightCacheTestDeepCache", model=model_out, **{"interval": 3, "branch": 0, "schedule": "uniform",
                                                                            "fail_at_call": -1, "embed_patch": False, **patch}))
    cond = g.add("LightCacheTestConditioning", family=cond_family, seed=1, prompt_index=0, width=64, height=64, length=batch)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=batch)
    s = g.add(sampler, model=model_out, positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat), seed=seed,
              steps=steps, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0, **(sampler_inputs or {}))
    return g.prompt(), s, model


def _lightcache(mode="deepcache", threshold=0.6, cache_device="auto"):
    return {"cache_mode": mode, "threshold": threshold, "start_percent": 0.0, "end_percent": 1.0, "cache_device": cache_device}


def _run(runner, prompt, **kwargs):
    """Run ``prompt`` with a report channel open (as LightCache Sampler does) and keep the reports."""
    lifecycle = importlib.import_module(LightCacheTestDeepCache.module.__name__.rsplit(".", 1)[0] + ".run_lifecycle")
    with lifecycle.report_channel() as channel:
        result = runner.run(prompt, **kwargs)
    REPORTS.extend(channel.reports)
    return result


def _samples(runner, prompt, node):
    return runner.run(prompt).output(node)["samples"]


@pytest.fixture(scope="module")
def ksampler_ref(runner):
    refs = {}
    for fam in (SD15, SVD):
        prompt, s, _ = _graph(fam)
        refs[fam[1]] = _samples(runner, prompt, s)
    return refs


def test_off_is_bit_identical_to_ksampler(runner, uc, ksampler_ref):
    prompt, s, _ = _graph(SD15, "LightCacheSampler", _lightcache("off"))
    assert torch.equal(_samples(runner, prompt, s), ksampler_ref["SD15"])


@pytest.mark.parametrize("family", [SD15, SVD], ids=["sd15", "svd"])
def test_interval_one_equals_ksampler(runner, uc, ksampler_ref, family):
    # threshold 0 -> interval 1 through the node; interval 1 through the patch node
    prompt, s, _ = _graph(family, "LightCacheSampler", _lightcache(threshold=0.0))
    torch.testing.assert_close(_samples(runner, prompt, s), ksampler_ref[family[1]], rtol=1e-5, atol=1e-5)
    prompt, s, _ = _graph(family, patch={"interval": 1})
    torch.testing.assert_close(_samples(runner, prompt, s), ksampler_ref[family[1]], rtol=1e-5, atol=1e-5)


def test_deepcache_node_runs_and_reports(runner, uc, ksampler_ref):
    prompt, s, _ = _graph(SD15, "LightCacheSampler", _lightcache())
    res = runner.run(prompt)
    samples, text = res.output(s, 0)["samples"], res.output(s, 1)
    assert samples.isfinite().all() and not torch.equal(samples, ksampler_ref["SD15"])
    assert "deepcache" in text and "full steps: [0, 3, 5]" in text
    assert (samples - ksampler_ref["SD15"]).abs().max() < 0.5 * ksampler_ref["SD15"].abs().max()


class _BlockRecorder:
    """Global forward hooks: which UNet blocks ran real leaf ops, per UNet call."""

    def __init__(self, unet_cls):
        self.unet_cls = unet_cls
        self.calls: list[set[str]] = []
        self.names: dict[int, str] = {}
        self.handles = []

    def __enter__(self):
        def pre(module, args):
            if isinstance(module, self.unet_cls):
                if not self.names:
                    for name, mod in module.named_modules():
                        parts = name.split(".")
                        if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 1:
                            self.names[id(mod)] = f"{parts[0]}.{parts[1]}"
                        elif parts[0] == "middle_block":
                            self.names[id(mod)] = "middle_block"
                self.calls.append(set())
            elif not list(module.children()) and self.calls and id(module) in self.names:
                self.calls[-1].add(self.names[id(module)])

        self.handles.append(torch.nn.modules.module.register_module_forward_pre_hook(pre))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _expected_blocks(n, branch):
    return {f"input_blocks.{i}" for i in range(branch + 1)} | {f"output_blocks.{j}" for j in range(n - 1 - branch, n)}


@pytest.mark.parametrize("family,branch", [(SD15, 0), (SD15, 1), (SVD, 0)], ids=["sd15-b0", "sd15-b1", "svd-b0"])
def test_cache_step_runs_only_the_branch_blocks(runner, uc, family, branch):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    REPORTS.clear()
    prompt, s, model_node = _graph(family, patch={"branch": branch})
    with _BlockRecorder(UNetModel) as rec:
        res = _run(runner, prompt)
    unet = res.output(model_node).model.diffusion_model
    n = len(unet.input_blocks)
    everything = {f"input_blocks.{i}" for i in range(n)} | {f"output_blocks.{j}" for j in range(n)} | {"middle_block"}
    assert len(rec.calls) == STEPS  # batched CFG: one UNet call per step
    for step, ran in enumerate(rec.calls):
        assert ran == (_expected_blocks(n, branch) if step in CACHE_STEPS else everything), f"step {step}"
    report = REPORTS[-1]
    stats = report.cache_stats
    assert report.schedule == [0, 3, 5]
    assert stats["cache_calls"] == len(CACHE_STEPS) and stats["full_calls"] == STEPS - len(CACHE_STEPS)
    layers = sum(len(list(unet.input_blocks[i].children())) for i in range(branch + 1, n)) + len(list(unet.middle_block.children())) \
        + sum(len(list(unet.output_blocks[j].children())) for j in range(n - 1 - branch))
    assert stats["skipped_layer_calls"] == layers * len(CACHE_STEPS)
    assert [r.decision for r in report.records if r.branch == "cond"] == ["reuse" if i in CACHE_STEPS else "compute" for i in range(STEPS)]


@pytest.mark.parametrize("family", [SD15, SVD], ids=["sd15", "svd"])
def test_store_holds_exactly_one_branch_tensor_per_cfg_branch(runner, uc, family):
    REPORTS.clear()
    prompt, s, model_node = _graph(family, patch={"branch": 0})
    res = _run(runner, prompt)
    config = res.output(model_node).model.model_config.unet_config
    # branch 0: h entering the last output block = output of the previous one:
    # model_channels * channel_mult[0] channels at the latent resolution, per branch the latent batch (frames for SVD).
    expected = [BATCH, config["model_channels"] * config["channel_mult"][0], LATENT_HW, LATENT_HW]
    stats = REPORTS[-1].cache_stats
    assert list(stats["entry_shapes"].values()) == [expected, expected]  # cond + uncond uuids
    assert stats["held_bytes_max"] == 2 * torch.Size(expected).numel() * 4  # fp32
    assert stats["entries"] == 2 and stats["entries_after_cleanup"] == 0


def test_batched_and_split_cfg_give_the_same_output(runner, uc, monkeypatch):
    from harness.hostcompat import force_split_cond_batches

    prompt, s, _ = _graph(SD15, "LightCacheSampler", _lightcache())
    batched = runner.run(prompt)
    ks_prompt, ks, _ = _graph(SD15)
    ks_batched = _samples(runner, ks_prompt, ks)
    # No free memory -> _calc_cond_batch runs cond and uncond as separate UNet calls.
    force_split_cond_batches(monkeypatch)
    split = runner.run(prompt)
    ks_split = _samples(runner, ks_prompt, ks)
    tol = float((ks_batched - ks_split).abs().max()) + 1e-5
    assert float((batched.output(s)["samples"] - split.output(s)["samples"]).abs().max()) <= 10 * tol
    assert "cond: CDDCDC" in split.output(s, 1) and "uncond: CDDCDC" in split.output(s, 1)


def test_cleanup_after_an_exception(runner, uc, ksampler_ref):
    REPORTS.clear()
    STATE.clear()
    prompt, s, _ = _graph(SD15, patch={"fail_at_call": 2})  # fails in step 2, a cache step, after a store
    res = _run(runner, prompt, raise_on_error=False)
    assert res.error is not None and "injected failure" in str(res.error)
    report = REPORTS[-1]
    assert report.cache_stats["entries"] == 2 and report.cache_stats["entries_after_cleanup"] == 0
    assert any("RuntimeError" in n for n in report.notes)
    assert uc._ACTIVE.get() is None
    # Plain KSampler and a clean deepcache run still give the reference afterwards.
    prompt, s, _ = _graph(SD15)
    assert torch.equal(_samples(runner, prompt, s), ksampler_ref["SD15"])
    prompt, s, _ = _graph(SD15, patch={"interval": 1})
    torch.testing.assert_close(_samples(runner, prompt, s), ksampler_ref["SD15"], rtol=1e-5, atol=1e-5)


def test_embed_patch_layers_in_skipped_blocks_are_skipped(runner, uc):
    """Stand-in for AnimateDiff-Evolved: layers run through ``forward_timestep_embed_patch`` (its motion
    modules) get the placeholder passed through in skipped blocks and run normally elsewhere."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample

    EMBED_CALLS.clear()
    REPORTS.clear()
    prompt, s, model_node = _graph(SD15, patch={"embed_patch": True})
    res = _run(runner, prompt)
    unet = res.output(model_node).model.diffusion_model
    downsamples = sum(isinstance(layer, Downsample) for block in unet.input_blocks for layer in block)
    assert downsamples > 0
    assert len(EMBED_CALLS) == downsamples * (STEPS - len(CACHE_STEPS))
    assert all(shape[1] > 0 for shape in EMBED_CALLS)
    assert res.output(s)["samples"].isfinite().all()


def test_control_residuals_for_skipped_blocks_are_dropped(uc):
    plan = uc.BranchPlan(branch=1, n_blocks=4, skip_input=(2, 3), skip_output=(0, 1), entry_output=2)
    owner = uc._DeepCache(uc.DeepCacheSettings(branch=1), plan)
    ins = [torch.full((1,), float(i)) for i in range(4)]  # popped from the end: index 3 feeds input block 0
    outs = [torch.full((1,), 10.0 + i) for i in range(4)]
    control = {"input": list(ins), "middle": [torch.ones(1)], "output": list(outs)}
    args, _ = owner._drop_skipped_control((None, None, None, None, control, {}), {})
    new = args[4]
    assert new["input"][3] is ins[3] and new["input"][2] is ins[2]  # input blocks 0, 1 run: fresh residuals
    assert new["input"][1] is None and new["input"][0] is None  # input blocks 2, 3 skipped
    assert new["output"][3] is None and new["output"][2] is None  # output blocks 0, 1 skipped
    assert new["output"][1] is outs[1] and new["output"][0] is outs[0]
    assert new["middle"] == [None]
    assert control["input"][0] is ins[0]  # the caller's dict is untouched


def test_settings_and_schedules(uc):
    S = uc.DeepCacheSettings
    assert S().full_steps(25) == [0, 3, 5, 7, 9, 12, 15, 19, 24]  # SVD-style 25 steps: nonuniform, 9 full
    assert S(schedule="uniform").full_steps(25) == list(range(0, 25, 3))
    assert S().full_steps(8) == [0, 3, 6, 7]  # Lightning-style 8 steps: uniform, 4 full, 4 cache
    assert S(interval=1).full_steps(8) == list(range(8))
    assert S(start_percent=0.5).full_steps(10)[:5] == [0, 1, 2, 3, 4]
    non = S(schedule="nonuniform").full_steps(25)
    assert non[0] == 0 and non[-1] == 24 and len(non) == 9
    assert S.from_threshold(0.0).interval == 1 and S.from_threshold(0.6) == S() and S.from_threshold(1.2).interval == 5
    with pytest.raises(uc.DeepCacheError, match="start_percent"):
        S(start_percent=0.8, end_percent=0.2)


TRAINED = (fixtures.TRAINED_SD15_LINK, "SD15", "trained_sd15")


def _trained_graph(sampler_inputs=None):
    fixture, cls, cond_family = TRAINED
    g = Graph()
    model = out(g.add("LightCacheTestUNetLoader", unet_name=fixture.name, family=cls))
    cond = g.add("LightCacheTestConditioning", family=cond_family, seed=1, prompt_index=5, width=256, height=256, length=8)
    lat = g.add("EmptyLatentImage", width=256, height=256, batch_size=8)
    s = g.add("LightCacheSampler" if sampler_inputs else "KSampler", model=model, positive=out(cond, 0),
              negative=out(cond, 1), latent_image=out(lat), seed=1, steps=20, cfg=5.0, sampler_name="euler",
              scheduler="normal", denoise=1.0, **(sampler_inputs or {}))
    return g.prompt(), s


def _psnr(a, b):
    mse = float(((a.float() - b.float()) ** 2).mean())
    rng = float(b.max() - b.min())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng * rng / mse)).item()


def test_trained_unet_fidelity_and_the_zeroed_feature_control(runner, uc, monkeypatch):
    """On the trained SD1.5 fixture the defaults (auto -> deepcache) stay close to KSampler, and the same run
    with the restored deep feature zeroed lands far away: the test can tell a right cache from a wrong one."""
    prompt, s = _trained_graph()
    reference = _samples(runner, prompt, s)
    prompt, s = _trained_graph(_lightcache("auto"))
    res = runner.run(prompt)
    good = _psnr(res.output(s)["samples"], reference)
    report = res.output(s, 1)
    assert "deepcache" in report and "auto chose 'deepcache'" in report, report
    original_get = uc._Run.get
    monkeypatch.setattr(uc._Run, "get", lambda self, uuids: None if original_get(self, uuids) is None
                        else torch.zeros_like(original_get(self, uuids)))
    bad = _psnr(runner.run(prompt).output(s)["samples"], reference)
    assert good >= 40.0, report
    assert good >= bad + 15.0, (good, bad)
