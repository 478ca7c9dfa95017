"""The hybrid caching engine on the TRAINED tiny Wan, through ComfyUI's executor.

Fidelity is asserted on the trained fixture (random weights have no realistic
trajectory), and every reuse path has a negative control: the same run with that
path deliberately broken (zero prediction, uncond rebuilt as a copy of cond, the
block residual dropped) must land far from KSampler, so a wrong cache cannot pass.
"""
from __future__ import annotations

import sys

import pytest
import torch

from harness import fixtures, graphs
from harness.graphs import Graph, out
from harness.model_nodes import ModelPatchNode
from harness.runner import PromptFailed

STEPS = 20
CFG = 5.0
PAIR = (0, 1)  # prompt index, seed


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    rng = float(b.max() - b.min())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(rng * rng / mse)).item()


def engine():
    """The DiT glue module as ComfyUI loaded it (a custom-node package, not importable by name)."""
    for name, module in sys.modules.items():
        if name.endswith("nodes.dit_cache") and hasattr(module, "DitRun"):
            return module
    raise AssertionError("dit_cache not loaded")


def core():
    """The core engine module the loaded pack uses (not the tests' own import of lightcache_core)."""
    return sys.modules[engine().HybridEngine.__module__]


@pytest.fixture(scope="module")
def ksampler(runner):
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS)
    return runner.run(p).output(ids["sampler"])["samples"]


def _lightcache(runner, mode, threshold, steps=STEPS, **inputs):
    sampler_inputs = {"cache_mode": mode, "threshold": threshold, "start_percent": 0.0, "end_percent": 1.0,
                      "cache_device": "auto", **inputs}
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=steps, sampler="LightCacheSampler",
                                sampler_inputs=sampler_inputs)
    res = runner.run(p)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    return res.output(ids["sampler"])["samples"], report, res.output(ids["sampler"], 1)


# ----------------------------------------------------------------------------- negative controls

def _break_step(monkeypatch):
    def predict(self, branch, sigma):  # step reuse returning zeros
        return torch.zeros_like(self.predict_and_base(branch, sigma)[0])
    monkeypatch.setattr(core().Trajectory, "predict", predict)


def _break_cfg(monkeypatch):
    def rebuild_branch(self, cond_output, branch, sigma):  # uncond rebuilt as a copy of cond
        return cond_output
    monkeypatch.setattr(core().Trajectory, "rebuild_branch", rebuild_branch)


def _break_block(monkeypatch):  # the cached block residual dropped
    monkeypatch.setattr(core().BlockReuse, "add_residual", lambda self, evaluation, row_keys, streams: dict(streams))


CONTROLS = {  # mode: (threshold that makes it reuse often, how to break it, dB the broken run must lose)
    "step": (0.3, _break_step, 10.0),
    "cfg": (1.0, _break_cfg, 6.0),
    "block": (0.3, _break_block, 4.0),
}


@pytest.mark.parametrize("mode", list(CONTROLS))
def test_negative_control_catches_a_broken_reuse_path(runner, ksampler, monkeypatch, mode):
    threshold, breaker, margin = CONTROLS[mode]
    good, report, text = _lightcache(runner, mode, threshold)
    assert report["reused_by_granularity"].get(mode, 0) >= 4, text
    good_db = _psnr(good, ksampler)
    breaker(monkeypatch)
    bad, bad_report, bad_text = _lightcache(runner, mode, threshold)
    monkeypatch.undo()
    assert bad_report["reused_by_granularity"].get(mode, 0) > 0, bad_text
    bad_db = _psnr(bad, ksampler)
    assert good_db >= bad_db + margin, f"{mode}: correct {good_db:.1f} dB vs broken {bad_db:.1f} dB\n{text}"
    assert good_db >= 30.0, text  # and the correct path itself stays close to KSampler on the trained model


def test_default_mix_on_the_trained_wan(runner, ksampler):
    """Defaults: a real speedup at a fidelity far above what broken caches give."""
    samples, report, text = _lightcache(runner, "mix", 0.3, steps=STEPS)
    assert report["computed"] * 2 <= report["evaluations"] + 4, text  # about half or fewer evaluations computed
    assert _psnr(samples, ksampler) >= 38.0, text


# ----------------------------------------------------------------------------- the knob

def test_knob_is_monotone_with_several_operating_points(runner):
    reused = []
    for threshold in (0.0, 0.05, 0.1, 0.2, 0.4, 0.8):
        _, report, text = _lightcache(runner, "mix", threshold)
        reused.append(report["reused"])
    assert reused[0] == 0
    assert all(b >= a for a, b in zip(reused, reused[1:])), reused
    assert len(set(reused)) >= 4, reused


def test_mix_picks_more_than_one_granularity_and_counts_each(runner):
    """Where the calibrated cfg error is the cheapest that fits, mix rebuilds the uncond branch instead of
    predicting the whole step; whatever mix picks appears in the report's counts and in its timeline."""
    seen = set()
    for threshold in (0.05, 0.1, 0.2):
        _, report, text = _lightcache(runner, "mix", threshold, warmup_steps=1)
        codes = {"S": "step", "G": "cfg", "B": "block"}
        from_timeline = {}
        for cell in report["timeline"]:
            if cell["g"] in codes:
                from_timeline[codes[cell["g"]]] = from_timeline.get(codes[cell["g"]], 0) + 1
        assert from_timeline == report["reused_by_granularity"], text
        seen |= set(from_timeline)
    assert len(seen) >= 2, seen


def test_defaults_store_nothing_they_never_read(runner):
    _, report, text = _lightcache(runner, "mix", 0.3)
    assert report["bytes_stored"], text
    for granularity, stored in report["bytes_stored"].items():
        assert stored == 0 or report["bytes_read"].get(granularity, 0) > 0, text


# ----------------------------------------------------------------------------- block reuse on HunyuanVideo

def test_hunyuan_block_reuse_stores_real_residuals_and_beats_the_dropped_control(runner, monkeypatch):
    """HunyuanVideo's single-stream blocks update their input in place; a captured reference would be
    overwritten by the block it measures and every residual would be 0."""
    def run():
        p, ids = graphs.wan_t2v(model=fixtures.HUNYUAN.name, family="hunyuan_video", length=5, steps=10, decode=None,
                                sampler="LightCacheSampler",
                                sampler_inputs={"cache_mode": "block", "threshold": 3.0, "start_percent": 0.0,
                                                "end_percent": 1.0, "cache_device": "auto", "warmup_steps": 1})
        res = runner.run(p)
        return res.output(ids["sampler"])["samples"], res.ui[ids["sampler"]]["lightcache_report"][0]

    p, ids = graphs.wan_t2v(model=fixtures.HUNYUAN.name, family="hunyuan_video", length=5, steps=10, decode=None)
    reference = runner.run(p).output(ids["sampler"])["samples"]
    mod = core()
    norms = []
    original_put = mod.HybridEngine.put

    def recording_put(self, granularity, store, key, tensor, reuse_distance=None):
        if granularity == "block":
            norms.append(float(tensor.abs().max()))
        return original_put(self, granularity, store, key, tensor, reuse_distance)

    monkeypatch.setattr(mod.HybridEngine, "put", recording_put)
    good, report = run()
    assert report["reused_by_granularity"].get("block", 0) > 0, report
    assert norms and min(norms) > 0, norms
    _break_block(monkeypatch)
    bad, _ = run()
    assert _psnr(good, reference) > _psnr(bad, reference) + 3.0


# ----------------------------------------------------------------------------- honest edges

def test_cfg_mode_at_cfg_1_says_there_is_nothing_to_reuse(runner):
    p, ids = graphs.trained_wan(seed=1, prompt_index=0, cfg=1.0, steps=10, sampler="LightCacheSampler",
                                sampler_inputs={"cache_mode": "cfg", "threshold": 1.0, "start_percent": 0.0,
                                                "end_percent": 1.0, "cache_device": "auto"})
    res = runner.run(p)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert report["reused"] == 0
    assert any("cfg 1" in n for n in report["notes"]), report["notes"]


def test_a_latent_that_does_not_fit_the_model_is_a_clear_error(runner):
    g = Graph()
    model = g.add("UNETLoader", unet_name=fixtures.WAN_T2V.name, weight_dtype="default")
    cond = g.add("LightCacheTestConditioning", family="wan", seed=0, prompt_index=0, width=64, height=64, length=9)
    lat = g.add("EmptyLatentImage", width=64, height=64, batch_size=1)  # 4-channel image latent for a video DiT
    g.add("LightCacheSampler", model=out(model), positive=out(cond, 0), negative=out(cond, 1), latent_image=out(lat),
          **{**graphs.KSAMPLER_DEFAULTS, "cache_mode": "mix", "threshold": 0.3, "start_percent": 0.0,
             "end_percent": 1.0, "cache_device": "auto"})
    with pytest.raises(PromptFailed) as err:
        runner.run(g.prompt())
    message = str(err.value)
    assert "LightCache Sampler" in message and "latent_image" in message and "Fix" in message


def test_stacked_easycache_is_refused_with_the_fix(runner):
    patches = [("EasyCache", {"reuse_threshold": 0.2, "start_percent": 0.15, "end_percent": 0.95, "verbose": False})]
    p, ids = graphs.wan_t2v(steps=4, decode=None, sampler="LightCacheSampler", model_patches=patches,
                            sampler_inputs={"cache_mode": "mix", "threshold": 0.3, "start_percent": 0.0,
                                            "end_percent": 1.0, "cache_device": "auto"})
    with pytest.raises(PromptFailed) as err:
        runner.run(p)
    message = str(err.value)
    assert "EasyCache" in message and "Fix" in message and "LightCache Sampler" in message


class _InjectVace(ModelPatchNode):
    """MODEL -> MODEL whose DIFFUSION_MODEL wrapper passes a ``vace_context`` the way VaceWanModel's loader does
    (plain Wan ignores the extra keyword), so the engine sees a side input added inside the block loop."""

    def patch(self, model):
        import comfy.patcher_extension

        def wrapper(executor, *args, **kwargs):
            kwargs["vace_context"] = torch.zeros(1)
            return executor(*args, **kwargs)

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "lightcache_test_vace", wrapper)
        return (m,)


def test_block_reuse_turns_off_with_side_inputs(runner, comfy_host):
    comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheTestInjectVace"] = _InjectVace
    try:
        patches = [("LightCacheTestInjectVace", {}),
                   ("LightCacheModelPatch", {"cache_mode": "block", "threshold": 3.0, "start_percent": 0.0,
                                             "end_percent": 1.0, "cache_device": "auto", "warmup_steps": 1})]
        p, ids = graphs.wan_t2v(steps=8, decode=None, model_patches=patches)
        mod = engine()
        runs = []
        original = mod.DitRun.finish

        def recording_finish(self, error):
            report = original(self, error)
            runs.append(report)
            return report

        mod.DitRun.finish = recording_finish
        try:
            runner.run(p)
        finally:
            mod.DitRun.finish = original
    finally:
        comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("LightCacheTestInjectVace", None)
    report = runs[-1]
    assert report.reused_by_granularity().get("block", 0) == 0
    assert any("VACE" in n for n in report.notes), report.notes


# ----------------------------------------------------------------------------- threads (multi-GPU CFG split)

class _ThreadedBranches(ModelPatchNode):
    """MODEL -> MODEL whose CALC_COND_BATCH wrapper (inside LightCache's) runs each CFG branch on its own thread
    at the same time, sharing ``transformer_options``, as the host's multi-GPU CFG split does with one thread
    per device. A barrier makes the two branches' block loops overlap."""

    EXTRA_INPUTS = {"threads": ("BOOLEAN", {"default": True, "tooltip": "False: the same calls, one after the other"})}

    def patch(self, model, threads):
        import concurrent.futures
        import threading

        import comfy.patcher_extension

        def wrapper(executor, model_, conds, x_in, timestep, model_options, *args, **kwargs):
            present = [i for i, c in enumerate(conds) if c]
            if len(present) < 2:
                return executor(model_, conds, x_in, timestep, model_options, *args, **kwargs)
            barrier = threading.Barrier(len(present)) if threads else None

            def one(b):
                only = [c if i == b else None for i, c in enumerate(conds)]
                if barrier is not None:
                    barrier.wait()
                with torch.inference_mode():  # grad mode is per thread; the host's device threads set it too
                    return executor(model_, only, x_in, timestep, model_options, *args, **kwargs)[b]

            if threads:
                with concurrent.futures.ThreadPoolExecutor(len(present)) as pool:
                    results = dict(zip(present, pool.map(one, present)))
            else:
                results = {b: one(b) for b in present}
            return [results.get(i, torch.zeros_like(x_in)) for i in range(len(conds))]

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "lightcache_test_threads", wrapper)
        return (m,)


def test_branches_on_concurrent_threads_equal_a_single_thread_run(runner, comfy_host):
    """Block reuse keeps its state per group of rows and device, under a lock: two threads sharing one
    evaluation give the same latent as the same split evaluated on one thread."""
    comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheTestThreadedBranches"] = _ThreadedBranches
    try:
        settings = {"cache_mode": "block", "threshold": 0.8, "start_percent": 0.0, "end_percent": 1.0,
                    "cache_device": "cpu", "warmup_steps": 1}
        lifecycle = sys.modules[engine().__name__.rsplit(".", 1)[0] + ".run_lifecycle"]

        def run(threaded: bool):
            patches = [("LightCacheModelPatch", settings), ("LightCacheTestThreadedBranches", {"threads": threaded})]
            p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS, model_patches=patches)
            with lifecycle.report_channel() as channel:
                samples = runner.run(p).output(ids["sampler"])["samples"]
            return samples, channel.reports[-1]

        threaded, report = run(True)
        single, single_report = run(False)
    finally:
        comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("LightCacheTestThreadedBranches", None)
    assert report.reused_by_granularity().get("block", 0) > 0, report.to_text()
    assert report.timeline_strings() == single_report.timeline_strings()
    assert torch.allclose(threaded, single, atol=1e-5, rtol=1e-5), float((threaded - single).abs().max())


# ----------------------------------------------------------------------------- host syncs

def test_at_most_one_host_read_per_evaluation(runner, monkeypatch):
    """Signals stay on the device: the decision reads them back once per evaluation (a GPU keeps running
    ahead of the CPU in between). Counted through the tensor methods that read a device value on the host,
    for calls made from the pack's own code."""
    import os

    pack_dirs = (os.sep + os.path.join("custom_nodes", "lightcache") + os.sep, os.sep + "lightcache_core" + os.sep)
    reads = {"n": 0}

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if any(d in caller for d in pack_dirs):
                reads["n"] += 1
                reads.setdefault("where", []).append(f"{caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return method

    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    _, report, text = _lightcache(runner, "mix", 0.3)
    monkeypatch.undo()
    evaluations = len({cell["step"] for cell in report["timeline"]})
    block_attempts = report["reused_by_granularity"].get("block", 0)
    # one read per evaluation, one more per block attempt (its fresh evidence), and twice per run: the sigma
    # schedule and the model's largest sigma (the stage note of two-stage runs)
    assert reads["n"] <= evaluations + block_attempts + 2, (reads["n"], evaluations, sorted(set(reads.get("where", []))))


# ----------------------------------------------------------------------------- what users run beside it

def test_few_step_runs_compute_everything_and_say_why(runner):
    """A 4-step cfg 1 run (distilled LoRAs, Lightning): nothing is safe to reuse; the result is KSampler's."""
    p, ids = graphs.trained_wan(seed=1, prompt_index=0, cfg=1.0, steps=4)
    reference = runner.run(p).output(ids["sampler"])["samples"]
    p, ids = graphs.trained_wan(seed=1, prompt_index=0, cfg=1.0, steps=4, sampler="LightCacheSampler",
                                sampler_inputs={"cache_mode": "auto", "threshold": 3.0, "start_percent": 0.0,
                                                "end_percent": 1.0, "cache_device": "auto"})
    res = runner.run(p)
    assert torch.equal(res.output(ids["sampler"])["samples"], reference)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert report["reused"] == 0 and any("too few" in n for n in report["notes"]), report["notes"]
    assert any("too few" in t for t in res.progress_texts(ids["sampler"])), res.progress_texts(ids["sampler"])


def _tiny_wan_lora(models_dir) -> str:
    """A small seeded LoRA for the tiny random Wan's feed-forward layers (ComfyUI's lora_up/lora_down keys)."""
    from safetensors.torch import save_file

    name = "lightcache_test_wan_lora.safetensors"
    path = models_dir / "loras" / name
    if not path.exists():
        gen = torch.Generator().manual_seed(7)
        tensors = {}
        for block in range(2):  # fixtures.build_wan21: dim 128, ffn 256, 2 blocks
            base = f"diffusion_model.blocks.{block}.ffn.0"
            tensors[f"{base}.lora_down.weight"] = torch.randn(4, 128, generator=gen) * 0.2
            tensors[f"{base}.lora_up.weight"] = torch.randn(256, 4, generator=gen) * 0.2
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path))
    return name


def test_lora_works_with_the_cache(runner, models_dir):
    lora = _tiny_wan_lora(models_dir)
    patches = [("LoraLoaderModelOnly", {"lora_name": lora, "strength_model": 1.0})]

    def run(mode):
        p, ids = graphs.wan_t2v(steps=10, decode=None, model_patches=patches,
                                **({} if mode is None else {"sampler": "LightCacheSampler", "sampler_inputs": {
                                    "cache_mode": mode, "threshold": 3.0, "start_percent": 0.0, "end_percent": 1.0,
                                    "cache_device": "auto", "warmup_steps": 1}}))
        res = runner.run(p)
        return res.output(ids["sampler"])["samples"], res
    with_lora, _ = run(None)
    p, ids = graphs.wan_t2v(steps=10, decode=None)
    without = runner.run(p).output(ids["sampler"])["samples"]
    assert not torch.allclose(with_lora, without, atol=1e-4), "the LoRA had no effect: the test proves nothing"
    off, _ = run("off")
    assert torch.equal(off, with_lora)
    cached, _ = run("mix")
    assert _psnr(cached, with_lora) > _psnr(cached, without)  # the cache predicts the LoRA'd model, not the base


class _CompileEager(ModelPatchNode):
    """MODEL -> MODEL: ComfyUI's own torch.compile helper (what TorchCompileModel calls) with the cheap 'eager'
    backend, so the test does not spend minutes in inductor; the model patcher ends up exactly as
    TorchCompileModel leaves it (its APPLY_MODEL wrapper and compile kwargs)."""

    def patch(self, model):
        from comfy_api.torch_helpers import set_torch_compile_wrapper

        m = model.clone()
        set_torch_compile_wrapper(model=m, backend="eager")
        return (m,)


def test_torch_compile_keeps_step_reuse_and_turns_block_reuse_off(runner, comfy_host):
    comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheTestCompileEager"] = _CompileEager
    try:
        p, ids = graphs.trained_wan(seed=1, prompt_index=0, cfg=CFG, steps=STEPS,
                                    model_patches=[("LightCacheTestCompileEager", {})], sampler="LightCacheSampler",
                                    sampler_inputs={"cache_mode": "mix", "threshold": 0.6, "start_percent": 0.0,
                                                    "end_percent": 1.0, "cache_device": "auto"})
        res = runner.run(p)
    finally:
        comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("LightCacheTestCompileEager", None)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert report["reused_by_granularity"].get("step", 0) > 0
    assert "block" not in report["reused_by_granularity"]
    assert any("compiled" in n for n in report["notes"]), report["notes"]


def test_skip_layer_guidance_evaluations_run_uncached(runner, ksampler):
    """SkipLayerGuidanceDiT calls the model a second time in each step (skipped layers, cond only) from a
    post-CFG function; that call must neither read the cache nor enter its history."""
    slg = ("SkipLayerGuidanceDiT", {"double_layers": "3", "single_layers": "", "scale": 2.0, "start_percent": 0.0,
                                    "end_percent": 1.0, "rescaling_scale": 0.0})
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS, model_patches=[slg])
    reference = runner.run(p).output(ids["sampler"])["samples"]
    assert _psnr(reference, ksampler) < 40, "SLG changed nothing: the test would prove nothing"
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS, model_patches=[slg],
                                sampler="LightCacheSampler",
                                sampler_inputs={"cache_mode": "mix", "threshold": 0.6, "start_percent": 0.0,
                                                "end_percent": 1.0, "cache_device": "auto"})
    res = runner.run(p)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert report["evaluations"] == 2 * STEPS  # the SLG calls are not the cache's evaluations
    assert any("secondary" in n for n in report["notes"]), report["notes"]
    assert _psnr(res.output(ids["sampler"])["samples"], reference) >= 30.0


# ----------------------------------------------------------------------------- context windows

def _context_windows(comfy_host, **overrides) -> tuple[str, dict]:
    """ComfyUI's own ContextWindowsManual with this host's inputs: its defaults, then ours."""
    node = comfy_host.nodes.NODE_CLASS_MAPPINGS["ContextWindowsManual"]
    spec = node.INPUT_TYPES()
    inputs = {}
    for name, entry in spec.get("required", {}).items():
        if name == "model":
            continue
        kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
        choices = kind if isinstance(kind, list) else options.get("options")
        if "default" in options:
            inputs[name] = options["default"]
        elif choices:
            inputs[name] = choices[0]
    inputs.update(overrides)
    return "ContextWindowsManual", inputs


def test_context_windows_keep_one_cache_each(runner, comfy_host, monkeypatch):
    """Every context window carries the same cond uuids; a residual cached in one window must never be applied
    to another. The trained Wan's 5 latent frames in windows of 3 (overlap 1): one trajectory per window."""
    windows = _context_windows(comfy_host, context_length=3, context_overlap=1, dim=2)
    settings = {"cache_mode": "mix", "threshold": 0.6, "start_percent": 0.0, "end_percent": 1.0, "cache_device": "auto"}
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS, model_patches=[windows])
    reference = runner.run(p).output(ids["sampler"])["samples"]
    keys = set()
    original = core().HybridEngine.trajectory

    def recording(self, key, device):
        keys.add(key)
        return original(self, key, device)

    monkeypatch.setattr(core().HybridEngine, "trajectory", recording)
    p, ids = graphs.trained_wan(seed=PAIR[1], prompt_index=PAIR[0], cfg=CFG, steps=STEPS, model_patches=[windows],
                                sampler="LightCacheSampler", sampler_inputs=settings)
    res = runner.run(p)
    report = res.ui[ids["sampler"]]["lightcache_report"][0]
    assert len(keys) >= 2 and None not in keys, keys
    assert report["reused"] > 0
    assert _psnr(res.output(ids["sampler"])["samples"], reference) >= 30.0, res.output(ids["sampler"], 1)


class _ListOutputs(ModelPatchNode):
    """MODEL -> MODEL whose innermost DIFFUSION_MODEL wrapper returns a list (video, audio), the shape
    LTX-2's audio+video model gives: the cache must refuse it clearly instead of failing inside torch."""

    def patch(self, model):
        import comfy.patcher_extension

        def wrapper(executor, *args, **kwargs):
            out = executor(*args, **kwargs)
            return [out, out[:, :1]]

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "lightcache_test_list", wrapper)
        return (m,)


def test_a_model_with_list_outputs_gets_a_clear_error(runner, comfy_host):
    comfy_host.nodes.NODE_CLASS_MAPPINGS["LightCacheTestListOutputs"] = _ListOutputs
    try:
        patches = [("LightCacheModelPatch", {"cache_mode": "mix", "threshold": 0.6, "start_percent": 0.0,
                                             "end_percent": 1.0, "cache_device": "auto"}),
                   ("LightCacheTestListOutputs", {})]
        p, ids = graphs.wan_t2v(steps=4, decode=None, model_patches=patches)
        with pytest.raises(PromptFailed) as err:
            runner.run(p)
    finally:
        comfy_host.nodes.NODE_CLASS_MAPPINGS.pop("LightCacheTestListOutputs", None)
    message = str(err.value)
    assert "several outputs" in message and "Fix" in message and "cache_mode" in message
