"""``apply_lightcache`` / ``remove_lightcache`` and the ``LightCacheHandle`` they share."""
from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..deepcache import CACHE_DEVICES as DEEPCACHE_DEVICES
from ..deepcache import DeepCacheError, DeepCacheSettings
from ..report import RunReport
from .clock import _StepClock
from .config import DitCacheConfig, LightCacheDiffusersError
from .dit import _install_dit
from .hooks import _check_free, _Installed
from .unet import _install_deepcache, _is_unet
from .wan_vae import _is_wan_vae, disable_sliced_decode, enable_sliced_decode


class LightCacheHandle:
    """What ``apply_lightcache`` installed; ``remove()`` (or leaving ``with``) takes it all out again."""

    def __init__(self) -> None:
        self._installed = _Installed()
        self.sessions: list[Any] = []
        self._decode_patches: list[torch.nn.Module] = []

    @property
    def reports(self) -> list[RunReport]:
        """Finished runs' reports, oldest first (all models together)."""
        return [r for s in self.sessions for r in s.reports]

    @property
    def last_report(self) -> RunReport | None:
        """The latest finished run's report of the first model (the transformer / UNet)."""
        for session in self.sessions:
            if session.reports:
                return session.reports[-1]
        return None

    def finish(self) -> list[RunReport]:
        """End any run in flight (e.g. after a model-level loop) and return the reports."""
        for session in self.sessions:
            session.end_run()
        return self.reports

    def remove(self) -> None:
        """Remove every hook and the sliced decode; the models are as they were (their forward included)."""
        self.finish()
        self._installed.remove()
        for vae in self._decode_patches:
            disable_sliced_decode(vae)
        self._decode_patches.clear()

    def __enter__(self) -> LightCacheHandle:
        return self

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False


def apply_lightcache(target: Any, mode: str | None = None, *, threshold: float | None = None,
                     cache_device: str = "auto", scheduler: Any = None, cfg_scale: float | None = None,
                     sliced_decode: bool = False, **settings: Any) -> LightCacheHandle:
    """Apply LightCache to a diffusers pipeline or model; returns the handle that removes it.

    target: a pipeline (its ``transformer`` / ``transformer_2`` / ``unet``, and with
        ``sliced_decode`` its ``AutoencoderKLWan``), or one model (then pass the
        pipeline's ``scheduler`` unless it calls the model inside ``cache_context``
        with ``step_index``, as Wan pipelines do, and ``cfg_scale``).
    mode: DiTs "mix" (default) | "step" | "cfg" | "block"; UNets "deepcache" (default);
        "off" installs nothing (the pipeline runs exactly as without LightCache).
    threshold: DiTs: the engine's error budget (default 0.6); UNets: mapped to the
        DeepCache interval as the ComfyUI sampler maps it (0.6 -> interval 3).
    cache_device: "auto" | "gpu" | "cpu": where cached tensors live (``CacheStore``).
    settings: further ``DitCacheConfig`` / ``DeepCacheSettings`` fields (e.g. ``warmup_steps``,
        ``block_first``, ``interval``, ``branch``).
    """
    unknown = set(settings) - set(DitCacheConfig.__dataclass_fields__) - set(DeepCacheSettings.__dataclass_fields__)
    if unknown:
        raise LightCacheDiffusersError(f"unknown setting(s) {sorted(unknown)}; see DitCacheConfig / DeepCacheSettings")
    handle = LightCacheHandle()
    models: list[tuple[str, torch.nn.Module]] = []
    pipeline = None
    if isinstance(target, torch.nn.Module):
        models = [("model", target)]
    else:
        pipeline = target
        for name in ("transformer", "transformer_2", "unet"):
            model = getattr(target, name, None)
            if isinstance(model, torch.nn.Module):
                models.append((name, model))
        if not models:
            raise LightCacheDiffusersError(f"{type(target).__name__} has no transformer or unet to cache.")
        scheduler = scheduler if scheduler is not None else getattr(target, "scheduler", None)
    clock = _StepClock(scheduler)
    try:
        for name, model in models:
            if mode == "off":
                continue
            _check_free(model)
            if _is_unet(model):
                if mode not in (None, "deepcache"):
                    raise LightCacheDiffusersError(
                        f"mode {mode!r} is for transformers; {type(model).__name__} is a UNet. Fix: mode 'deepcache'.")
                known = {k: v for k, v in settings.items() if k in DeepCacheSettings.__dataclass_fields__}
                if cache_device not in DEEPCACHE_DEVICES:
                    raise LightCacheDiffusersError(f"cache_device {cache_device!r} is not one of {DEEPCACHE_DEVICES}.")
                known["cache_device"] = cache_device
                try:
                    deep = DeepCacheSettings.from_threshold(threshold, **known) if threshold is not None \
                        else DeepCacheSettings(**known)
                except DeepCacheError as exc:
                    raise LightCacheDiffusersError(str(exc)) from exc
                handle.sessions.append(_install_deepcache(model, deep, clock, handle._installed))
            else:
                if mode == "deepcache":
                    raise LightCacheDiffusersError(f"mode 'deepcache' is for UNets; {type(model).__name__} is a "
                                                   f"transformer. Fix: mode 'mix' (or 'step' / 'cfg' / 'block').")
                known = {k: v for k, v in settings.items() if k in DitCacheConfig.__dataclass_fields__}
                config = DitCacheConfig(mode=mode or "mix", cache_device=cache_device,
                                        **({"threshold": threshold} if threshold is not None else {}), **known)
                handle.sessions.append(_install_dit(model, config, clock, _cfg_reader(pipeline, name, cfg_scale),
                                                    handle._installed))
        if sliced_decode and pipeline is not None:
            vae = getattr(pipeline, "vae", None)
            if vae is not None and _is_wan_vae(vae):
                enable_sliced_decode(vae)
                handle._decode_patches.append(vae)
    except BaseException:
        handle.remove()
        raise
    handle._installed.refresh()
    return handle


def remove_lightcache(handle: LightCacheHandle) -> None:
    handle.remove()


def _cfg_reader(pipeline: Any, component: str, fixed: float | None) -> Callable[[], float | None]:
    """The CFG scale the engine's signals combine branches with, read when a run starts."""
    if fixed is not None:
        return lambda: fixed
    if pipeline is None:
        return lambda: None
    ref = weakref.ref(pipeline)

    def read() -> float | None:
        pipe = ref()
        if pipe is None:
            return None
        names = ("_guidance_scale_2", "_guidance_scale") if component == "transformer_2" else ("_guidance_scale",)
        for name in names:
            value = getattr(pipe, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None
    return read
