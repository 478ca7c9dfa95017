"""LightCache Sampler's ``deepcache`` on AnimateDiff, through the real ComfyUI-AnimateDiff-Evolved pack.

AnimateDiff-Evolved is unpacked from ``../shared/third_party/`` and loaded by ComfyUI's own
custom-node loader beside this pack (harness/third_party.py). The graphs are the bundled
``workflows/lightcache_animatediff_lightning.json`` (8 steps, cfg 1, euler/sgm_uniform,
``cache_mode deepcache``) pointed at the tiny fixtures by ``workflow.adapt_for_fixtures``:

* ``animatediff``: the random-weight tiny SD1.5 UNet and its seeded motion module (function);
* ``trained_animatediff``: the *trained* tiny SD1.5 UNet and its seeded motion module (fidelity),
  sampled with the schedule it was trained with (``beta_schedule`` "use existing"; the motion module
  moves the result 26 dB away from the same run without it, so its temporal mixing is in play).

Only the motion-module loader is the test-only ``LightCacheTestMotionModelLoader``
(AnimateDiff-Evolved builds SD1.5-sized modules whatever the file holds; see
harness/ade_testing_pack). Applying, injecting (``ADE_ApplyAnimateDiffModelSimple``,
``ADE_UseEvolvedSampling``), its sampling wrappers and its ``forward_timestep_embed_patch``
are the pack's own code.

At 8 steps the deepcache schedule is uniform: full steps 0, 3, 6, 7; cache steps 1, 2, 4, 5
(branch 0: ``input_blocks[0]``, the last output block and the head run; the rest is skipped).
"""
from __future__ import annotations

import copy
import importlib
import sys

import pytest
import torch

from harness import corelink  # noqa: F401  (puts lightcache_core on sys.path)
from harness import motion_modules, third_party, workflow
from lightcache_core.metrics import psnr

NAME = "lightcache_animatediff_lightning.json"
_ABSENT = third_party.skip_reason(third_party.ADE)
pytestmark = pytest.mark.skipif(_ABSENT is not None, reason=str(_ABSENT))

STEPS = 8  # the workflow's own (AnimateDiff-Lightning 8-step)
FULL, CACHE = {0, 3, 6, 7}, {1, 2, 4, 5}
TIMELINE = "".join("C" if s in FULL else "D" for s in range(STEPS))  # the report's per-step letters

# Fidelity (trained fixture): its training size (32x32 latents), 4 frames.
FID_SIZE, FID_FRAMES = 256, 4
# Latent PSNR against the uncached run, measured on this fixture (the same on ComfyUI 0.3.75 and 0.33.0):
# deepcache 44.5 dB; the control (every cached deep feature read back as zeros) 16.5 dB, a 28.0 dB gap.
MIN_PSNR = 40.0  # 4.5 dB below the measured 44.5 dB: room for other CPUs'/BLAS' rounding, not for a real regression
BROKEN_MARGIN = 20.0  # the control must land >= 20 dB below deepcache: 8 dB under the measured 28 dB gap, and
# far above any run-to-run spread (0.0 dB between the two hosts here)


@pytest.fixture(scope="module")
def ade(comfy_host, models_dir):
    """AnimateDiff-Evolved's ``motion_module_ad`` module, with the pack loaded and the motion modules written."""
    mappings = comfy_host.nodes.NODE_CLASS_MAPPINGS
    assert "ADE_UseEvolvedSampling" in mappings, (
        f"{third_party.ADE} is on this machine but did not load into ComfyUI (see the custom-node import log)")
    assert "LightCacheTestMotionModelLoader" in mappings, f"{third_party.ADE_COMPANION} did not load"
    motion_modules.ensure(models_dir)
    import comfy.hooks

    model_cls = getattr(comfy.hooks, "__DINKLINK")["ADE"]["AnimateDiffModel"]
    return sys.modules[model_cls.__module__]


@pytest.fixture(scope="module")
def core(comfy_host):
    """The pack's ``lightcache_core`` package, as the loaded pack imported it."""
    pack = comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheSampler"].__module__.rsplit(".", 2)[0]
    return importlib.import_module(pack + ".lightcache_core")


def _prompt(family: str, *, size: int, frames: int) -> tuple[dict, str]:
    """The bundled workflow on ``family``'s fixtures, up to the sampler (no decode): (prompt, sampler id)."""
    api = workflow.adapt_for_fixtures(workflow.ui_to_api(workflow.load(NAME)), family, width=size, height=size,
                                      length=frames, steps=STEPS)
    sampler = next(k for k, v in api.items() if v["class_type"] == "LightCacheSampler")
    keep, todo = set(), [sampler]
    while todo:  # the sampler and everything it depends on
        node = todo.pop()
        if node not in keep:
            keep.add(node)
            todo += [str(v[0]) for v in api[node]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return {k: v for k, v in api.items() if k in keep}, sampler


class _MotionRecorder:
    """Per UNet call: which injected motion modules (AnimateDiff-Evolved's ``VanillaTemporalModule``) ran,
    by the UNet block that holds them, and the channel count they were given."""

    def __init__(self, unet_cls, motion_cls):
        self.unet_cls, self.motion_cls = unet_cls, motion_cls
        self.calls: list[list[tuple[str, int]]] = []
        self.injected: list[set[str]] = []
        self.where: dict[int, str] = {}
        self.handles = []

    def __enter__(self):
        def pre(module, args):
            if isinstance(module, self.unet_cls):
                self.where = {id(m): ".".join(name.split(".")[:2]) for name, m in module.named_modules()
                              if isinstance(m, self.motion_cls)}
                self.injected.append(set(self.where.values()))
                self.calls.append([])

        def post(module, args, output):
            if isinstance(module, self.motion_cls) and self.calls:
                self.calls[-1].append((self.where.get(id(module), "?"), int(args[0].shape[1])))

        self.handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
                        torch.nn.modules.module.register_module_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_motion_module_layout_is_animatediff_sd15_v2(ade):
    """The generator's layout for SD1.5's own UNet config is AnimateDiff-Evolved's SD1.5 v2 motion model, key
    for key and shape for shape (built on the meta device), and its detection reads it as AnimateDiff v2 SD1.5;
    the tiny files carry the same layout at the tiny UNets' sizes."""
    sd15 = {"model_channels": 320, "channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2]}
    layout = motion_modules.layout(sd15)
    with torch.device("meta"):
        state, info = ade.normalize_ad_state_dict({k: torch.empty(s) for k, s in layout.items()}, "sd15_layout")
        reference = ade.AnimateDiffModel(state, info)
    assert (info.sd_type, info.mm_format, info.mm_version) == ("SD1.5", "AnimateDiff", "v2")
    assert {k: tuple(v.shape) for k, v in reference.state_dict().items()} == layout
    tiny = motion_modules.state_dict(dict(motion_modules.fixtures.SD15_TINY_CONFIG), seed=0)
    _, tiny_info = ade.normalize_ad_state_dict(dict(tiny), "tiny")
    assert (tiny_info.mm_format, tiny_info.mm_version) == ("AnimateDiff", "v2")


def test_workflow_runs_motion_modules_in_computed_steps_only(runner, ade):
    """The bundled workflow (random-weight tiny SD1.5 + motion module): AnimateDiff-Evolved injects all 10
    motion modules for sampling and takes them out after; in full steps every one runs, in cache steps only
    the one inside the recomputed last output block runs (on real features), the skipped ones do not run."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    prompt, sampler = _prompt("animatediff", size=64, frames=8)
    loader = next(k for k, v in prompt.items() if v["class_type"] == "LightCacheTestUNetLoader")
    with _MotionRecorder(UNetModel, ade.VanillaTemporalModule) as rec:
        result = runner.run(prompt)
    unet = result.output(loader).model.diffusion_model
    last = f"output_blocks.{len(unet.output_blocks) - 1}"
    assert len(rec.calls) == STEPS, "cfg 1: one UNet call per step"
    injected = rec.injected[0]
    assert len(injected) == 10 and all(i == injected for i in rec.injected)  # 3 down + mid + 6 up
    assert not any(isinstance(m, ade.VanillaTemporalModule) for m in unet.modules()), "motion modules not ejected"
    for step, ran in enumerate(rec.calls):
        blocks = sorted(block for block, _ in ran)
        if step in FULL:
            assert blocks == sorted(injected), f"full step {step}"
        else:
            assert blocks == [last], f"cache step {step}: {blocks}"
        assert all(channels > 0 for _, channels in ran), f"step {step}: a motion module got the skip placeholder"
    report = result.output(sampler, 1)
    assert "deepcache" in report and TIMELINE in report, report
    samples = result.output(sampler)["samples"]
    assert samples.shape[0] == 8 and samples.isfinite().all()


def test_context_windows_get_one_cache_each(runner, ade):
    """AnimateDiff-Evolved's context windows (``ADE_StandardStaticContextOptions``, 4 of 8 frames): the pack
    calls the UNet once per window with ``ad_params["sub_idxs"]``; deepcache keeps one cached tensor per
    window (never one window's features for another) and still skips the motion modules in cache steps."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    prompt, sampler = _prompt("animatediff", size=64, frames=8)
    evolved = next(k for k, v in prompt.items() if v["class_type"] == "ADE_UseEvolvedSampling")
    context = str(max(int(k) for k in prompt) + 1)
    prompt[context] = {"class_type": "ADE_StandardStaticContextOptions", "inputs": {"context_length": 4, "context_overlap": 1}}
    prompt[evolved]["inputs"]["context_options"] = [context, 0]
    with _MotionRecorder(UNetModel, ade.VanillaTemporalModule) as rec:
        result = runner.run(prompt)
    windows, rest = divmod(len(rec.calls), STEPS)
    assert windows >= 2 and rest == 0, f"{len(rec.calls)} UNet calls for {STEPS} steps"
    per_step = [rec.calls[i * windows:(i + 1) * windows] for i in range(STEPS)]
    for step, calls in enumerate(per_step):
        for ran in calls:
            assert len(ran) == (10 if step in FULL else 1), f"step {step}: {len(ran)} motion modules ran"
    report = result.output(sampler, 1)
    assert f"cache: {windows} entries" in report, report  # cfg 1: one branch, one entry per window
    assert result.output(sampler)["samples"].isfinite().all()


@pytest.fixture(scope="module")
def fidelity(runner, ade):
    """Latents of the trained-fixture workflow: uncached (``to_baseline``: KSampler) and deepcache, with the
    motion modules that ran per UNet call."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    prompt, sampler = _prompt("trained_animatediff", size=FID_SIZE, frames=FID_FRAMES)
    baseline = workflow.to_baseline(prompt)
    out = {"prompt": prompt, "sampler": sampler}
    with _MotionRecorder(UNetModel, ade.VanillaTemporalModule) as rec:
        out["reference"] = runner.run(baseline).output(sampler)["samples"]
        result = runner.run(prompt)
    out["deepcache"], out["report"] = result.output(sampler)["samples"], result.output(sampler, 1)
    out["motion_calls"] = [len(ran) for ran in rec.calls]
    return out


def test_deepcache_fidelity_against_the_uncached_workflow(fidelity):
    """Trained tiny SD1.5 UNet + motion module, the workflow's own sampler settings: deepcache stays within
    ``MIN_PSNR`` of the uncached run (KSampler) and did reuse (not bit-identical; 4 of 8 steps cached).
    Both runs had the motion modules injected (all 10 ran in every uncached step and every full step)."""
    ref, dc = fidelity["reference"], fidelity["deepcache"]
    assert fidelity["motion_calls"] == [10] * STEPS + [10 if s in FULL else 1 for s in range(STEPS)]
    assert not torch.equal(dc, ref)
    assert TIMELINE in fidelity["report"], fidelity["report"]
    value = psnr(dc, ref)
    print(f"\n[animatediff fidelity] deepcache vs uncached: {value:.2f} dB")
    assert value >= MIN_PSNR, f"deepcache {value:.2f} dB < {MIN_PSNR} dB"


def test_zeroed_cache_is_caught(runner, fidelity, core, monkeypatch):
    """Negative control: the same deepcache run with every cached deep feature read back as zeros (the core
    ``CacheStore.get`` patched for this test) must land at least ``BROKEN_MARGIN`` dB further from the
    uncached run than correct deepcache does."""
    original = core.CacheStore.get
    reads = []

    def zeroed(self, key):
        value = original(self, key)
        reads.append(key)
        return None if value is None else torch.zeros_like(value)

    monkeypatch.setattr(core.CacheStore, "get", zeroed)
    broken = runner.run(copy.deepcopy(fidelity["prompt"])).output(fidelity["sampler"])["samples"]
    assert len(reads) >= len(CACHE), "the control must read the store in every cache step"
    good = psnr(fidelity["deepcache"], fidelity["reference"])
    bad = psnr(broken, fidelity["reference"])
    print(f"\n[animatediff fidelity] zeroed cache vs uncached: {bad:.2f} dB (deepcache {good:.2f} dB)")
    assert good - bad >= BROKEN_MARGIN, f"control {bad:.2f} dB is only {good - bad:.2f} dB below deepcache {good:.2f} dB"
