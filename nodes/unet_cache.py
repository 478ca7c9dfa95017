"""DeepCache-style branch caching for ComfyUI's UNets (SD1.5/SDXL ``UNetModel``, SVD).

What runs where (branch ``b``, ``N = len(input_blocks) == len(output_blocks)``):

* full step: the whole UNet runs. The ``h`` that enters ``output_blocks[k]``
  (``k = N - 1 - b``, taken *before* the concat with its skip) is stored, once
  per cond uuid (one tensor per CFG branch), in the core ``CacheStore``.
* cache step: ``time_embed``, ``input_blocks[0..b]``, ``output_blocks[k..N-1]``
  and the head run; ``input_blocks[b+1..N-1]``, ``middle_block`` and
  ``output_blocks[0..k-1]`` are skipped. Their layers return one zero-element
  placeholder (``[B, 0, 1, 1]``, no storage), so the UNet's own loop (``hs``
  push/pop and ``torch.cat``) handles only empty tensors there; at block ``k``
  the cached ``h`` is put back in front of the fresh skip tensor.

Hooks (all public, all held by the cloned ModelPatcher, nothing copied from core):

* object patches of the ``forward`` of every direct layer of the skipped
  blocks: a dispatcher that runs the original unless the current call is a
  cache step of this patch (found through a context variable set per call);
* a keyed ``DIFFUSION_MODEL`` wrapper: decides full/cache per call from the
  step index (sigma in the run's schedule) and the cond uuids, and injects,
  for that call only, an ``output_block_patch`` (first in the list) that
  stores or restores ``h`` at block ``k``. In cache steps it also makes other
  packs' block patches and ``forward_timestep_embed_patch`` handlers (e.g.
  AnimateDiff-Evolved's motion modules) pass placeholders through, and drops
  ControlNet/T2I residuals aimed at skipped blocks (fresh residuals still feed
  the recomputed blocks);
* a keyed ``OUTER_SAMPLE`` wrapper: creates the per-run state (store,
  schedule, report) and frees it in ``finally``.

ControlNet / T2I-Adapter: the ControlNet still runs every step; in cache steps
its residuals for skipped blocks are dropped (their effect from the last full
step is inside the cached ``h``) and the recomputed blocks get this step's
fresh residuals.

AnimateDiff-Evolved (cannot be installed in CI; not run here): it injects its
motion modules into ``input_blocks``/``output_blocks`` when sampling starts and
runs them through ``forward_timestep_embed_patch``. In cache steps those
handlers see the placeholder in skipped blocks and pass it through (no motion
compute there), while motion modules in the recomputed blocks run on real
tensors. Its context windows (``ad_params["sub_idxs"]``, like core's
``context_window``) key the cache per window. The dispatch path is covered by a
test with a stand-in ``forward_timestep_embed_patch``; the real pack is not.
"""
from __future__ import annotations

import contextvars
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..lightcache_core import CacheStore, RunReport, StoreConfig, format_bytes
from ..lightcache_core.deepcache import (CACHE_DEVICES, DEFAULT_THRESHOLD, NONUNIFORM_MIN_STEPS,  # noqa: F401 (re-exported)
                                         PLACEMENT as _PLACEMENT, SCHEDULES, BranchPlan, DeepCacheError,
                                         DeepCacheSettings, plan_for_blocks)
from . import compat
from .run_lifecycle import ProgressText, StepClock, install_wrappers, make_outer_sample_wrapper, sigma_value

log = logging.getLogger("LightCache")

WRAPPER_KEY = "lightcache_deepcache"
RUN_KEY = "lightcache_deepcache_run"
# DeepCacheSettings, BranchPlan and the schedule are host-agnostic: lightcache_core.deepcache.


# ---------------------------------------------------------------- model layout

def _diffusion_model(model_patcher: Any):
    model = getattr(model_patcher, "model", None)
    return getattr(model, "diffusion_model", None)


def is_unet(model_patcher: Any) -> bool:
    """True when the model is ComfyUI's openaimodel UNet (SD1.5/SDXL/SVD) with a block layout we can cache."""
    dm = _diffusion_model(model_patcher)
    try:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        return False
    if not isinstance(dm, UNetModel):
        return False
    ins, outs = getattr(dm, "input_blocks", None), getattr(dm, "output_blocks", None)
    return ins is not None and outs is not None and len(ins) == len(outs) and len(ins) >= 2


def plan_branch(diffusion_model, branch: int) -> BranchPlan:
    return plan_for_blocks(len(diffusion_model.input_blocks), branch)


def _skipped_layer_paths(diffusion_model, plan: BranchPlan) -> list[str]:
    paths = []
    for i in plan.skip_input:
        paths += [f"input_blocks.{i}.{name}" for name, _ in diffusion_model.input_blocks[i].named_children()]
    if getattr(diffusion_model, "middle_block", None) is not None:
        paths += [f"middle_block.{name}" for name, _ in diffusion_model.middle_block.named_children()]
    for j in plan.skip_output:
        paths += [f"output_blocks.{j}.{name}" for name, _ in diffusion_model.output_blocks[j].named_children()]
    return paths


def estimate_branch_cost(diffusion_model, plan: BranchPlan, spatial: tuple[int, ...]) -> float:
    """Cost of a cache step relative to a full step, in multiply-adds.

    Convolutions and linear layers cost about ``params * positions``; spatial
    self-attention adds ``2 * tokens^2 * inner_dim``. Norms, cross-attention
    scores and temporal attention are left out. Used for the report's
    estimated speedup.
    """
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    def params(module) -> int:
        return sum(p.numel() for p in module.parameters())

    def self_attention(module, positions: float) -> float:
        """Score and value matmuls of spatial self-attention: 2 * tokens^2 * inner dim (temporal ones are tiny)."""
        cost = 0.0
        for name, sub in module.named_modules():
            if name.endswith("attn1") and "time_stack" not in name and hasattr(sub, "heads") and hasattr(sub, "dim_head"):
                cost += 2.0 * positions * positions * sub.heads * sub.dim_head
        return cost

    def layer_cost(layer, positions: float) -> float:
        return params(layer) * positions + self_attention(layer, positions)

    area = float(math.prod(spatial)) if spatial else 1.0
    total = run = 0.0
    for i, block in enumerate(diffusion_model.input_blocks):
        for layer in block:
            if isinstance(layer, Downsample):
                area /= 2 ** len(spatial)
            c = layer_cost(layer, area)
            total += c
            run += c if i not in plan.skip_input else 0.0
    if getattr(diffusion_model, "middle_block", None) is not None:
        total += layer_cost(diffusion_model.middle_block, area)
    for j, block in enumerate(diffusion_model.output_blocks):
        for layer in block:
            if isinstance(layer, Upsample):
                area *= 2 ** len(spatial)
            c = layer_cost(layer, area)
            total += c
            run += c if j not in plan.skip_output else 0.0
    head = sum(params(getattr(diffusion_model, name)) for name in ("out", "id_predictor") if getattr(diffusion_model, name, None) is not None)
    head *= area
    return (run + head) / (total + head) if total + head > 0 else 1.0


# ---------------------------------------------------------------- per-call state

@dataclass
class _Call:
    owner: object
    mode: str  # "full" | "cache"
    placeholder: torch.Tensor | None
    skipped_layers: int = 0


_ACTIVE: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("lightcache_deepcache_call", default=None)


def _is_placeholder(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[1] == 0


def _make_skip_forward(original: Callable, owner: object) -> Callable:
    def forward(*args, **kwargs):
        call = _ACTIVE.get()
        if call is not None and call.owner is owner and call.mode == "cache":
            call.skipped_layers += 1
            return call.placeholder
        return original(*args, **kwargs)

    forward.lightcache_deepcache = True
    return forward


def _pass_placeholder_block_patch(patch: Callable) -> Callable:
    def wrapped(h, transformer_options):
        if _is_placeholder(h):
            return h
        return patch(h, transformer_options)
    return wrapped


def _pass_placeholder_output_patch(patch: Callable) -> Callable:
    def wrapped(h, hsp, transformer_options):
        if _is_placeholder(h) and _is_placeholder(hsp):
            return h, hsp
        return patch(h, hsp, transformer_options)
    return wrapped


def _pass_placeholder_embed_handler(handler: Callable) -> Callable:
    def wrapped(layer, x, *args, **kwargs):
        if _is_placeholder(x):
            return x
        return handler(layer, x, *args, **kwargs)
    return wrapped


# ---------------------------------------------------------------- per-run state

class _Run:
    """One sampling run: store, schedule, report (created and freed by the shared run lifecycle)."""

    def __init__(self, owner: "_DeepCache", sigmas: Any, device: torch.device) -> None:
        self.owner = owner
        self.settings = owner.settings
        self.plan = owner.plan
        self.clock = StepClock(sigmas)
        self.total_steps = self.clock.total_steps
        self.full_steps = self.settings.full_steps(self.total_steps)
        full = self._full_set = set(self.full_steps)
        self.cache_steps = [s for s in range(self.total_steps) if s not in full]
        self.store = CacheStore(device, StoreConfig(placement=_PLACEMENT[self.settings.cache_device]))
        self.meta: dict[Any, tuple] = {}  # uuid -> (chunk shape, dtype) of the x it was cached for
        self.entry_shapes: dict[str, list[int]] = {}
        self.held_bytes_max = 0
        self.skipped_layers = 0
        self.cache_calls = 0
        self.full_calls = 0
        self.branch_cost: float | None = None
        self.report = RunReport(node="LightCache", mode="deepcache", total_steps=self.total_steps,
                                schedule=list(self.full_steps))
        self.report.model_rows_run = 0
        self.progress = ProgressText(compat.executing_node_id())
        self.notes: list[str] = []

    def install(self, model_options: dict) -> None:
        """Nothing to add: the layer patches and wrappers are on the patched model already."""

    def step_of(self, sigma: Any) -> int | None:
        return None if sigma is None else self.clock.step_of(sigma)

    def is_cache_step(self, step: int | None) -> bool:
        return step is not None and 0 <= step < self.total_steps and step not in self._full_set

    def cache_step_after(self, step: int | None) -> bool:
        return step is not None and any(s > step for s in self.cache_steps)

    @staticmethod
    def key(uuid: Any) -> tuple:
        return ("deepcache", str(uuid))

    def put(self, uuids: list, h: torch.Tensor, per: int, copy: bool) -> None:
        for i, uuid in enumerate(uuids):
            part = h[i * per:(i + 1) * per]
            self.store.put(self.key(uuid), part.clone() if copy else part)
            self.report.note_stored("deepcache", self.store.nbytes(self.key(uuid)))
            self.entry_shapes[str(uuid)] = list(part.shape)
        held = sum(self.store.nbytes(k) for k in self.store.keys())
        self.held_bytes_max = max(self.held_bytes_max, held)

    def get(self, uuids: list) -> torch.Tensor | None:
        parts = [self.store.get(self.key(u)) for u in uuids]
        if any(p is None for p in parts):
            return None
        for u in uuids:
            self.report.note_read("deepcache", self.store.nbytes(self.key(u)))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def finish(self, error: BaseException | None) -> RunReport:
        stats = self.store.stats.as_dict()
        self.store.clear(release_buffers=True)
        self.meta.clear()
        stats["entries_after_cleanup"] = len(self.store)
        report = self.report
        stats.update({"held_bytes_max": self.held_bytes_max, "entry_shapes": dict(self.entry_shapes),
                      "skipped_layer_calls": self.skipped_layers, "cache_calls": self.cache_calls,
                      "full_calls": self.full_calls, "branch": self.plan.branch,
                      "entry_output_block": self.plan.entry_output})
        full_s = [r.seconds for r in report.records if r.decision == "compute"]
        cache_s = [r.seconds for r in report.records if r.decision != "compute"]
        if full_s and cache_s and sum(full_s) > 0:
            measured = (sum(cache_s) / len(cache_s)) / (sum(full_s) / len(full_s))
            stats["measured_cache_cost"] = measured  # wall time of a cache call / a full call, this run
            stats["predicted_speedup_measured_cost"] = len(report.records) / (len(full_s) + measured * len(cache_s))
        report.cache_stats = stats
        if self.branch_cost is not None:
            report.cost_by_granularity = {**report.cost_by_granularity, "deepcache": self.branch_cost}
        report.notes.append(f"settings: {self.settings.describe()}")
        report.notes.append(self.plan.describe())
        if self.settings.schedule == "nonuniform" and self.total_steps < NONUNIFORM_MIN_STEPS:
            report.notes.append(f"{self.total_steps} steps < {NONUNIFORM_MIN_STEPS}: uniform schedule used")
        report.notes.append(f"cache steps: {self.cache_steps}")
        if self.entry_shapes:
            per = ", ".join(f"{shape}" for shape in self.entry_shapes.values())
            report.notes.append(f"cached one tensor per CFG branch: {per}; held at most {format_bytes(self.held_bytes_max)}")
        if self.branch_cost is not None:
            report.notes.append(f"cache-step cost ~{self.branch_cost:.3f} of a full step (multiply-add estimate)")
        report.notes.extend(self.notes)
        if error is not None:
            report.notes.append(f"run ended with {type(error).__name__}: {error}")
        return report


# ---------------------------------------------------------------- the patch

class _DeepCache:
    """Immutable per-patch object the wrappers close over (config only; run state lives in ``_Run``)."""

    def __init__(self, settings: DeepCacheSettings, plan: BranchPlan) -> None:
        self.settings = settings
        self.plan = plan
        self.outer_sample = make_outer_sample_wrapper(RUN_KEY, self.start_run)

    def __deepcopy__(self, memo):  # immutable; 0.3.x clone() deep-copies model_options
        return self

    def start_run(self, guider, sigmas) -> "_Run":
        patcher = guider.model_patcher
        device = getattr(patcher, "load_device", None) or compat.compute_device()
        return _Run(self, sigmas, torch.device(device))

    # DIFFUSION_MODEL ------------------------------------------------------
    def diffusion_model(self, executor, *args, **kwargs):
        opts = compat.transformer_options_of(args, kwargs)
        run = opts.get(RUN_KEY) if isinstance(opts, dict) else None
        x = args[0] if args else kwargs.get("x")
        if not isinstance(run, _Run) or run.owner is not self or not isinstance(x, torch.Tensor):
            return executor(*args, **kwargs)
        uuids = list(opts.get("uuids") or [])
        labels = ["uncond" if c == 1 else "cond" for c in (opts.get("cond_or_uncond") or [])]
        sigma = opts.get("sigmas")
        sigma_now = sigma_value(sigma) if sigma is not None else 0.0
        step = run.step_of(sigma_now)
        if not uuids or x.shape[0] % len(uuids) != 0:
            run.notes.append(f"step {step}: call without per-branch uuids; computed without caching")
            return executor(*args, **kwargs)
        window = compat.context_window_id(opts)
        if window is not None:  # context windows (core or AnimateDiff-Evolved): one cache per branch and window
            uuids = [(u, window) for u in uuids]
        per = x.shape[0] // len(uuids)
        chunk_meta = (tuple(x.shape[1:]), per, x.dtype)
        if run.branch_cost is None:
            try:
                run.branch_cost = estimate_branch_cost(self._dm(executor), self.plan, tuple(x.shape[2:]))
            except Exception:  # estimate only
                run.branch_cost = None
        cache = run.is_cache_step(step) and all(run.meta.get(u) == chunk_meta and run.key(u) in run.store for u in uuids)
        store = not cache and run.cache_step_after(step)
        if not cache and not store:
            return self._timed(run, step, sigma_now, labels, "full", executor, args, kwargs, x)

        k = self.plan.entry_output
        patches = dict(opts.get("patches") or {})
        others = list(patches.get("output_block_patch") or [])
        copy = bool(others)  # another pack's output patch may edit h in place

        keys = [run.key(u) for u in uuids]
        if cache:
            run.store.prefetch(keys)  # normally already in flight since the previous step (see below)

            def restore(h, hsp, transformer_options):
                if transformer_options.get("block") == ("output", k):
                    cached = run.get(uuids)
                    if cached is None:
                        raise RuntimeError("LightCache deepcache: cached branch tensor vanished mid-step")
                    h = cached.clone() if copy else cached
                return h, hsp

            patches["output_block_patch"] = [restore] + [_pass_placeholder_output_patch(p) for p in others]
            for name in ("input_block_patch", "input_block_patch_after_skip"):
                if patches.get(name):
                    patches[name] = [_pass_placeholder_block_patch(p) for p in patches[name]]
            if patches.get("forward_timestep_embed_patch"):
                patches["forward_timestep_embed_patch"] = [(cls, _pass_placeholder_embed_handler(h))
                                                           for cls, h in patches["forward_timestep_embed_patch"]]
        else:
            def capture(h, hsp, transformer_options):
                if transformer_options.get("block") == ("output", k) and not _is_placeholder(h):
                    run.put(uuids, h, per, copy)
                    for u in uuids:
                        run.meta[u] = chunk_meta
                return h, hsp

            patches["output_block_patch"] = [capture] + others

        new_opts = dict(opts)
        new_opts["patches"] = patches
        args, kwargs = self._replace_options(args, kwargs, opts, new_opts)
        if cache:
            args, kwargs = self._drop_skipped_control(args, kwargs)
            placeholder = x.new_empty((x.shape[0], 0) + (1,) * (x.ndim - 2))
            call = _Call(self, "cache", placeholder)
        else:
            call = _Call(self, "full", None)
        token = _ACTIVE.set(call)
        try:
            result = self._timed(run, step, sigma_now, labels, "deepcache" if cache else "full", executor, args, kwargs, x)
        finally:
            _ACTIVE.reset(token)
            next_is_cache = step is not None and run.is_cache_step(step + 1)
            if next_is_cache:
                # A step ahead: the host->device copy for the next step's read overlaps the rest of this
                # step and the sampler's work in between (a copy kept from this step is reused as is).
                run.store.prefetch(keys)
            elif cache:
                for key in keys:
                    run.store.release(key)
        run.skipped_layers += call.skipped_layers
        return result

    @staticmethod
    def _dm(executor):
        return getattr(executor, "class_obj", None)

    @staticmethod
    def _timed(run: _Run, step, sigma: float, labels: list[str], kind: str, executor, args, kwargs, x):
        start = time.perf_counter()
        result = executor(*args, **kwargs)
        seconds = time.perf_counter() - start
        run.report.model_rows_run += int(x.shape[0])
        if kind == "deepcache":
            run.cache_calls += 1
        else:
            run.full_calls += 1
        n = max(len(labels), 1)
        for label in labels or ["batch"]:
            run.report.add(step if step is not None else -1, sigma, label, "reuse" if kind == "deepcache" else "compute",
                           kind, seconds / n)
        run.progress.update(f"LightCache deepcache: step {(step if step is not None else -1) + 1}/{run.total_steps} "
                            f"[{kind}] computed {run.full_calls}, cache steps {run.cache_calls}",
                            force=step is not None and step >= run.total_steps - 1)
        return result

    @staticmethod
    def _replace_options(args: tuple, kwargs: dict, old: dict, new: dict) -> tuple[tuple, dict]:
        if kwargs.get("transformer_options") is old:
            kwargs = dict(kwargs)
            kwargs["transformer_options"] = new
            return args, kwargs
        args = list(args)
        for i in range(len(args) - 1, -1, -1):
            if args[i] is old:
                args[i] = new
                return tuple(args), kwargs
        kwargs = dict(kwargs)
        kwargs["transformer_options"] = new
        return tuple(args), kwargs

    def _drop_skipped_control(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """ControlNet/T2I residuals for skipped blocks are dropped (their effect is in the cached h);
        the recomputed blocks still get this step's fresh residuals."""
        index = 4  # UNetModel.forward(x, timesteps, context, y, control, transformer_options, **kwargs)
        if "control" in kwargs:
            control, where = kwargs["control"], "kw"
        elif len(args) > index:
            control, where = args[index], "pos"
        else:
            return args, kwargs
        if not isinstance(control, dict):
            return args, kwargs
        plan = self.plan
        new = dict(control)
        for name, skipped in (("input", plan.skip_input), ("output", plan.skip_output)):
            items = control.get(name)
            if not isinstance(items, list):
                continue
            items = list(items)
            for block in skipped:  # block i takes the (i+1)-th pop, i.e. index len-1-i
                idx = len(items) - 1 - block
                if 0 <= idx < len(items):
                    items[idx] = None
            new[name] = items
        if isinstance(control.get("middle"), list):
            new["middle"] = [None] * len(control["middle"])
        if where == "kw":
            kwargs = dict(kwargs)
            kwargs["control"] = new
        else:
            args = list(args)
            args[index] = new
            args = tuple(args)
        return args, kwargs


def apply_deepcache(model_patcher, settings: DeepCacheSettings | None = None, *,
                    threshold: float | None = None, **overrides):
    """A clone of ``model_patcher`` with deepcache installed (keyed wrappers + per-layer object patches).

    ``settings`` defaults to ``DeepCacheSettings()``; alternatively ``threshold``
    (the Sampler's quality/speed knob, see ``DeepCacheSettings.from_threshold``)
    plus field overrides such as ``start_percent``/``end_percent``/``cache_device``.
    After each run the ``RunReport`` goes to the node that started sampling inside
    ``run_lifecycle.report_channel()`` (and to the log).
    """
    if not is_unet(model_patcher):
        raise DeepCacheError("LightCache deepcache works on UNet models (SD1.5/SDXL UNetModel, SVD, AnimateDiff on "
                             "SD1.5); this model has no openaimodel UNet. Fix: use cache_mode 'mix'/'step' for DiTs.")
    known = set(DeepCacheSettings.__dataclass_fields__)
    fields = {k: v for k, v in overrides.items() if k in known and v is not None}
    if settings is None:
        settings = DeepCacheSettings.from_threshold(threshold, **fields) if threshold is not None else DeepCacheSettings(**fields)
    elif fields:
        from dataclasses import replace
        settings = replace(settings, **fields)
    dm = _diffusion_model(model_patcher)
    plan = plan_branch(dm, settings.branch)
    owner = _DeepCache(settings, plan)

    m = model_patcher.clone()
    install_wrappers(m, WRAPPER_KEY, {compat.WrappersMP.OUTER_SAMPLE: owner.outer_sample,
                                      compat.WrappersMP.DIFFUSION_MODEL: owner.diffusion_model})
    if settings.interval > 1:  # interval 1 never has a cache step: wrappers only, no layer patches
        for path in _skipped_layer_paths(dm, plan):
            name = f"diffusion_model.{path}.forward"
            m.add_object_patch(name, _make_skip_forward(m.get_model_object(name), owner))
    return m
