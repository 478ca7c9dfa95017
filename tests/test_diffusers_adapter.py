"""LightCache driven from diffusers (lightcache_core.diffusers_adapter) on tiny random-weight pipelines.

No download: every model is built from a config (tests/harness/tiny_diffusers.py). What is
checked, per the adapter's contract:

* ``off`` installs nothing, and hooks that never reuse (threshold 0 / interval 1) give the
  plain pipeline's output bit for bit;
* each mode lowers the block evaluations counted where the work happens (each Wan block's
  FFN, each UNet resnet), by exactly what the run's report says it reused;
* no state survives from one pipeline call to the next;
* ``remove()`` gives back the original modules (``forward`` and registries as before);
* sliced Wan decode equals ``AutoencoderKLWan.decode`` within 1e-5.

diffusers ships no test mixins for cache hooks in its wheel (they live in its repository's
tests/), so the recipe of its cache tests is mirrored here instead: cached differs from
uncached, a fresh context gives identical passes, and removal restores exact outputs.
"""
from __future__ import annotations

import pytest

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install '.[diffusers]'): "
                                        "diffusers adapter tests skipped")

import torch  # noqa: E402

from harness import corelink  # noqa: E402,F401
from harness import tiny_diffusers as tiny  # noqa: E402
from lightcache_core import diffusers_adapter as lc  # noqa: E402
from lightcache_core.metrics import psnr  # noqa: E402

STEPS = 20  # Wan: warm-up 3 + last step 1 leave 16 steps where reuse may happen
N_BLOCKS = 4  # tiny Wan transformer blocks; block reuse skips blocks 1..2 (block_first = block_last = 1)
UNET_STEPS = 6  # under 10 steps DeepCache's schedule is uniform: full {0, 3, 5}, cache {1, 2, 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: two torch threads only wait on each other (10-50x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hooks(model) -> list[str]:
    return [name for m in model.modules() for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
            if name.startswith("lightcache")]


def _layout(model) -> dict:
    """What removal must give back: per module, an instance ``forward`` and a hook registry or not."""
    return {name: ("forward" in m.__dict__, hasattr(m, "_diffusers_hook")) for name, m in model.named_modules()}


# ----------------------------------------------------------------------------- Wan


@pytest.fixture(scope="module")
def wan():
    return tiny.wan_pipeline(num_layers=N_BLOCKS)


@pytest.fixture(scope="module")
def wan_plain(wan):
    with tiny.count_calls(tiny.wan_block_units(wan.transformer)) as counts:
        latent = tiny.run_wan(wan, steps=STEPS)
    assert counts["calls"] == 2 * STEPS * N_BLOCKS  # cond + uncond every step, every block
    return latent, counts["calls"]


def test_off_installs_nothing_and_is_the_plain_pipeline(wan, wan_plain):
    ref, calls = wan_plain
    handle = lc.apply_lightcache(wan, mode="off")
    assert _hooks(wan.transformer) == []
    with tiny.count_calls(tiny.wan_block_units(wan.transformer)) as counts:
        out = tiny.run_wan(wan, steps=STEPS)
    handle.remove()
    assert torch.equal(out, ref) and counts["calls"] == calls


def test_hooks_that_never_reuse_give_the_plain_output_bit_for_bit(wan, wan_plain):
    ref, calls = wan_plain
    with lc.apply_lightcache(wan, mode="mix", threshold=0.0) as handle:
        assert lc.DENOISER_HOOK in _hooks(wan.transformer) and lc.BLOCK_HOOK in _hooks(wan.transformer)
        with tiny.count_calls(tiny.wan_block_units(wan.transformer)) as counts:
            out = tiny.run_wan(wan, steps=STEPS)
        report = handle.last_report
    assert torch.equal(out, ref) and counts["calls"] == calls
    assert report.computed_count() == 2 * STEPS and report.reused_count() == 0
    assert report.timeline_strings() == {"cond": "C" * STEPS, "uncond": "C" * STEPS}


@pytest.mark.parametrize("mode", ["step", "cfg", "block", "mix"])
def test_each_mode_lowers_counted_block_evaluations(wan, wan_plain, mode):
    ref, calls = wan_plain
    with lc.apply_lightcache(wan, mode=mode) as handle:
        with tiny.count_calls(tiny.wan_block_units(wan.transformer)) as counts:
            out = tiny.run_wan(wan, steps=STEPS)
        report = handle.last_report
    reused = report.reused_by_granularity()
    assert report.computed_count() + report.reused_count() == 2 * STEPS
    if mode != "mix":
        assert set(reused) == {mode}, reused
    assert report.reused_count() > 0, report.to_text()
    # The blocks that ran are exactly what the report says: every block of a computed branch, the first and
    # last block of a block-reused one, none of a step- or cfg-reused one.
    assert counts["calls"] == N_BLOCKS * report.computed_count() + 2 * reused.get("block", 0)
    assert counts["calls"] < calls
    quality = psnr(out, ref)
    assert 20.0 < quality < float("inf"), quality  # reuse changed the output, a little
    assert handle.sessions[0].run is None  # the run ended with the pipeline call


def test_no_state_leaks_between_pipeline_calls(wan):
    with lc.apply_lightcache(wan, mode="mix") as handle:
        first = tiny.run_wan(wan, prompt=0, seed=1, steps=STEPS)
        other = tiny.run_wan(wan, prompt=5, seed=2, steps=STEPS)
        again = tiny.run_wan(wan, prompt=0, seed=1, steps=STEPS)
        reports = handle.reports
        assert handle.sessions[0].run is None
    assert not torch.equal(first, other)  # the control: a different call gives a different output
    assert torch.equal(first, again)
    assert len(reports) == 3
    assert reports[0].timeline_strings() == reports[2].timeline_strings()
    for report in reports:
        assert report.cache_stats.get("entries", 0) >= 0 and report.cache_stats["device_bytes"] >= 0


def test_removal_restores_the_original_modules(wan, wan_plain):
    ref, calls = wan_plain
    before = _layout(wan.transformer)
    forwards = {name: type(m).forward for name, m in wan.transformer.named_modules()}
    handle = lc.apply_lightcache(wan, mode="mix", sliced_decode=True)
    assert _layout(wan.transformer) != before
    assert "decode" in wan.vae.__dict__
    tiny.run_wan(wan, steps=STEPS)
    handle.remove()
    assert _hooks(wan.transformer) == []
    assert _layout(wan.transformer) == before
    assert "decode" not in wan.vae.__dict__
    for name, m in wan.transformer.named_modules():
        assert m.forward.__func__ is forwards[name]
    with tiny.count_calls(tiny.wan_block_units(wan.transformer)) as counts:
        out = tiny.run_wan(wan, steps=STEPS)
    assert torch.equal(out, ref) and counts["calls"] == calls
    lc.apply_lightcache(wan, mode="step").remove()  # and it can be applied again


def test_refuses_a_second_cache_and_wrong_modes(wan):
    from diffusers import FirstBlockCacheConfig

    handle = lc.apply_lightcache(wan, mode="mix")
    with pytest.raises(lc.LightCacheDiffusersError, match="already applied"):
        lc.apply_lightcache(wan, mode="step")
    handle.remove()
    wan.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    try:
        with pytest.raises(lc.LightCacheDiffusersError, match="disable_cache"):
            lc.apply_lightcache(wan)
        tiny.run_wan(wan, steps=4)  # diffusers' own hook still runs on a model we refused
    finally:
        wan.transformer.disable_cache()
    with pytest.raises(lc.LightCacheDiffusersError, match="deepcache"):
        lc.apply_lightcache(wan, mode="deepcache")
    with pytest.raises(lc.LightCacheDiffusersError, match="unknown setting"):
        lc.apply_lightcache(wan, mode="mix", thresold=0.3)
    assert _hooks(wan.transformer) == []


def test_model_level_batched_cfg_with_the_scheduler_clock(wan):
    """Outside a pipeline and without cache_context: one call holds both CFG halves (branch "batch"); the
    step comes from the scheduler handed to apply_lightcache; without it nothing is cached."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = wan.transformer
    pe, ne = tiny.wan_embeds(0)

    def loop(scheduler):
        scheduler.set_timesteps(STEPS)
        x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            for t in scheduler.timesteps:
                v = model(hidden_states=torch.cat([x, x]), timestep=t.expand(2), encoder_hidden_states=torch.cat([ne, pe]),
                          return_dict=False)[0]
                uncond, cond = v.chunk(2)
                x = scheduler.step(uncond + 5.0 * (cond - uncond), t, x, return_dict=False)[0]
        return x

    plain = loop(FlowMatchEulerDiscreteScheduler(shift=7.0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    with lc.apply_lightcache(model, mode="step", scheduler=scheduler) as handle:
        with tiny.count_calls(tiny.wan_block_units(model)) as counts:
            cached = loop(scheduler)
        report = handle.last_report
    assert set(report.timeline_strings()) == {"batch"}
    assert report.reused_count() > 0 and counts["calls"] == N_BLOCKS * report.computed_count()
    assert 20.0 < psnr(cached, plain) < float("inf")
    with lc.apply_lightcache(model, mode="step") as handle:  # no step source: every call runs, uncached
        assert torch.equal(loop(FlowMatchEulerDiscreteScheduler(shift=7.0)), plain)
        assert handle.finish() == [] and "could not be placed" in handle.sessions[0].notes[0]


# ----------------------------------------------------------------------------- sliced Wan decode


@pytest.fixture(scope="module")
def wan_decode():
    vae = tiny.wan_vae()
    z = torch.randn(1, 16, 4, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return vae, z, vae.decode(z).sample


@pytest.mark.parametrize("frames_per_slice", [1, 3])
def test_sliced_wan_decode_equals_decode(wan_decode, frames_per_slice):
    vae, z, ref = wan_decode
    with torch.no_grad():
        out = lc.sliced_wan_decode(vae, z, frames_per_slice=frames_per_slice, output_device="cpu")
    assert out.shape == ref.shape == (1, 3, 13, 32, 48)
    assert float((out - ref).abs().max()) <= 1e-5


def test_sliced_decode_in_the_pipeline(wan):
    plain = tiny.run_wan(wan, steps=4, size=32, output_type="pt")
    with lc.apply_lightcache(wan, mode="off", sliced_decode=True):
        assert isinstance(wan.vae.__dict__.get("decode"), lc._SlicedDecode)
        sliced = tiny.run_wan(wan, steps=4, size=32, output_type="pt")
    assert "decode" not in wan.vae.__dict__
    assert sliced.shape == plain.shape and float((sliced - plain).abs().max()) <= 1e-5


# ----------------------------------------------------------------------------- UNets: DeepCache


def _deepcache_counts(pipe, run, **kwargs):
    units = tiny.unet_block_units(pipe.unet)
    with tiny.count_calls(units) as counts:
        out = run(pipe, steps=UNET_STEPS, **kwargs)
    return out, counts["calls"]


def _kept_units(unet, plan) -> int:
    """Resnets a cache step still runs: down blocks 0..branch and up blocks entry..N-1."""
    return sum(len(unet.down_blocks[i].resnets) for i in plan.run_input) + \
        sum(len(unet.up_blocks[j].resnets) for j in plan.run_output)


@pytest.mark.parametrize("family", ["svd", "animatediff"])
def test_deepcache_on_video_unets(family):
    build, run = {"svd": (tiny.svd_pipeline, tiny.run_svd),
                  "animatediff": (tiny.animatediff_pipeline, tiny.run_animatediff)}[family]
    pipe = build()
    ref, calls = _deepcache_counts(pipe, run)
    per_call = len(tiny.unet_block_units(pipe.unet))
    assert calls == UNET_STEPS * per_call  # batched CFG: one UNet call per step

    with lc.apply_lightcache(pipe, interval=1) as handle:  # hooks in, never a cache step: bit-identical
        out, n = _deepcache_counts(pipe, run)
    assert torch.equal(out, ref) and n == calls and handle.last_report.reused_count() == 0

    before = _layout(pipe.unet)
    with lc.apply_lightcache(pipe) as handle:  # mode "deepcache", interval 3, branch 0
        first, n = _deepcache_counts(pipe, run)
        again, _ = _deepcache_counts(pipe, run)  # nothing carried over from the first call
        reports = handle.reports
        plan = handle.sessions[0].plan
        assert sorted(_hooks(pipe.unet)) == sorted([lc.DEEPCACHE_STEP_HOOK, lc.DEEPCACHE_ENTRY_HOOK]
                                                   + [lc.DEEPCACHE_SKIP_HOOK] * (1 + len(plan.skip_input)
                                                                                 + len(plan.skip_output)))
    assert _layout(pipe.unet) == before and _hooks(pipe.unet) == []
    assert torch.equal(first, again) and len(reports) == 2
    report = reports[0]
    assert report.timeline_strings() == {"batch": "CDDCDC"}
    assert n == 3 * per_call + 3 * _kept_units(pipe.unet, plan) < calls
    assert report.cache_stats["entries"] == 1  # one tensor per UNet call of a step (batched CFG: one)
    assert 10.0 < psnr(first, ref) < float("inf")
    out, n = _deepcache_counts(pipe, run)
    assert torch.equal(out, ref) and n == calls  # removed: the plain UNet again


def test_deepcache_on_a_plain_unet2d_with_the_scheduler_clock():
    """``UNet2DConditionModel`` (what AnimateDiff's MotionAdapter extends) in a hand-written loop."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4).eval()
    context = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(6))

    def loop(scheduler):
        scheduler.set_timesteps(UNET_STEPS)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.step(unet(x, t, encoder_hidden_states=context).sample, t, x).prev_sample
        return x

    plain = loop(DDIMScheduler())
    scheduler = DDIMScheduler()
    with lc.apply_lightcache(unet, scheduler=scheduler, cache_device="cpu") as handle:
        with tiny.count_calls(tiny.unet_block_units(unet)) as counts:
            cached = loop(scheduler)
        report = handle.last_report
    assert report.timeline_strings() == {"batch": "CDDCDC"}
    assert counts["calls"] == 3 * len(tiny.unet_block_units(unet)) + 3 * _kept_units(unet, handle.sessions[0].plan)
    assert 10.0 < psnr(cached, plain) < float("inf")
    with pytest.raises(lc.LightCacheDiffusersError, match="UNet"):
        lc.apply_lightcache(unet, mode="block")
