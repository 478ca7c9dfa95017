"""LightCache for diffusers: the core engine and DeepCache driven through diffusers' ``HookRegistry``.

The ComfyUI nodes are one host adapter of ``lightcache_core``; this module is the
second. It decides nothing itself: per denoiser call it asks the same
``HybridEngine`` (``engine.py``) the ComfyUI glue (``nodes/dit_cache.py``) asks,
and caches in the same ``CacheStore`` with the same ``cache_device`` choice; the
UNet path runs the same ``DeepCacheSettings`` schedule and branch plan
(``deepcache.py``) as ``nodes/unet_cache.py``.

Importing this module imports neither diffusers nor ComfyUI; diffusers is imported
when a cache is applied (``pip install lightcache[diffusers]``).

Use::

    from lightcache_core.diffusers_adapter import apply_lightcache

    cache = apply_lightcache(pipe)            # WanPipeline: mode "mix"; SVD / AnimateDiff: "deepcache"
    video = pipe(...).frames
    print(cache.last_report.to_text())        # what each evaluation did
    cache.remove()                            # the pipeline is as before

What is hooked (one ``ModelHook`` class per concern, all under names starting
``lightcache``, removed by ``LightCacheHandle.remove``):

* DiTs (``WanTransformer3DModel``; any model whose blocks are a ``blocks`` /
  ``transformer_blocks`` ``ModuleList`` of blocks that take and return one hidden
  state): ``LightCacheDenoiserHook`` on the model decides per call. diffusers'
  Wan pipelines call the transformer once per CFG branch inside
  ``cache_context("cond")`` / ``cache_context("uncond")``; the two calls of a step
  are one engine evaluation with branches 0 (cond) and 1 (uncond): the decision is
  taken at the step's first call, ``step`` reuse runs neither call, ``cfg`` reuse
  runs the cond call and rebuilds the uncond output, ``block`` and ``compute`` run
  both. A call outside any cache context (a batched-CFG pipeline, a direct model
  call) is one branch holding all its rows. ``LightCacheBlockHook`` on each block
  of the list reports to the engine's ``BlockReuse`` and skips the cached range.
* UNets (``UNetSpatioTemporalConditionModel`` for SVD, ``UNet2DConditionModel`` and
  ``UNetMotionModel`` for AnimateDiff): ``DeepCacheStepHook`` on the model picks
  full or cache step from the schedule; ``DeepCacheSkipHook`` on every skipped down
  / mid / up block returns an empty placeholder in cache steps (the UNet's own
  loop then only moves empty tensors); ``DeepCacheEntryHook`` on the first
  recomputed up block stores, or puts back, the hidden state entering it.
* ``AutoencoderKLWan``: ``sliced_wan_decode`` (and ``enable_sliced_decode``, which
  makes ``vae.decode`` use it) decodes latent frame by latent frame with the
  VAE's causal cache carried across calls, writing each slice into a
  preallocated output: the same frames as ``vae.decode``.

Step indices come from the ``CacheContext`` diffusers pipelines pass
(``step_index``, ``num_inference_steps``, ``sigma``), else from the pipeline's
scheduler (the call's timestep looked up in ``scheduler.timesteps``); a call
whose step cannot be placed runs uncached (with a note in the report).
A run ends when the pipeline resets stateful hooks after its call (Wan), after
the last step's calls, or when a call's step index goes back (a new run): no
state survives from one pipeline call to the next.
"""
from __future__ import annotations

import contextvars
import inspect
import math
import time
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache_store import CacheStore, StoreConfig
from .deepcache import CACHE_DEVICES as DEEPCACHE_DEVICES
from .deepcache import PLACEMENT, BranchPlan, DeepCacheError, DeepCacheSettings, plan_for_blocks
from .engine import MIN_SIGMA, EngineConfig, Evaluation, HybridEngine
from .policy import COMPUTE, GRANULARITIES
from .report import RunReport, format_bytes

DIT_MODES = ("off", "step", "cfg", "block", "mix")
UNET_MODES = ("off", "deepcache")
HOOK_PREFIX = "lightcache"
DENOISER_HOOK = "lightcache_denoiser"
BLOCK_HOOK = "lightcache_block"
DEEPCACHE_STEP_HOOK = "lightcache_deepcache_step"
DEEPCACHE_SKIP_HOOK = "lightcache_deepcache_skip"
DEEPCACHE_ENTRY_HOOK = "lightcache_deepcache_entry"
BLOCK_LISTS = ("blocks", "transformer_blocks")
BRANCH_IDS = {"cond": 0, "uncond": 1}
MAX_REPORTS = 16


class LightCacheDiffusersError(ValueError):
    """A model, pipeline or setting the adapter cannot serve; the message names the fix."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class DitCacheConfig:
    """The DiT settings, with the defaults (and meaning) of the ComfyUI sampler's inputs.

    mode: "mix" | "step" | "cfg" | "block" ("off" installs nothing).
    threshold: error budget between full computes; 0 never reuses.
    cache_device: "auto" | "gpu" | "cpu" (``CacheStore`` placement "auto" | "device" | "cpu").
    block_first / block_last: blocks always computed before / after the cached range.
    The rest: see ``engine.EngineConfig``.
    """

    mode: str = "mix"
    threshold: float = 0.6
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache_device: str = "auto"
    warmup_steps: int = 3
    final_compute_steps: int = 1
    max_consecutive_reuse: int = 8
    block_first: int = 1
    block_last: int = 1
    extrapolation: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in DIT_MODES:
            raise LightCacheDiffusersError(f"mode {self.mode!r} is not one of {DIT_MODES} for a transformer.")
        if self.cache_device not in PLACEMENT:
            raise LightCacheDiffusersError(f"cache_device {self.cache_device!r} is not one of {tuple(PLACEMENT)}.")
        for name in ("warmup_steps", "final_compute_steps", "max_consecutive_reuse", "block_first", "block_last"):
            if getattr(self, name) < 0:
                raise LightCacheDiffusersError(f"{name} must be >= 0, got {getattr(self, name)}.")
        try:
            self.engine_config(n_blocks=0)
        except ValueError as exc:
            raise LightCacheDiffusersError(str(exc)) from exc

    def block_range(self, n_blocks: int) -> tuple[int, int] | None:
        """(start, end) of the cached range, end exclusive; as the ComfyUI glue shrinks it on shallow models."""
        first, last = self.block_first, self.block_last
        while n_blocks - first - last < 1 and last > 0:
            last -= 1
        while n_blocks - first - last < 1 and first > 0:
            first -= 1
        if n_blocks - first - last < 1:
            return None
        return first, n_blocks - last

    def granularities(self, n_blocks: int) -> tuple[str, ...]:
        wanted = GRANULARITIES if self.mode == "mix" else (self.mode,) if self.mode in GRANULARITIES else ()
        return tuple(g for g in wanted if g != "block" or self.block_range(n_blocks) is not None)

    def engine_config(self, n_blocks: int) -> EngineConfig:
        rng = self.block_range(n_blocks)
        block_cost = 1.0 - (rng[1] - rng[0]) / n_blocks if rng is not None and n_blocks else 1.0
        return EngineConfig(granularities=self.granularities(n_blocks), threshold=float(self.threshold),
                            start_percent=self.start_percent, end_percent=self.end_percent,
                            warmup_steps=self.warmup_steps, final_compute_steps=self.final_compute_steps,
                            max_consecutive_reuse=self.max_consecutive_reuse, extrapolation=self.extrapolation,
                            block_cost=block_cost, placement=PLACEMENT[self.cache_device])


# ----------------------------------------------------------------------------- diffusers, lazily


_HOOK_TYPES: dict[str, type] = {}


def _diffusers_hooks():
    """diffusers' hook framework (imported on first use, never at module import)."""
    try:
        from diffusers.hooks import HookRegistry, ModelHook
        from diffusers.hooks.hooks import StateManager
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LightCacheDiffusersError("the diffusers adapter needs diffusers with its hook framework "
                                       "(diffusers >= 0.35). Fix: pip install 'lightcache[diffusers]'.") from exc
    return HookRegistry, ModelHook, StateManager


def _hook_types() -> dict[str, type]:
    """The five thin ``ModelHook`` classes; each delegates to the session that installed it."""
    if _HOOK_TYPES:
        return _HOOK_TYPES
    _, ModelHook, _ = _diffusers_hooks()

    class LightCacheDenoiserHook(ModelHook):
        """Per denoiser call: the engine's decision (step / cfg / block / compute)."""

        _is_stateful = True  # diffusers resets it after every pipeline call and hands it the cache context

        def __init__(self, session: _DitSession, state_manager) -> None:
            super().__init__()
            self.session = session
            self.state_manager = state_manager  # receives the CacheContext of cache_context(...)

        def new_forward(self, module, *args, **kwargs):
            return self.session.call(self.fn_ref.original_forward, args, kwargs, _context_of(self.state_manager))

        def reset_state(self, module):
            self.session.end_run()
            return module

    class LightCacheBlockHook(ModelHook):
        """One transformer block: the engine's block-reuse points, and the skipped range."""

        def __init__(self, session: _DitSession, index: int) -> None:
            super().__init__()
            self.session = session
            self.index = index

        def new_forward(self, module, *args, **kwargs):
            return self.session.block(self.index, self.fn_ref.original_forward, args, kwargs)

    class DeepCacheStepHook(ModelHook):
        """Per UNet call: full step or cache step, from the DeepCache schedule."""

        _is_stateful = True

        def __init__(self, session: _DeepCacheSession, state_manager) -> None:
            super().__init__()
            self.session = session
            self.state_manager = state_manager

        def new_forward(self, module, *args, **kwargs):
            return self.session.call(self.fn_ref.original_forward, args, kwargs, _context_of(self.state_manager))

        def reset_state(self, module):
            self.session.end_run()
            return module

    class DeepCacheSkipHook(ModelHook):
        """A down / mid / up block that cache steps skip."""

        def __init__(self, session: _DeepCacheSession, kind: str, index: int) -> None:
            super().__init__()
            self.session, self.kind, self.index = session, kind, index

        def new_forward(self, module, *args, **kwargs):
            return self.session.skip(self.kind, self.index, self.fn_ref.original_forward, args, kwargs)

    class DeepCacheEntryHook(ModelHook):
        """The first recomputed up block: stores, or puts back, the hidden state entering it."""

        def __init__(self, session: _DeepCacheSession) -> None:
            super().__init__()
            self.session = session

        def new_forward(self, module, *args, **kwargs):
            return self.session.entry(self.fn_ref.original_forward, args, kwargs)

    for cls in (LightCacheDenoiserHook, LightCacheBlockHook, DeepCacheStepHook, DeepCacheSkipHook, DeepCacheEntryHook):
        _HOOK_TYPES[cls.__name__] = cls
    return _HOOK_TYPES


class _NoState:
    """The per-context state of our ``StateManager``s: we only read their context; state lives in the engine."""

    def reset(self, *args, **kwargs) -> None:
        pass


def _context_of(state_manager) -> tuple[str | None, Any]:
    """(name, context) of the ``cache_context`` in force, ``(None, None)`` outside one (any diffusers version)."""
    ctx = getattr(state_manager, "_context", None)
    if ctx is None:
        ctx = getattr(state_manager, "_current_context", None)  # older diffusers keep the name only
    if ctx is None:
        return None, None
    if isinstance(ctx, str):
        return ctx, None
    return getattr(ctx, "name", None), ctx


# ----------------------------------------------------------------------------- arguments


class _Signature:
    """Finds a named argument of a forward call, positional or keyword, and replaces it."""

    def __init__(self, fn: Callable) -> None:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):
            params = []
        self.positions = {p.name: i for i, p in enumerate(params)
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}
        self.defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    def get(self, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
        if name in kwargs:
            return kwargs[name]
        i = self.positions.get(name)
        if i is not None and i < len(args):
            return args[i]
        return self.defaults.get(name, default)

    def put(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        i = self.positions.get(name)
        if name not in kwargs and i is not None and i < len(args):
            args = args[:i] + (value,) + args[i + 1:]
        else:
            kwargs = {**kwargs, name: value}
        return args, kwargs


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    sample = getattr(value, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _output_kind(out: Any) -> Any:
    """How the model packs its output: "tuple", "tensor", or the output class (with a ``sample`` field)."""
    if isinstance(out, tuple):
        return "tuple"
    if isinstance(out, torch.Tensor):
        return "tensor"
    return type(out)


def _with_tensor(kind: Any, tensor: torch.Tensor) -> Any:
    """``tensor`` packed as the model packs its output (``(t,)``, ``t`` or ``Output(sample=t)``)."""
    if kind == "tuple":
        return (tensor,)
    if kind == "tensor" or kind is None:
        return tensor
    return kind(sample=tensor)


# ----------------------------------------------------------------------------- the step clock


class _StepClock:
    """Places a denoiser call in its run: (step index, total steps, sigma).

    Prefers the pipeline's ``CacheContext`` (diffusers >= 0.42 passes ``step_index``,
    ``num_inference_steps`` and ``sigma``); else looks the call's timestep up in the
    pipeline scheduler's ``timesteps`` (the sigma then comes from ``scheduler.sigmas``,
    or ``timestep / num_train_timesteps``).
    """

    def __init__(self, scheduler: Any = None) -> None:
        self._scheduler = weakref.ref(scheduler) if scheduler is not None else None
        self._table: tuple | None = None

    def locate(self, ctx: Any, timestep: Any) -> tuple[int | None, int | None, float | None]:
        step = getattr(ctx, "step_index", None)
        total = getattr(ctx, "num_inference_steps", None)
        sigma = getattr(ctx, "sigma", None)
        if step is not None and total is not None:
            if sigma is None:
                sigma = self._sigma_at(int(step), timestep)
            return int(step), int(total), None if sigma is None else float(sigma)
        return self._from_scheduler(timestep)

    def _schedule(self):
        scheduler = self._scheduler() if self._scheduler is not None else None
        timesteps = getattr(scheduler, "timesteps", None) if scheduler is not None else None
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None, None
        key = (timesteps.data_ptr(), timesteps.numel(), id(scheduler))
        if self._table is None or self._table[0] != key:
            values = [float(v) for v in timesteps.detach().flatten().double().cpu().tolist()]
            sigmas = getattr(scheduler, "sigmas", None)
            sig = [float(v) for v in sigmas.detach().flatten().double().cpu().tolist()] \
                if isinstance(sigmas, torch.Tensor) and sigmas.numel() >= len(values) else None
            if sig is None:
                train = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
                sig = [v / train for v in values]
            self._table = (key, values, sig)
        return self._table[1], self._table[2]

    def _from_scheduler(self, timestep: Any) -> tuple[int | None, int | None, float | None]:
        values, sigmas = self._schedule()
        if values is None or timestep is None:
            return None, None, None
        t = float(timestep.detach().flatten()[0].item()) if isinstance(timestep, torch.Tensor) else float(timestep)
        best = min(range(len(values)), key=lambda i: abs(values[i] - t))
        tolerance = 1e-4 * max(1.0, abs(t))
        if abs(values[best] - t) > tolerance or values.count(values[best]) > 1:
            return None, len(values), None  # not one of this run's timesteps, or a multi-stage solver repeats it
        return best, len(values), sigmas[best]

    def _sigma_at(self, step: int, timestep: Any) -> float | None:
        _, sigmas = self._schedule()
        if sigmas is not None and step < len(sigmas):
            return sigmas[step]
        return None


# ----------------------------------------------------------------------------- DiT: the engine per call


@dataclass
class _Group:
    """The calls of one step (one engine evaluation): its decision and what its branches returned."""

    step: int
    sigma: float
    x: torch.Tensor
    decision: Any
    present: list[int]
    evaluation: Evaluation | None = None
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    done: dict[int, tuple[str, str, float]] = field(default_factory=dict)  # branch -> (decision, granularity, s)
    learning: bool = False  # the run has not seen a whole step yet: branches join as they come


class _DitRun:
    """One pipeline run on one transformer: the engine, the step in flight, the report."""

    def __init__(self, session: _DitSession, total_steps: int, cfg_scale: float) -> None:
        self.session = session
        self.total_steps = total_steps
        config = session.config
        self.report = RunReport(node=f"diffusers:{session.model_name}", mode=config.mode, total_steps=total_steps)
        self.report.model_rows_run = 0
        self.engine = HybridEngine(config.engine_config(session.n_blocks), total_steps, cfg_scale, self.report,
                                   store_factory=session.store_factory)
        self.branches: dict[str, int] = {}
        self.learned: list[int] | None = None
        self.group: _Group | None = None
        self.last_step = -1
        self.template: Any = None  # what the model returns (a tuple or an output dataclass)

    def branch_id(self, name: str) -> int:
        """The engine's branch of a cache context: cond 0, uncond 1; any other name (a call outside a
        context is "batch") the lowest free index, so a run's first branch is 0, the one the signals lead with."""
        if name not in self.branches:
            used = set(self.branches.values())
            wanted = BRANCH_IDS.get(name)
            self.branches[name] = wanted if wanted is not None and wanted not in used else \
                next(i for i in range(len(used) + 1) if i not in used)
        return self.branches[name]

    def branch_name(self, b: int) -> str:
        return next((n for n, i in self.branches.items() if i == b), f"cond{b}")


class _DitCall:
    """The transformer call in flight, as the block hooks see it."""

    __slots__ = ("session", "evaluation", "group_key", "row_keys")

    def __init__(self, session, evaluation, group_key, row_keys) -> None:
        self.session, self.evaluation, self.group_key, self.row_keys = session, evaluation, group_key, row_keys


_DIT_CALL: contextvars.ContextVar[_DitCall | None] = contextvars.ContextVar("lightcache_diffusers_dit_call", default=None)


class _DitSession:
    """LightCache on one diffusers transformer: hooks in, engine runs, reports out."""

    def __init__(self, model: torch.nn.Module, config: DitCacheConfig, clock: _StepClock,
                 cfg_scale: Callable[[], float | None], block_list: str | None) -> None:
        self.model = model
        self.model_name = type(model).__name__
        self.config = config
        self.clock = clock
        self.cfg_scale = cfg_scale
        self.block_list = block_list
        self.n_blocks = len(getattr(model, block_list)) if block_list else 0
        rng = config.block_range(self.n_blocks) if "block" in config.granularities(self.n_blocks) else None
        self.block_range = rng
        self.signature: _Signature | None = None
        self.run: _DitRun | None = None
        self.reports: list[RunReport] = []
        self.notes: list[str] = []

    # ------------------------------------------------------------------ stores
    def store_factory(self, device: torch.device) -> CacheStore:
        return CacheStore(device, StoreConfig(placement=PLACEMENT[self.config.cache_device]))

    # ------------------------------------------------------------------ runs
    def _run_for(self, step: int, total: int) -> _DitRun:
        run = self.run
        if run is not None and (step < run.last_step or total != run.total_steps):
            self.end_run()
            run = None
        if run is None:
            scale = self.cfg_scale()
            run = self.run = _DitRun(self, total, float(scale) if scale is not None else 1.0)
            for note in self.notes:
                run.engine.note(note)
        run.last_step = max(run.last_step, step)
        return run

    def end_run(self, error: BaseException | None = None) -> RunReport | None:
        """Flush the step in flight, free every cache, keep the report."""
        run, self.run = self.run, None
        if run is None:
            return None
        try:
            self._flush(run)
        finally:
            report = run.engine.finish(error)
        self.reports.append(report)
        del self.reports[:-MAX_REPORTS]
        return report

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            if self.run is not None:
                self.run.engine.note(text)

    # ------------------------------------------------------------------ one denoiser call
    def call(self, original: Callable, args: tuple, kwargs: dict, context: tuple) -> Any:
        if self.signature is None:
            self.signature = _Signature(original)
        sig = self.signature
        x = sig.get(args, kwargs, "hidden_states", args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            return original(*args, **kwargs)
        name, ctx = context
        step, total, sigma = self.clock.locate(ctx, sig.get(args, kwargs, "timestep"))
        if step is None or total is None or sigma is None or not math.isfinite(sigma):
            self.note("a call whose step could not be placed (no cache_context step index and no pipeline "
                      "scheduler knows its timestep) ran uncached")
            return original(*args, **kwargs)
        run = self._run_for(step, total)
        b = run.branch_id(name or "batch")
        group = run.group
        if group is None or group.step != step or b in group.done:
            self._flush(run)
            group = run.group = self._start_group(run, step, sigma, x, b)
        elif group.learning and b not in group.present:
            group.present.append(b)
        start = time.perf_counter()
        out = self._serve(run, group, b, x, original, args, kwargs)
        seconds = time.perf_counter() - start
        kind = group.decision.decision
        if kind == COMPUTE or (kind == "cfg" and b == 0) or kind == "block" or b not in group.present:
            group.done[b] = ("compute", "full", seconds)  # block: settled when the step ends
        else:
            group.done[b] = ("reuse", kind, seconds)
        if not group.learning and all(p in group.done for p in group.present) and self._flush(run):
            self.end_run()  # the last step is in: free the caches now, the report is ready
        return out

    def _start_group(self, run: _DitRun, step: int, sigma: float, x: torch.Tensor, b: int) -> _Group:
        present = list(run.learned) if run.learned is not None else [b]
        if b not in present:
            present.append(b)
        trajectory = run.engine.trajectory(None, x.device)
        trajectory.check_input(x)
        decision = trajectory.decide(x, sigma, lambda _sigma: step, present)
        return _Group(step, sigma, x, decision, present, learning=run.learned is None)

    def _serve(self, run: _DitRun, group: _Group, b: int, x: torch.Tensor, original: Callable,
               args: tuple, kwargs: dict) -> Any:
        trajectory = run.engine.trajectory(None, x.device)
        kind = group.decision.decision
        sigma = group.sigma
        if b not in group.present:  # a branch this run's steps did not have: runs as it is, unrecorded
            run.engine.note(f"an unexpected call ({run.branch_name(b)}) within a reused step ran uncached")
            return self._run_model(run, None, b, x, original, args, kwargs)
        if kind == "step":
            return _with_tensor(run.template, trajectory.predict(b, sigma).to(x.dtype).clone())
        if kind == "cfg" and b != 0:
            if 0 in group.outputs:
                rebuilt = trajectory.rebuild_branch(group.outputs[0], b, sigma)
                group.outputs[b] = rebuilt
                return _with_tensor(run.template, rebuilt.to(x.dtype).clone())
            group.decision.decision = COMPUTE  # the uncond call came first: nothing to rebuild it from
            kind = COMPUTE
        if kind in (COMPUTE, "block") and group.evaluation is None:
            group.evaluation = Evaluation(trajectory, group.decision)
        out = self._run_model(run, group.evaluation if kind in (COMPUTE, "block") else None, b, x, original, args,
                              kwargs)
        tensor = _first_tensor(out)
        if tensor is None:
            raise LightCacheDiffusersError(
                f"LightCache: {self.model_name} returned {type(out).__name__}, not one tensor per call; the cache "
                f"cannot predict it. Fix: remove LightCache from this model (mode 'off').")
        group.outputs[b] = tensor.detach()
        return out

    def _run_model(self, run: _DitRun, evaluation: Evaluation | None, b: int, x: torch.Tensor, original: Callable,
                   args: tuple, kwargs: dict) -> Any:
        call = _DitCall(self, evaluation, (b, str(x.device)), (b,)) if evaluation is not None else None
        token = _DIT_CALL.set(call)
        try:
            out = original(*args, **kwargs)
        finally:
            _DIT_CALL.reset(token)
        run.report.model_rows_run += int(x.shape[0])
        if run.template is None and _first_tensor(out) is not None:
            run.template = _output_kind(out)
        return out

    def _flush(self, run: _DitRun) -> bool:
        """The step's calls are all in: settle block reuse, record, report (what ComfyUI's evaluate does).
        True when that was the run's last step."""
        group, run.group = run.group, None
        if group is None:
            return False
        trajectory = run.engine.trajectory(None, group.x.device)
        decision = group.decision
        present = [b for b in group.present if b in group.done]
        if decision.decision == "block" and group.evaluation is not None:
            decision.decision = run.engine.blocks.settle(group.evaluation)
        sigma = group.sigma
        outputs = {b: group.outputs[b] for b in present if b in group.outputs}
        if decision.decision == COMPUTE:
            last = group.step >= run.total_steps - 1
            if sigma >= MIN_SIGMA and len(outputs) == len(present) and present:
                trajectory.record_compute(group.x, outputs, sigma, last)
        elif decision.decision in ("cfg", "block") and sigma >= MIN_SIGMA and len(outputs) == len(present):
            trajectory.rebase(outputs, sigma)
        trajectory.settle(decision)
        for b in present:
            what, granularity, seconds = group.done[b]
            if decision.decision == "block" and what == "compute":
                what, granularity = "reuse", "block"
            run.report.add(group.step, sigma, run.branch_name(b), what, granularity, seconds)
        if run.learned is None:
            run.learned = sorted(present)
        return group.step >= run.total_steps - 1

    # ------------------------------------------------------------------ the block loop
    def block(self, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        call = _DIT_CALL.get()
        if call is None or call.session is not self or self.block_range is None or \
                call.evaluation.kind not in (COMPUTE, "block"):
            return original(*args, **kwargs)
        h = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(h, torch.Tensor):
            return original(*args, **kwargs)
        evaluation, group = call.evaluation, call.group_key
        blocks = evaluation.trajectory.engine.blocks
        start, end = self.block_range
        in_range = start <= index < end
        scratch = evaluation.scratch_for(group)
        if index == 0 and not in_range:
            blocks.model_input(evaluation, group, h)
        if in_range and index == start:
            blocks.first_blocks_done(evaluation, group, {"img": h})
        if in_range and scratch.get("reuse"):
            if index < end - 1:
                return h
            return blocks.add_residual(evaluation, call.row_keys, {"img": h})["img"]
        out = original(*args, **kwargs)
        if not isinstance(out, torch.Tensor):
            evaluation.trajectory.engine.turn_block_off(
                f"block reuse off: {self.model_name}'s blocks return {type(out).__name__}, not one hidden state")
            return out
        if in_range and index == end - 1:
            blocks.range_done(evaluation, group, call.row_keys, {"img": out})
        if index == self.n_blocks - 1:
            blocks.model_output(evaluation, group, out)
        return out


# ----------------------------------------------------------------------------- UNets: DeepCache


class _UNetRun:
    """One pipeline run on one UNet: the schedule, the store, the report."""

    def __init__(self, session: _DeepCacheSession, total_steps: int, device: torch.device) -> None:
        settings = session.settings
        self.total_steps = total_steps
        self.full_steps = settings.full_steps(total_steps)
        self._full = set(self.full_steps)
        self.cache_steps = [s for s in range(total_steps) if s not in self._full]
        self.store = CacheStore(device, StoreConfig(placement=PLACEMENT[settings.cache_device]))
        self.meta: dict[Hashable, tuple] = {}
        self.report = RunReport(node=f"diffusers:{session.model_name}", mode="deepcache", total_steps=total_steps,
                                schedule=list(self.full_steps))
        self.report.model_rows_run = 0
        self.current_step = -1
        self.ordinal = -1
        self.calls_per_step: int | None = None
        self.held_bytes_max = 0
        self.skipped_blocks = 0

    def is_cache_step(self, step: int) -> bool:
        return 0 <= step < self.total_steps and step not in self._full

    def cache_step_after(self, step: int) -> bool:
        return any(s > step for s in self.cache_steps)


class _UNetCall:
    __slots__ = ("session", "mode", "key", "skipped")

    def __init__(self, session, mode: str, key: Hashable) -> None:
        self.session, self.mode, self.key, self.skipped = session, mode, key, 0


_UNET_CALL: contextvars.ContextVar[_UNetCall | None] = contextvars.ContextVar("lightcache_diffusers_unet_call",
                                                                             default=None)


class _DeepCacheSession:
    """DeepCache on one diffusers UNet (``down_blocks`` / ``mid_block`` / ``up_blocks``)."""

    def __init__(self, model: torch.nn.Module, settings: DeepCacheSettings, clock: _StepClock) -> None:
        self.model = model
        self.model_name = type(model).__name__
        self.settings = settings
        self.clock = clock
        self.plan: BranchPlan = plan_for_blocks(len(model.down_blocks), settings.branch, what=self.model_name)
        self.res_counts: dict[int, int] = {}  # skipped down block -> how many skip tensors it returns
        self.signature: _Signature | None = None
        self.run: _UNetRun | None = None
        self.reports: list[RunReport] = []
        self.notes: list[str] = []

    def describe(self) -> str:
        return self.plan.describe("down_blocks", "up_blocks", "mid_block")

    # ------------------------------------------------------------------ runs
    def _run_for(self, step: int, total: int, device: torch.device) -> _UNetRun:
        run = self.run
        if run is not None and (step < run.current_step or total != run.total_steps):
            self.end_run()
            run = None
        if run is None:
            run = self.run = _UNetRun(self, total, device)
        return run

    def end_run(self, error: BaseException | None = None) -> RunReport | None:
        run, self.run = self.run, None
        if run is None:
            return None
        report = run.report
        stats = run.store.stats.as_dict()
        run.store.clear(release_buffers=True)
        run.meta.clear()
        stats.update({"held_bytes_max": run.held_bytes_max, "skipped_block_calls": run.skipped_blocks,
                      "branch": self.plan.branch, "entry_up_block": self.plan.entry_output})
        report.cache_stats = stats
        report.notes.append(f"settings: {self.settings.describe()}")
        report.notes.append(self.describe())
        report.notes.append(f"cache steps: {run.cache_steps}")
        if run.held_bytes_max:
            report.notes.append(f"cached one tensor per UNet call of a step; held at most {format_bytes(run.held_bytes_max)}")
        report.notes.extend(self.notes)
        if error is not None:
            report.notes.append(f"run ended with {type(error).__name__}: {error}")
        self.reports.append(report)
        del self.reports[:-MAX_REPORTS]
        return report

    # ------------------------------------------------------------------ one UNet call
    def call(self, original: Callable, args: tuple, kwargs: dict, context: tuple) -> Any:
        if self.signature is None:
            self.signature = _Signature(original)
        sig = self.signature
        sample = sig.get(args, kwargs, "sample", args[0] if args else None)
        if not isinstance(sample, torch.Tensor):
            return original(*args, **kwargs)
        name, ctx = context
        step, total, sigma = self.clock.locate(ctx, sig.get(args, kwargs, "timestep"))
        if step is None or total is None:
            note = "a call whose step could not be placed ran uncached (no pipeline scheduler knows its timestep)"
            if note not in self.notes:
                self.notes.append(note)
            return original(*args, **kwargs)
        run = self._run_for(step, total, sample.device)
        if step != run.current_step:
            if run.current_step >= 0 and run.calls_per_step is None:
                run.calls_per_step = run.ordinal + 1
            run.current_step, run.ordinal = step, 0
        else:
            run.ordinal += 1
        key = ("deepcache", name if name is not None else run.ordinal)
        meta = (tuple(sample.shape), sample.dtype)
        store = run.store
        cache = run.is_cache_step(step) and run.meta.get(key) == meta and key in store
        capture = not cache and run.cache_step_after(step) and self.settings.interval > 1
        mode = "cache" if cache else "capture" if capture else "full"
        if cache:
            store.prefetch([key])
        call = _UNetCall(self, mode, key)
        token = _UNET_CALL.set(call)
        start = time.perf_counter()
        try:
            out = original(*args, **kwargs)
        finally:
            _UNET_CALL.reset(token)
            if cache:
                if run.is_cache_step(step + 1):
                    store.prefetch([key])  # a step ahead, as the ComfyUI path does
                else:
                    store.release(key)
        if capture:
            run.meta[key] = meta
        seconds = time.perf_counter() - start
        run.skipped_blocks += call.skipped
        run.report.model_rows_run += int(sample.shape[0])
        label = name or ("batch" if run.ordinal == 0 else f"call{run.ordinal}")
        run.report.add(step, float(sigma) if sigma is not None else 0.0, label, "reuse" if cache else "compute", "deepcache" if cache else "full",
                       seconds)
        if step >= total - 1 and run.calls_per_step is not None and run.ordinal + 1 >= run.calls_per_step:
            self.end_run()
        return out

    def _placeholder(self, args: tuple, kwargs: dict) -> torch.Tensor:
        h = kwargs.get("hidden_states", args[0] if args else None)
        return h.new_empty((h.shape[0], 0, 1, 1))

    def skip(self, kind: str, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        call = _UNET_CALL.get()
        if call is None or call.session is not self or call.mode != "cache":
            out = original(*args, **kwargs)
            if kind == "down" and isinstance(out, tuple) and len(out) >= 2:
                self.res_counts[index] = len(out[1])
            return out
        call.skipped += 1
        placeholder = self._placeholder(args, kwargs)
        if kind == "down":
            return placeholder, (placeholder,) * self.res_counts[index]
        return placeholder

    def entry(self, original: Callable, args: tuple, kwargs: dict) -> Any:
        call = _UNET_CALL.get()
        if call is None or call.session is not self or call.mode == "full":
            return original(*args, **kwargs)
        run = self.run
        h = kwargs.get("hidden_states", args[0] if args else None)
        if call.mode == "cache":
            cached = run.store.get(call.key)
            if cached is None:
                raise RuntimeError("LightCache deepcache: the cached up-block input vanished mid-step")
            if "hidden_states" in kwargs or not args:
                kwargs = {**kwargs, "hidden_states": cached}
            else:
                args = (cached,) + tuple(args[1:])
        elif isinstance(h, torch.Tensor):
            run.store.put(call.key, h.detach())
            run.report.note_stored("deepcache", run.store.nbytes(call.key))
            run.held_bytes_max = max(run.held_bytes_max, sum(run.store.nbytes(k) for k in run.store.keys()))
        out = original(*args, **kwargs)
        if call.mode == "cache":
            run.report.note_read("deepcache", run.store.nbytes(call.key))
        return out


# ----------------------------------------------------------------------------- install / remove


def _is_unet(model: torch.nn.Module) -> bool:
    downs, ups = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    return isinstance(downs, torch.nn.ModuleList) and isinstance(ups, torch.nn.ModuleList) and \
        len(downs) == len(ups) and len(downs) >= 2 and hasattr(model, "mid_block")


def _block_list(model: torch.nn.Module) -> str | None:
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return name
    return None


class _Installed:
    """The hooks one session registered: where, under which name, and what the module had before."""

    def __init__(self) -> None:
        self.entries: list[tuple[torch.nn.Module, str, bool, bool]] = []  # module, name, had registry, had forward

    def register(self, module: torch.nn.Module, hook, name: str) -> None:
        HookRegistry, _, _ = _diffusers_hooks()
        had_registry = hasattr(module, "_diffusers_hook")
        had_forward = "forward" in module.__dict__
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.entries.append((module, name, had_registry, had_forward))

    def refresh(self) -> None:
        """Registries cache their children's registries; hooks added below a registry stale that list."""
        for module in {id(m): m for m, *_ in self.entries}.values():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
                registry.invalidate_child_registries_cache()

    def remove(self) -> None:
        for module, name, had_registry, had_forward in reversed(self.entries):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            registry.remove_hook(name, recurse=False)
            if not registry.hooks:
                forward = module.__dict__.get("forward")
                if not had_forward and getattr(forward, "__self__", None) is module and \
                        getattr(forward, "__func__", None) is getattr(type(module), "forward", None):
                    del module.forward  # the class's forward again, as before we came
                if not had_registry:
                    del module._diffusers_hook
        self.refresh()
        self.entries.clear()


def _state_manager():
    _, _, StateManager = _diffusers_hooks()
    return StateManager(_NoState, (), {})


def _check_free(model: torch.nn.Module) -> None:
    if getattr(model, "_cache_config", None) is not None:
        raise LightCacheDiffusersError(
            f"{type(model).__name__} already has a diffusers cache enabled ({type(model._cache_config).__name__}); "
            f"two caches on one model would each reuse the other's outputs. Fix: model.disable_cache() first.")
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and any(n.startswith(HOOK_PREFIX) for n in registry.hooks):
            raise LightCacheDiffusersError(f"LightCache is already applied to {type(model).__name__}. "
                                           f"Fix: remove the first handle (handle.remove()) before applying again.")


def _install_dit(model, config: DitCacheConfig, clock: _StepClock, cfg_scale, installed: _Installed) -> _DitSession:
    types = _hook_types()
    block_list = _block_list(model)
    if config.mode == "block" and (block_list is None or config.block_range(len(getattr(model, block_list))) is None):
        raise LightCacheDiffusersError(f"mode 'block' needs a transformer with a 'blocks' list of at least one block; "
                                       f"{type(model).__name__} has none. Fix: mode 'step' or 'cfg' (or 'mix').")
    session = _DitSession(model, config, clock, cfg_scale, block_list)
    installed.register(model, types["LightCacheDenoiserHook"](session, _state_manager()), DENOISER_HOOK)
    if session.block_range is not None:
        for i, block in enumerate(getattr(model, block_list)):
            installed.register(block, types["LightCacheBlockHook"](session, i), BLOCK_HOOK)
    return session


def _install_deepcache(model, settings: DeepCacheSettings, clock: _StepClock, installed: _Installed) -> _DeepCacheSession:
    types = _hook_types()
    session = _DeepCacheSession(model, settings, clock)
    plan = session.plan
    installed.register(model, types["DeepCacheStepHook"](session, _state_manager()), DEEPCACHE_STEP_HOOK)
    if settings.interval > 1:
        for i in plan.skip_input:
            installed.register(model.down_blocks[i], types["DeepCacheSkipHook"](session, "down", i), DEEPCACHE_SKIP_HOOK)
        if model.mid_block is not None:
            installed.register(model.mid_block, types["DeepCacheSkipHook"](session, "mid", 0), DEEPCACHE_SKIP_HOOK)
        for j in plan.skip_output:
            installed.register(model.up_blocks[j], types["DeepCacheSkipHook"](session, "up", j), DEEPCACHE_SKIP_HOOK)
        installed.register(model.up_blocks[plan.entry_output], types["DeepCacheEntryHook"](session), DEEPCACHE_ENTRY_HOOK)
    return session


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


# ----------------------------------------------------------------------------- sliced Wan decode


def _is_wan_vae(vae: Any) -> bool:
    return hasattr(vae, "_feat_map") or (hasattr(vae, "clear_cache") and hasattr(vae, "decoder") and
                                         hasattr(vae, "post_quant_conv") and type(vae).__name__.startswith("AutoencoderKLWan"))


def sliced_wan_decode(vae: torch.nn.Module, z: torch.Tensor, frames_per_slice: int = 1,
                      output_device: torch.device | str | None = None) -> torch.Tensor:
    """``AutoencoderKLWan.decode(z).sample``, decoded a few latent frames at a time into a preallocated output.

    The decoder runs one latent frame per call, as ``AutoencoderKLWan._decode`` does,
    with the VAE's causal cache (``_feat_map``) carried from call to call, so the
    frames are the ones ``decode`` makes; each slice of ``frames_per_slice`` latent
    frames is clamped and copied at once into the output (on ``output_device``; the
    latent's device by default; a CPU output is pinned when CUDA is present), instead
    of growing one video on the device by ``torch.cat`` per frame and clamping a
    second copy of it.
    """
    if z.dim() != 5:
        raise ValueError(f"sliced_wan_decode expects a [batch, channels, frames, height, width] latent, got {tuple(z.shape)}")
    frames_per_slice = max(1, int(frames_per_slice))
    device = torch.device(output_device) if output_device is not None else z.device
    patch = getattr(getattr(vae, "config", None), "patch_size", None)
    unpatchify = None
    if patch is not None:
        unpatchify = _wan_unpatchify()
    vae.clear_cache()
    out = None
    written = 0
    try:
        num_frames = z.shape[2]
        for start in range(0, num_frames, frames_per_slice):
            stop = min(num_frames, start + frames_per_slice)
            x = vae.post_quant_conv(z[:, :, start:stop])  # a 1x1x1 causal conv: per frame
            pieces = []
            for i in range(stop - start):
                vae._conv_idx = [0]
                frame = x[:, :, i:i + 1]
                if start + i == 0:
                    pieces.append(vae.decoder(frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True))
                else:
                    pieces.append(vae.decoder(frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx))
            piece = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
            del pieces, x
            if unpatchify is not None:
                piece = unpatchify(piece, patch_size=patch)
            piece = torch.clamp(piece, min=-1.0, max=1.0)
            if out is None:
                total = piece.shape[2] + _temporal_ratio(vae) * (num_frames - (stop - start))
                pin = device.type == "cpu" and piece.device.type == "cuda" and torch.cuda.is_available()
                out = torch.empty(piece.shape[:2] + (total,) + piece.shape[3:], dtype=piece.dtype, device=device,
                                  pin_memory=pin)
            t = piece.shape[2]
            if written + t > out.shape[2]:
                raise RuntimeError(f"sliced decode: the decoder made {written + t} frames, more than the "
                                   f"{out.shape[2]} this VAE's temporal ratio predicts")
            out[:, :, written:written + t].copy_(piece, non_blocking=out.is_pinned())
            written += t
            del piece
    finally:
        vae.clear_cache()
    if out.is_pinned():
        torch.cuda.synchronize()
    if written != out.shape[2]:
        out = out[:, :, :written]
    return out


def _temporal_ratio(vae: torch.nn.Module) -> int:
    """Video frames per latent frame after the first (4 for Wan 2.1 / 2.2 VAEs)."""
    ratio = getattr(vae, "temporal_compression_ratio", None)
    if isinstance(ratio, int) and ratio > 0:
        return ratio
    downs = getattr(getattr(vae, "config", None), "temperal_downsample", None) or [False, True, True]
    return 2 ** sum(bool(d) for d in downs)


def _wan_unpatchify():
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    return unpatchify


class _SlicedDecode:
    """``vae.decode`` replaced on one instance: the sliced decode, with ``decode``'s signature and outputs."""

    def __init__(self, vae: torch.nn.Module, frames_per_slice: int, output_device) -> None:
        self._vae = weakref.ref(vae)
        self.frames_per_slice = frames_per_slice
        self.output_device = output_device
        self.lightcache_sliced_decode = True

    def __call__(self, z: torch.Tensor, return_dict: bool = True):
        vae = self._vae()
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)  # what diffusers' apply_forward_hook does (accelerate offloading)
        ratio = getattr(vae, "spatial_compression_ratio", 8)
        tile = (getattr(vae, "tile_sample_min_height", 256) // ratio, getattr(vae, "tile_sample_min_width", 256) // ratio)
        if getattr(vae, "use_tiling", False) and (z.shape[-1] > tile[1] or z.shape[-2] > tile[0]):
            return type(vae).decode(vae, z, return_dict=return_dict)  # tiled decoding stays diffusers'
        video = sliced_wan_decode(vae, z, self.frames_per_slice, self.output_device)
        if not return_dict:
            return (video,)
        from diffusers.models.autoencoders.vae import DecoderOutput
        return DecoderOutput(sample=video)


def enable_sliced_decode(vae: torch.nn.Module, frames_per_slice: int = 1, output_device=None) -> None:
    """Make ``vae.decode`` (an ``AutoencoderKLWan``) the sliced decode; ``disable_sliced_decode`` undoes it."""
    if not _is_wan_vae(vae):
        raise LightCacheDiffusersError(f"sliced decode is for AutoencoderKLWan, not {type(vae).__name__}.")
    vae.decode = _SlicedDecode(vae, frames_per_slice, output_device)


def disable_sliced_decode(vae: torch.nn.Module) -> None:
    if getattr(vae.__dict__.get("decode"), "lightcache_sliced_decode", False):
        del vae.decode


__all__ = ["DitCacheConfig", "LightCacheDiffusersError", "LightCacheHandle", "apply_lightcache",
           "disable_sliced_decode", "enable_sliced_decode", "remove_lightcache", "sliced_wan_decode"]
