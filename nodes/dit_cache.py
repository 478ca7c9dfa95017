"""LightCache Sampler / Model Patch on video DiTs: ComfyUI's hook points wired to the core engine.

Everything that decides, predicts and stores lives in ``lightcache_core.engine``
(the same engine drives the diffusers adapter). This module only turns ComfyUI's
calls into engine calls, through public hook points:

* OUTER_SAMPLE (``run_lifecycle``): one ``DitRun`` per sampling run, on the run's own
  copy of ``model_options``, freed in ``finally``.
* CALC_COND_BATCH: per evaluation, the decision. ``step`` runs nothing: every
  branch's output is predicted (done here rather than in the diffusion model, so
  cond batching, ControlNets and area conditioning are skipped too, and the
  prediction is of the combined per-branch output ComfyUI hands to CFG); ``cfg``
  runs the cond branch only; ``block`` and ``compute`` run the model.
* DIFFUSION_MODEL: counts the rows the trunk really runs, turns block reuse off
  when side inputs (VACE, ControlNet residuals) are added inside the block loop,
  and refuses list outputs with a clear message.
* ``patches_replace["dit"]`` on the model's first block, the cached range and the
  last block: the engine's ``BlockReuse`` hooks (chained to any replacement
  already there).

ComfyUI's CALC_COND_BATCH returns denoised latents; the engine works in the model's
prediction units, ``(x - denoised) / sigma``.

Granularity codes in the report: C compute, S step, G cfg, B block.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..lightcache_core import CacheStore, RunReport, StoreConfig
from ..lightcache_core.engine import MIN_SIGMA, EngineConfig, Evaluation, HybridEngine
from ..lightcache_core.policy import COMPUTE
from ..lightcache_core.settings import CACHE_DEVICES, DitCacheSettings, cached_block_range
from . import compat
from .run_lifecycle import ProgressText, StepClock, install_wrappers, make_outer_sample_wrapper, run_of

log = logging.getLogger("LightCache")

KEY = "lightcache"  # wrapper key and transformer_options key of the (immutable) config
RUN_KEY = "lightcache_run"  # transformer_options key of the run (the run's own model_options only)
CALL_KEY = "lightcache_call"  # transformer_options key of the evaluation in flight

BRANCH_NAMES = {0: "cond", 1: "uncond"}


class LightCacheError(ValueError):
    """A setting or model the caching engine cannot serve; the message names the node, the input and the fix."""


@dataclass(frozen=True)
class CacheConfig(DitCacheSettings):
    """Immutable node settings stored on the patched model (never per-run state): the shared DiT settings
    (``lightcache_core.settings.DitCacheSettings``) plus what the node learned about the model.

    block_layout: ``((block_name, count), ...)`` from ``compat.dit_block_layout``.
    verbose: log each decision.
    """

    block_layout: tuple | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise LightCacheError(str(exc)) from exc

    def granularities(self) -> tuple[str, ...]:
        """The reuse granularities this mode may choose (block only where the model has a range)."""
        return self.granularities_for(self.block_range() is not None)

    def engine_config(self) -> EngineConfig:
        rng = self.block_range()
        cached = rng[2] - rng[1] if rng is not None else 0
        return self.engine_config_for(cached, sum(n for _, n in (self.block_layout or [])))

    def block_range(self) -> tuple[str, int, int] | None:
        """(segment, start, end): the cached middle range, end exclusive.

        The range lies inside one segment (the longest; block shapes change between HunyuanVideo's
        double and single segments). ``block_first`` counts from the model's first block, ``block_last``
        from its last (``settings.cached_block_range`` shrinks them on shallow models).
        """
        layout = list(self.block_layout or [])
        if not layout:
            return None
        seg_index = max(range(len(layout)), key=lambda i: (layout[i][1], i))
        name, length = layout[seg_index]
        first = self.block_first if seg_index == 0 else 0
        last = self.block_last if seg_index == len(layout) - 1 else 0
        rng = cached_block_range(length, first, last)
        return None if rng is None else (name, rng[0], rng[1])


class DitRun:
    """One sampling run: the engine plus ComfyUI's side of it (clock, progress, block points)."""

    def __init__(self, config: CacheConfig, sigmas: Any, cfg_scale: float, patcher: Any = None,
                 sigma_max: float | None = None) -> None:
        self.config = config
        self.clock = StepClock(sigmas)
        self.report = RunReport(node="LightCacheSampler", mode=config.mode, total_steps=self.clock.total_steps)
        self.report.model_rows_run = 0
        self.progress = ProgressText(compat.executing_node_id())
        self.engine = HybridEngine(config.engine_config(), self.clock.total_steps, cfg_scale, self.report,
                                   store_factory=self._store_factory(patcher))
        self.block_range = config.block_range() if "block" in config.granularities() else None
        layout = list(config.block_layout or [])
        self.first_point = (layout[0][0], 0) if layout else None
        self.last_point = (layout[-1][0], layout[-1][1] - 1) if layout else None
        if self.clock.degenerate:
            self.engine.note("degenerate sigma schedule: every evaluation computes")
        elif self.clock.values[-1] > 0 or (sigma_max is not None and self.clock.values[0] < 0.999 * sigma_max):
            self.engine.note(f"one stage of a longer run: sigma {self.clock.values[0]:.3f} -> {self.clock.values[-1]:.3f} "
                             f"in {self.clock.total_steps} steps; warm-up and last-step rules count within this stage")
        if self.block_range is not None and compat.torch_compile_active(patcher):
            self.engine.turn_block_off("block reuse off for this run: the model is compiled (TorchCompileModel) and "
                                       "block reuse would break the compiled graph at every block; step and cfg "
                                       "reuse stay on")
        self._last_input = None  # (latent, sigma) of the last evaluation, weakly: a second call with both is secondary
        if self.engine.too_few_steps:
            self.progress.update(f"LightCache: {self.report.notes[-1]}", force=True)

    def _store_factory(self, patcher: Any):
        placement = CACHE_DEVICES[self.config.cache_device]
        allocator = compat.host_pinned_allocator()

        def make(device: torch.device) -> CacheStore:
            return CacheStore(device, StoreConfig(placement=placement), host_allocator=allocator,
                              free_memory=(lambda: compat.free_memory_bytes(device, patcher))
                              if device.type == "cuda" else None)
        return make

    # ------------------------------------------------------------------ lifecycle
    def install(self, model_options: dict) -> None:
        """Block patches go in only when block reuse can be chosen in this run."""
        if self.block_range is None or self.engine.block_off_reason is not None:
            return
        segment, start, end = self.block_range
        to = model_options["transformer_options"]
        replace = dict(to.get("patches_replace", {}))
        dit = dict(replace.get("dit", {}))
        points = {(segment, i) for i in range(start, end)} | {p for p in (self.first_point, self.last_point) if p}
        for point in points:
            dit[point] = _BlockPatch(point, dit.get(point))
        replace["dit"] = dit
        to["patches_replace"] = replace

    def finish(self, error: BaseException | None) -> RunReport:
        granularities = self.config.granularities()
        if "cfg" in granularities and self.report.records and not any(r.branch == "uncond" for r in self.report.records):
            self.engine.note("cfg reuse had nothing to do: at cfg 1 ComfyUI runs no negative branch")
        return self.engine.finish(error)

    # ------------------------------------------------------------------ one evaluation (CALC_COND_BATCH)
    def evaluate(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        if self._last_input is not None and self._last_input[0]() is x_in and self._last_input[1]() is timestep:
            # A second evaluation of the same latent within one step (skip-layer guidance, PAG-style
            # guidance in a post-CFG function): it runs as its caller built it, uncached and unrecorded,
            # so it neither reads a cache meant for the main evaluation nor corrupts the history.
            self.engine.note("secondary evaluations within a step (e.g. skip-layer guidance) run uncached")
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        self._last_input = (weakref.ref(x_in), weakref.ref(timestep) if isinstance(timestep, torch.Tensor) else lambda: None)
        start = time.perf_counter()
        present = [i for i, c in enumerate(conds) if c is not None and len(c) > 0]
        to = model_options.get("transformer_options", {})
        trajectory = self.engine.trajectory(compat.context_window_id(to), x_in.device)
        trajectory.check_input(x_in)
        decision = trajectory.decide(x_in, timestep, self.clock.step_of, present)
        sigma = decision.sigma

        def run_model(run_conds):
            evaluation = Evaluation(trajectory, decision)
            options = dict(model_options)
            options["transformer_options"] = {**to, CALL_KEY: (self, evaluation)}
            return list(executor(model, run_conds, x_in, timestep, options, *args, **kwargs)), evaluation

        if decision.decision == "step":
            out = [torch.zeros_like(x_in) for _ in conds]
            for b in present:
                out[b] = to_denoised(x_in, trajectory.predict(b, sigma), sigma)
        elif decision.decision == "cfg":
            out, _ = run_model([conds[0]] + [None] * (len(conds) - 1))
            cond = to_noise_units(x_in, out[0], sigma)
            for b in present:
                if b != 0:
                    out[b] = to_denoised(x_in, trajectory.rebuild_branch(cond, b, sigma), sigma)
        else:
            out, evaluation = run_model(conds)
            if decision.decision == "block":
                decision.decision = self.engine.blocks.settle(evaluation)
        if decision.decision == COMPUTE:
            last = decision.step is not None and decision.step >= self.clock.total_steps - 1
            if sigma >= MIN_SIGMA:
                trajectory.record_compute(x_in, {b: to_noise_units(x_in, out[b], sigma) for b in present}, sigma, last)
        elif decision.decision in ("cfg", "block") and sigma >= MIN_SIGMA:
            trajectory.rebase({b: to_noise_units(x_in, out[b], sigma) for b in present}, sigma)
        trajectory.settle(decision)
        self._record(decision, present, time.perf_counter() - start)
        if self.config.verbose:
            log.info("LightCache step %s sigma %.4f errors %s A %.4f -> %s", decision.step, sigma,
                     {g: round(e, 5) for g, e in decision.errors.items()}, trajectory.accumulated, decision.decision)
        return out

    def _record(self, decision, present, seconds) -> None:
        step_i = -1 if decision.step is None else int(decision.step)
        share = seconds / max(len(present), 1)
        for b in present:
            branch = BRANCH_NAMES.get(b, f"cond{b}")
            if decision.decision == COMPUTE or (decision.decision == "cfg" and b == 0):
                self.report.add(step_i, decision.sigma, branch, "compute", "full", share)
            else:
                self.report.add(step_i, decision.sigma, branch, "reuse", decision.decision, share)
        self.progress.update(
            f"LightCache {self.config.mode}: step {step_i + 1}/{self.clock.total_steps} [{decision.decision}] "
            f"computed {self.report.computed_count()}, reused {self.report.reused_count()} evaluations",
            force=step_i >= self.clock.total_steps - 1)

    # ------------------------------------------------------------------ the block loop
    def block(self, point: tuple, evaluation: Evaluation, args: dict, original) -> dict:
        """One ``patches_replace["dit"]`` call: report the engine's points, reuse or run the block."""
        img = args["img"]
        uuids = tuple(args.get("transformer_options", {}).get("uuids") or ())
        if not uuids or img.shape[0] % len(uuids) != 0:
            return original(args)
        group = (uuids, str(img.device))
        blocks = self.engine.blocks
        scratch = evaluation.scratch_for(group)
        segment, start, end = self.block_range
        in_range = point[0] == segment and start <= point[1] < end
        streams = {k: args[k] for k in ("img", "txt") if isinstance(args.get(k), torch.Tensor)}
        if point == self.first_point and not in_range:
            blocks.model_input(evaluation, group, img)
        if in_range and point[1] == start:
            blocks.first_blocks_done(evaluation, group, streams)
        if in_range and scratch.get("reuse"):
            if point[1] < end - 1:
                return dict(streams)
            return blocks.add_residual(evaluation, uuids, streams)
        out = original(args)
        if in_range and point[1] == end - 1:
            blocks.range_done(evaluation, group, uuids, out)
        if point == self.last_point:
            blocks.model_output(evaluation, group, out["img"])
        return out


def to_noise_units(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """The model's prediction in noise units, ``(x - denoised) / sigma`` (eps / velocity)."""
    return ((x - denoised) / sigma).detach()


def to_denoised(x: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    return x - noise.to(x.dtype) * sigma


class _BlockPatch:
    """One ``patches_replace["dit"]`` entry; chains to the replacement it displaced."""

    def __init__(self, point: tuple, previous: Any) -> None:
        self.point, self.previous = point, previous

    def __call__(self, args, extra):
        def original(a):
            return self.previous(a, extra) if self.previous is not None else extra["original_block"](a)

        call = args.get("transformer_options", {}).get(CALL_KEY)
        if call is None or call[1].kind not in (COMPUTE, "block"):
            return original(args)
        run, evaluation = call
        return run.block(self.point, evaluation, args, original)


# ----------------------------------------------------------------------------- wrappers

def _start_run(guider, sigmas) -> DitRun | None:
    config = guider.model_options.get("transformer_options", {}).get(KEY)
    if not isinstance(config, CacheConfig):
        return None
    patcher = getattr(guider, "model_patcher", None)
    return DitRun(config, sigmas, compat.guider_cfg_scale(guider), patcher, compat.model_sigma_max(patcher))


outer_sample_wrapper = make_outer_sample_wrapper(RUN_KEY, _start_run)


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    run = run_of(model_options.get("transformer_options"), RUN_KEY)
    if not isinstance(run, DitRun):
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    return run.evaluate(executor, model, conds, x_in, timestep, model_options, *args, **kwargs)


def diffusion_model_wrapper(executor, *args, **kwargs):
    """Counts the rows the trunk really evaluates; guards block reuse against side inputs."""
    to = compat.transformer_options_of(args, kwargs)
    call = to.get(CALL_KEY) if isinstance(to, dict) else None
    if call is None:
        return executor(*args, **kwargs)
    run, _ = call
    side = compat.block_side_inputs(args, kwargs)
    if side and run.block_range is not None:
        run.engine.turn_block_off(f"block reuse off for this run: {side} are added inside the block loop, so a "
                                  f"cached block residual would count them twice")
    x = args[0] if args else kwargs.get("x")
    output = executor(*args, **kwargs)
    with run.engine.lock:
        run.report.model_rows_run += int(x.shape[0]) if isinstance(x, torch.Tensor) else 0
    if not isinstance(output, torch.Tensor):
        raise LightCacheError(
            "LightCache Sampler: this model returns several outputs per evaluation (e.g. LTX-2 audio + video), "
            "which the cache cannot predict. Fix: set cache_mode to 'off' for this model.")
    return output


def apply_lightcache(model, config: CacheConfig, node_name: str = "LightCache Model Patch"):
    """A clone of ``model`` carrying ``config`` and the keyed wrappers; ``mode="off"`` returns ``model``."""
    if config.mode == "off":
        return model
    if config.mode == "block" and config.block_range() is None:
        raise LightCacheError(
            f"{node_name}: cache_mode 'block' needs a DiT whose block loop honours patches_replace['dit'] "
            f"(Wan, HunyuanVideo, Flux...); this model ({type(compat.diffusion_model_of(model)).__name__}) has none. "
            f"Fix: choose cache_mode 'step' or 'cfg' (or 'mix', which then mixes step and cfg).")
    m = model.clone()
    transformer_options = dict(m.model_options.get("transformer_options", {}))
    transformer_options[KEY] = config
    m.model_options["transformer_options"] = transformer_options
    W = compat.WrappersMP
    install_wrappers(m, KEY, {W.OUTER_SAMPLE: outer_sample_wrapper, W.CALC_COND_BATCH: calc_cond_batch_wrapper,
                              W.DIFFUSION_MODEL: diffusion_model_wrapper})
    return m
