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
from .dit_cache import CACHE_DEVICES, CacheConfig, LightCacheError, apply_lightcache
from .run_lifecycle import report_channel

CACHE_MODES = ["auto", "mix", "step", "cfg", "block", "deepcache", "off"]
DEFAULTS = CacheConfig()  # the engine's defaults are the nodes' defaults
DEFAULT_THRESHOLD = DEFAULTS.threshold
SEARCH_ALIASES = ["teacache", "easycache", "magcache", "first block cache", "fbcache", "deepcache", "mixcache",
                  "taylorseer", "step cache", "cfg cache", "block cache", "ksampler cache"]

_SAMPLER_NAMES, _SCHEDULER_NAMES = compat.ksampler_options()


def _cache_inputs() -> list:
    """Cache settings shared by the Sampler and the Model Patch."""
    adv = compat.input_flags(advanced=True)
    return [
        io.Combo.Input("cache_mode", options=CACHE_MODES, default="auto",
                       tooltip="What to reuse between steps. auto (recommended): 'mix' for video transformers "
                               "(Wan, HunyuanVideo), 'deepcache' for UNets (SD1.5, SVD, AnimateDiff); the report says "
                               "which. mix: per step the cheapest of step / cfg / block reuse whose predicted error "
                               "fits the threshold. step: predict the whole model output. cfg: compute the positive "
                               "branch, rebuild the negative. block: compute the first/last transformer blocks, reuse "
                               "the middle. deepcache: UNet deep features. off: exactly KSampler."),
        io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=3.0, step=0.01,
                       tooltip="Quality/speed knob: the error the cache may accumulate between full steps. 0 = "
                               "never reuse (KSampler). mix on a trained Wan, 30 steps, CFG 5 (README): 0.1 = 1.7x fewer "
                               "model evaluations at 54 dB PSNR vs KSampler, 0.3 = 2.5x at 47 dB, 0.6 (default) = 3.1x at "
                               "42 dB, 1.0 = 3.6x at 39 dB. deepcache: 0.6 = a full UNet step every 3rd step, each +0.3 "
                               "adds one. Raise it for speed, lower it if motion or detail changes."),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps after which reuse may start."),
        io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the steps after which every step computes again."),
        io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default="auto",
                       tooltip="Where cached tensors live. auto: small ones on the GPU, large ones in pinned CPU "
                               "memory (copied back asynchronously before the step that reads them). gpu: all on "
                               "the GPU (fastest, more VRAM). cpu: all in CPU RAM (no VRAM growth)."),
        io.Int.Input("warmup_steps", default=DEFAULTS.warmup_steps, min=0, max=1000,
                     tooltip="The first steps always compute (the trajectory changes fastest there).", optional=True, **adv),
        io.Int.Input("max_consecutive_reuse", default=DEFAULTS.max_consecutive_reuse, min=0, max=1000,
                     tooltip="Safety cap on evaluations in a row that reuse (0 = no cap); the threshold normally "
                             "ends a run of reuses first.", optional=True, **adv),
        io.Int.Input("block_first", default=DEFAULTS.block_first, min=0, max=100,
                     tooltip="block/mix: transformer blocks always computed at the start of the model.", optional=True, **adv),
        io.Int.Input("block_last", default=DEFAULTS.block_last, min=0, max=100,
                     tooltip="block/mix: transformer blocks always computed at the end of the model.", optional=True, **adv),
        io.Float.Input("extrapolation", default=DEFAULTS.extrapolation, min=0.0, max=1.0, step=0.05,
                       tooltip="How a reused step predicts the model output: 0 repeats the last computed output; "
                               "0.5 (default) adds half the trend of the last two computed steps; 1 the full trend.",
                       optional=True, **adv),
    ]


def resolve_mode(model, cache_mode: str) -> str:
    """``auto``: the method that fits the model (UNet -> deepcache, otherwise mix)."""
    if cache_mode != "auto":
        return cache_mode
    return "deepcache" if compat.is_unet_model(model) else "mix"


def build_config(model, node_name: str, cache_mode: str, threshold: float, start_percent: float, end_percent: float,
                 cache_device: str, warmup_steps: int = DEFAULTS.warmup_steps,
                 max_consecutive_reuse: int = DEFAULTS.max_consecutive_reuse, block_first: int = DEFAULTS.block_first,
                 block_last: int = DEFAULTS.block_last, extrapolation: float = DEFAULTS.extrapolation) -> CacheConfig:
    if start_percent > end_percent:
        raise LightCacheError(f"{node_name}: start_percent ({start_percent}) is after end_percent ({end_percent}). "
                              f"Fix: set start_percent <= end_percent.")
    layout = compat.dit_block_layout(model)
    return CacheConfig(mode=cache_mode, threshold=float(threshold), start_percent=float(start_percent),
                       end_percent=float(end_percent), cache_device=cache_device, warmup_steps=int(warmup_steps),
                       max_consecutive_reuse=int(max_consecutive_reuse), block_first=int(block_first),
                       block_last=int(block_last), extrapolation=float(extrapolation),
                       block_layout=tuple(layout) if layout else None,
                       verbose=os.environ.get("LIGHTCACHE_VERBOSE") == "1")  # per-evaluation decision log


def check_no_stacked_cache(model, node_name: str) -> None:
    stacked = compat.stacked_caches(model)
    if stacked:
        names = " and ".join(stacked)
        raise LightCacheError(
            f"{node_name}: the model already goes through ComfyUI's {names} node. Two step caches on one model "
            f"would each skip steps the other decided on and the report would count steps the model never ran. "
            f"Fix: remove the {names} node (LightCache does its job), or set cache_mode to 'off'.")


def check_latent(model, latent: dict, node_name: str) -> None:
    """The latent must have the channels and rank the model samples (else a clear error, not a tensor error)."""
    layout = compat.latent_layout(model)
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if layout is None or not hasattr(samples, "shape"):
        return
    channels, rank = layout
    if samples.dim() != rank or samples.shape[1] != channels:
        kind = "video latent [batch, channels, frames, height, width]" if rank == 5 else \
            "image latent [batch, channels, height, width]"
        raise LightCacheError(
            f"{node_name}: latent_image has shape {list(samples.shape)}, but this model samples a {kind} with "
            f"{channels} channels. Fix: make the latent with the empty-latent node of this model family (e.g. "
            f"EmptyHunyuanLatentVideo / Wan22ImageToVideoLatent for video models, EmptyLatentImage for SD1.5).")


def patch_model(model, node_name: str, cache_mode: str, threshold: float, start_percent: float, end_percent: float,
                cache_device: str, **advanced):
    """The patched clone (or ``model`` itself for ``off``), with clear errors for unsupported combinations."""
    cache_mode = resolve_mode(model, cache_mode)
    if cache_mode == "off":
        return model
    check_no_stacked_cache(model, node_name)
    if cache_mode == "deepcache":
        if not compat.is_unet_model(model):
            raise LightCacheError(f"{node_name}: cache_mode 'deepcache' is for UNet models (SD1.5/SDXL, SVD, "
                                  f"AnimateDiff). This model is a DiT. Fix: use cache_mode 'auto' or 'mix'.")
        from .unet_cache import apply_deepcache

        return apply_deepcache(model, threshold=threshold, start_percent=start_percent, end_percent=end_percent,
                               cache_device=cache_device)
    config = build_config(model, node_name, cache_mode, threshold, start_percent, end_percent, cache_device, **advanced)
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
            description="Adds LightCache caching to a model for use with any sampler node (SamplerCustomAdvanced, "
                        "KSamplerAdvanced, a Wan 2.2 two-stage run): step / CFG / block reuse for video transformers "
                        "(Wan 2.1/2.2, HunyuanVideo), DeepCache for UNets. Cached tensors live in the LightCache store "
                        "(GPU or CPU) and are freed when sampling ends, also on errors and interrupts. The report "
                        "goes to the log; LightCache Sampler also returns it.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to accelerate.")] + _cache_inputs(),
            outputs=[io.Model.Output(tooltip="The model with caching attached (unchanged when cache_mode is off).")],
            is_experimental=True,
            **compat.schema_extras(search_aliases=SEARCH_ALIASES),
        )

    @classmethod
    def execute(cls, model, cache_mode, threshold, start_percent, end_percent, cache_device, **advanced) -> io.NodeOutput:
        patched = patch_model(model, "LightCache Model Patch", cache_mode, threshold, start_percent, end_percent,
                              cache_device, **advanced)
        return io.NodeOutput(patched)


class LightCacheSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LightCacheSampler",
            display_name="LightCache Sampler",
            category=compat.NODE_CATEGORY,
            description="KSampler with LightCache: a drop-in replacement (same inputs) that reuses work between "
                        "steps. The default 'auto' picks the hybrid 'mix' for video transformers (per step the "
                        "cheapest of whole-step, CFG-branch and middle-block reuse whose predicted error fits the "
                        "threshold) and DeepCache for UNets. Returns the latent and a report of what was computed "
                        "and reused.",
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
                                                                "the cache's bytes stored and read, and an estimated "
                                                                "speedup."),
            ],
            is_experimental=True,
            **compat.schema_extras(search_aliases=SEARCH_ALIASES),
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                cache_mode, threshold, start_percent, end_percent, cache_device, **advanced) -> io.NodeOutput:
        node = "LightCache Sampler"
        check_latent(model, latent_image, node)
        mode = resolve_mode(model, cache_mode)
        patched = patch_model(model, node, mode, threshold, start_percent, end_percent, cache_device, **advanced)
        with report_channel() as channel:
            out = compat.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                         latent_image, denoise=denoise)
        reports = channel.reports
        if reports:
            report = reports[-1]
            if cache_mode == "auto":
                report.notes.insert(0, f"cache_mode auto chose '{mode}' for this "
                                       f"{'UNet' if mode == 'deepcache' else 'transformer'} model")
            text = report.to_text()
            report_dict = report.to_dict()
            report_dict.pop("records", None)
        else:
            text = f"LightCache {mode}: no caching applied (KSampler path)."
            report_dict = {"node": "LightCacheSampler", "mode": mode, "timeline": [], "notes": [text]}
        compat.send_progress_text(text.splitlines()[0])
        return io.NodeOutput(out, text, ui={"lightcache_report": [report_dict]})
