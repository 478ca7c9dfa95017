"""LightCache Sampler and LightCache Model Patch: step / CFG / block / mix caching for video DiTs.

The Model Patch stores the cache settings on a ``model.clone()`` with keyed
wrappers (see ``dit_cache.py``); the Sampler applies the same patch and calls
ComfyUI's own KSampler sampling (``compat.common_ksampler``), so the sampler
loop is never forked and ``cache_mode=off`` is exactly KSampler.
"""
from __future__ import annotations

import os

from comfy_api.latest import io

from . import compat
from .dit_cache import CACHE_DEVICES, CacheConfig, LightCacheError, ReportSink, apply_lightcache

CACHE_MODES = ["mix", "step", "cfg", "block", "deepcache", "off"]
DEFAULT_THRESHOLD = 0.3

_SAMPLER_NAMES, _SCHEDULER_NAMES = compat.ksampler_options()


def _cache_inputs() -> list:
    """Cache settings shared by the Sampler and the Model Patch."""
    adv = compat.input_flags(advanced=True)
    return [
        io.Combo.Input("cache_mode", options=CACHE_MODES, default="mix",
                       tooltip="What to reuse between steps. mix (recommended): per step the cheapest of step/cfg/block "
                               "reuse that fits the error budget. step: reuse the whole model residual. cfg: compute "
                               "the positive branch only and rebuild the negative from the cached difference. block: "
                               "compute the first/last transformer blocks, reuse the middle ones. deepcache: UNet "
                               "models (SD1.5/SVD/AnimateDiff). off: exactly KSampler."),
        io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=3.0, step=0.01,
                       tooltip="Quality/speed knob: error budget for the accumulated change since the last full "
                               "compute. Lower = closer to KSampler and slower; 0 = never reuse; higher = faster."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps after which reuse may start."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps after which every step computes again."),
        io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default="auto",
                       tooltip="Where cached residuals live. auto: small ones on the GPU, large ones in pinned CPU "
                               "memory (copied back asynchronously one step ahead). gpu: all on the GPU (fastest, "
                               "more VRAM). cpu: all in CPU RAM (no VRAM growth)."),
        io.Int.Input("warmup_steps", default=3, min=0, max=1000,
                     tooltip="The first steps always compute (the trajectory changes fastest there).", optional=True, **adv),
        io.Int.Input("max_consecutive_reuse", default=3, min=0, max=1000,
                     tooltip="Most evaluations in a row that may reuse before one full compute (0 = no cap).", optional=True, **adv),
        io.Int.Input("block_first", default=1, min=0, max=100,
                     tooltip="block/mix: transformer blocks always computed at the start of the model.", optional=True, **adv),
        io.Int.Input("block_last", default=1, min=0, max=100,
                     tooltip="block/mix: transformer blocks always computed at the end of the model.", optional=True, **adv),
    ]


def build_config(model, node_name: str, cache_mode: str, threshold: float, start_percent: float, end_percent: float,
                 cache_device: str, warmup_steps: int = 3, max_consecutive_reuse: int = 3, block_first: int = 1,
                 block_last: int = 1, report_sink: ReportSink | None = None) -> CacheConfig:
    if start_percent > end_percent:
        raise LightCacheError(f"{node_name}: start_percent ({start_percent}) is after end_percent ({end_percent}). "
                              f"Fix: set start_percent <= end_percent.")
    layout = compat.dit_block_layout(model)
    return CacheConfig(mode=cache_mode, threshold=float(threshold), start_percent=float(start_percent),
                       end_percent=float(end_percent), cache_device=cache_device, warmup_steps=int(warmup_steps),
                       max_consecutive_reuse=int(max_consecutive_reuse), block_first=int(block_first),
                       block_last=int(block_last), output_channels=compat.model_output_channels(model),
                       block_layout=tuple(layout) if layout else None, report_sink=report_sink,
                       verbose=os.environ.get("LIGHTCACHE_VERBOSE") == "1")  # per-evaluation decision log


def patch_model(model, node_name: str, cache_mode: str, threshold: float, start_percent: float, end_percent: float,
                cache_device: str, report_sink: ReportSink | None = None, **advanced):
    """The patched clone (or ``model`` itself for ``off``), with clear errors for unsupported combinations."""
    if cache_mode == "off":
        return model
    if cache_mode == "deepcache":
        if not compat.is_unet_model(model):
            raise LightCacheError(f"{node_name}: cache_mode 'deepcache' is for UNet models (SD1.5/SDXL, SVD, "
                                  f"AnimateDiff). This model is a DiT. Fix: use cache_mode 'mix' (or step/cfg/block).")
        try:
            from .unet_cache import apply_deepcache
        except ImportError as exc:
            raise LightCacheError(f"{node_name}: cache_mode 'deepcache' is not available in this install "
                                  f"(module unet_cache missing: {exc}). Fix: use cache_mode 'step' or 'cfg'.") from exc
        return apply_deepcache(model, threshold=threshold, start_percent=start_percent, end_percent=end_percent,
                               cache_device=cache_device, report_sink=report_sink)
    config = build_config(model, node_name, cache_mode, threshold, start_percent, end_percent, cache_device,
                          report_sink=report_sink, **advanced)
    if cache_mode == "mix" and config.block_range() is None:
        compat.log.warning("[LightCache] %s: this model's block loop has no patches_replace support; "
                           "mix will choose between step and cfg reuse only.", node_name)
    return apply_lightcache(model, config, node_name)


class LightCacheModelPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LightCacheModelPatch",
            display_name="LightCache Model Patch",
            category=compat.NODE_CATEGORY,
            description="Adds LightCache step/CFG/block caching to a video DiT (Wan 2.1/2.2, HunyuanVideo; step and "
                        "cfg for any model with a DIFFUSION_MODEL wrapper) for use with any sampler node, such as "
                        "SamplerCustomAdvanced. Cached residuals live in the LightCache store (GPU or CPU); every "
                        "cache is freed when sampling ends, also on errors and interrupts.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to accelerate.")] + _cache_inputs(),
            outputs=[io.Model.Output(tooltip="The model with caching attached (unchanged when cache_mode is off).")],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, cache_mode, threshold, start_percent, end_percent, cache_device, warmup_steps=3,
                max_consecutive_reuse=3, block_first=1, block_last=1) -> io.NodeOutput:
        patched = patch_model(model, "LightCache Model Patch", cache_mode, threshold, start_percent, end_percent,
                              cache_device, warmup_steps=warmup_steps, max_consecutive_reuse=max_consecutive_reuse,
                              block_first=block_first, block_last=block_last)
        return io.NodeOutput(patched)


class LightCacheSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LightCacheSampler",
            display_name="LightCache Sampler",
            category=compat.NODE_CATEGORY,
            description="KSampler with LightCache: a drop-in replacement (same inputs) that reuses work between "
                        "steps. The default 'mix' picks per step between whole-step reuse, CFG-branch reuse and "
                        "middle-block reuse within an error budget. Returns the latent and a report of what was "
                        "computed and reused.",
            inputs=[
                io.Model.Input("model", tooltip="The model used for denoising the input latent."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of steps used in the denoising process."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="The Classifier-Free Guidance scale (1.0 disables the negative branch)."),
                io.Combo.Input("sampler_name", options=_SAMPLER_NAMES, tooltip="The sampling algorithm, as in KSampler."),
                io.Combo.Input("scheduler", options=_SCHEDULER_NAMES, tooltip="The noise schedule, as in KSampler."),
                io.Conditioning.Input("positive", tooltip="The conditioning describing what to include."),
                io.Conditioning.Input("negative", tooltip="The conditioning describing what to exclude."),
                io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="The amount of denoising applied, as in KSampler."),
            ] + _cache_inputs(),
            outputs=[
                io.Latent.Output(tooltip="The denoised latent."),
                io.String.Output(display_name="report", tooltip="What each evaluation did (compute or which reuse), "
                                                                "estimated speedup and cache memory."),
            ],
            is_experimental=True,
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                cache_mode, threshold, start_percent, end_percent, cache_device, warmup_steps=3,
                max_consecutive_reuse=3, block_first=1, block_last=1) -> io.NodeOutput:
        sink = ReportSink()
        patched = patch_model(model, "LightCache Sampler", cache_mode, threshold, start_percent, end_percent,
                              cache_device, report_sink=sink, warmup_steps=warmup_steps,
                              max_consecutive_reuse=max_consecutive_reuse, block_first=block_first,
                              block_last=block_last)
        out = compat.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise=denoise)
        if sink.reports:
            report = sink.reports[-1]
            text = report.to_text()
            report_dict = report.to_dict()
            report_dict.pop("records", None)
        else:
            text = f"LightCache {cache_mode}: no caching applied (KSampler path)."
            report_dict = {"node": "LightCacheSampler", "mode": cache_mode, "timeline": [], "notes": [text]}
        compat.send_progress_text(text.splitlines()[0])
        return io.NodeOutput(out, text, ui={"lightcache_report": [report_dict]})
