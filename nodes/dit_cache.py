"""DiT caching machinery behind LightCache Sampler / LightCache Model Patch.

Modelled on ComfyUI's own ``comfy_extras/nodes_easycache.py``:

* The node stores an immutable :class:`CacheConfig` on a ``model.clone()``
  (``transformer_options["lightcache"]``) and adds keyed wrappers (key
  ``"lightcache"``): OUTER_SAMPLE, CALC_COND_BATCH and DIFFUSION_MODEL.
* OUTER_SAMPLE builds a fresh :class:`RunState` per sampling run on a clone of
  the guider's ``model_options`` (with the ``patches_replace["dit"]`` block
  patches, chained to any existing replacement) and tears everything down in
  ``finally``: the store is cleared (pinned buffers freed), the original
  ``model_options`` restored.  Interrupts (BaseException in newer hosts) take
  the same path.  Nothing per-run ever lives on the model or the config, so two
  runs or two clones never share state.
* CALC_COND_BATCH is called once per model evaluation with every CFG branch
  (``conds = [cond, uncond]``; uncond is None at cfg 1). It finds the step from
  the sigma (``sample_sigmas``), measures the cheap change signal, DECIDES the
  granularity for this evaluation (compute / step / cfg / block) and serves
  ``cfg`` itself: it runs the executor with only the cond branch and rebuilds
  the other branches from the cached (branch - cond) delta.
* DIFFUSION_MODEL serves ``step``: per cond uuid (batched or split CFG; slice
  ``x.shape[0] // len(uuids)``) it returns ``x + cached residual`` without
  running the trunk, and stores ``output - x`` after computed evaluations.
* ``patches_replace["dit"]`` block patches serve ``block``: the first n and
  last m blocks run, the middle range is skipped and its cached residual
  (per uuid) added back.

Granularity codes in the report: C compute, S step, G cfg, B block.

Mix policy (``mode="mix"``), written down here because MixCache's exact rules
are not public (algorithms.md section 4):

1. Context-aware trigger: nothing is reused during warm-up
   (``warmup_steps``), outside ``[start_percent, end_percent)``, in the last
   ``final_compute_steps`` steps, or after ``max_consecutive_reuse`` reuses in
   a row; otherwise the per-evaluation change signal decides.
2. Change signal (EasyCache-style, measured on a subsampled latent, cheap):
   ``r = k * mean|x_t - x_prev| / mean|eps_prev|`` where ``eps`` is the cond
   branch's output in noise units ((x - denoised) / sigma) and ``k`` the
   output/input change ratio measured between the last two computes.
   ``A`` accumulates ``r`` since the last full compute (every cache is
   refreshed at a compute, so all caches have age ``A``).
3. Adaptive choice: ``lightcache_core.policy.choose_granularity`` picks the
   most aggressive granularity whose estimated error ``w_g * (A + r)`` fits
   the budget (``threshold``): step (w=1) > cfg > block > compute.  So after a
   compute, a run usually goes S S ... then G ... then B ... then C: cheap
   whole-step reuse while the trajectory is smooth, and progressively finer
   reuse (that keeps more of the evaluation fresh) as the caches age.
   Measured on the trained tiny Wan (30 euler steps, CFG 5, tests/bench/
   bench_sampler.py): per unit of saved compute, step reuse gave the best
   fidelity (S: 36.7 dB at 3.0x est., G: 37.9 dB at 1.5x, B: 35.0 dB at 1.8x),
   so the order step > cfg > block is kept; long reuse runs were what hurt
   (no cap: 28.6 dB), hence the default cap of 3 and threshold 0.3.  With
   those defaults the budget rarely binds on this fixture and mix reuses
   whole steps; cfg/block take over when the accumulated change grows (late
   steps, larger caps or budgets, models with larger per-step change).
4. The single-granularity modes use the same trigger with only that
   granularity allowed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..lightcache_core import CacheStore, MixPolicyConfig, RunReport, StepWindow, StoreConfig, choose_granularity
from ..lightcache_core.schedules import step_index_for_sigma
from . import compat

log = logging.getLogger("LightCache")

KEY = "lightcache"  # wrapper key and transformer_options key of the config
RUN_KEY = "lightcache_run"  # transformer_options key of the per-run state (run-time clone only)

MODES = ("off", "step", "cfg", "block", "mix")
CACHE_DEVICES = {"auto": "auto", "gpu": "device", "cpu": "cpu"}
BRANCH_NAMES = {0: "cond", 1: "uncond"}


class ReportSink:
    """Where a finished run leaves its report, for the Sampler node to read.

    Shared on purpose across copies (``__deepcopy__`` returns itself), because
    0.3.x ``clone()`` deep-copies ``transformer_options``.  Holds only finished
    reports (plain data), never tensors.
    """

    def __init__(self) -> None:
        self.reports: list[RunReport] = []

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self


@dataclass(frozen=True)
class CacheConfig:
    """Immutable settings stored on the patched model (never per-run state).

    mode: "step" | "cfg" | "block" | "mix".
    threshold: error budget for the accumulated change (quality/speed knob).
    start_percent / end_percent: fraction of the run's steps where reuse may happen.
    cache_device: "auto" | "gpu" | "cpu" (core CacheStore placement).
    warmup_steps / final_compute_steps / max_consecutive_reuse: trigger gates.
    block_first / block_last: blocks always computed before/after the cached range.
    output_channels: latent channels the model predicts (slice of the input).
    block_layout: ``[(block_name, count), ...]`` from ``compat.dit_block_layout``.
    cfg_weight / block_weight: mix error weights (step weight is 1).
    subsample: stride of the change signal's spatial subsampling.
    """

    mode: str = "mix"
    threshold: float = 0.3
    start_percent: float = 0.0
    end_percent: float = 1.0
    cache_device: str = "auto"
    warmup_steps: int = 3
    final_compute_steps: int = 1
    max_consecutive_reuse: int = 3
    block_first: int = 1
    block_last: int = 1
    output_channels: int | None = None
    block_layout: tuple | None = None
    cfg_weight: float = 0.5
    block_weight: float = 0.25
    subsample: int = 2
    verbose: bool = False
    report_sink: ReportSink | None = field(default=None, compare=False)

    def uses_blocks(self) -> bool:
        return self.mode in ("block", "mix") and self.block_range() is not None

    def block_range(self) -> tuple[str, int, int] | None:
        """(segment, start, end): the cached middle range, end exclusive.

        The range lies inside one segment (the longest; block shapes change
        between HunyuanVideo's double and single segments).  ``block_first``
        counts from the model's first block, ``block_last`` from its last; when
        the model is too shallow, ``block_last`` then ``block_first`` shrink so
        at least one block is cached.
        """
        layout = list(self.block_layout or [])
        if not layout:
            return None
        seg_index = max(range(len(layout)), key=lambda i: (layout[i][1], i))
        name, length = layout[seg_index]
        first = self.block_first if seg_index == 0 else 0
        last = self.block_last if seg_index == len(layout) - 1 else 0
        while length - first - last < 1 and last > 0:
            last -= 1
        while length - first - last < 1 and first > 0:
            first -= 1
        if length - first - last < 1:
            return None
        return name, first, length - last

    def block_cost(self) -> float:
        """Fraction of the model's blocks a block-reuse evaluation still runs."""
        rng = self.block_range()
        total = sum(n for _, n in (self.block_layout or []))
        if rng is None or total == 0:
            return 1.0
        return 1.0 - (rng[2] - rng[1]) / total


# ----------------------------------------------------------------------------- the per-run state

class RunState:
    """Everything one sampling run caches and decides; created and torn down by OUTER_SAMPLE."""

    def __init__(self, config: CacheConfig, sigmas: torch.Tensor, compute_device: torch.device, node_id: str | None) -> None:
        self.config = config
        self.node_id = node_id
        self.sample_sigmas = sigmas.detach().flatten().float().cpu() if isinstance(sigmas, torch.Tensor) else torch.tensor([])
        self.total_steps = max(int(self.sample_sigmas.numel()) - 1, 0)
        self.degenerate = step_index_for_sigma(self.sample_sigmas, 0.0) is None if self.total_steps >= 1 else True
        placement = CACHE_DEVICES.get(config.cache_device, "auto")
        self.store = CacheStore(compute_device, StoreConfig(placement=placement))
        self.window = StepWindow(start_percent=config.start_percent, end_percent=config.end_percent,
                                 warmup_steps=config.warmup_steps, final_compute_steps=config.final_compute_steps,
                                 max_consecutive_reuse=config.max_consecutive_reuse)
        step_weight = 1.0
        self.policy = MixPolicyConfig(error_budget=config.threshold, step_weight=step_weight,
                                      cfg_weight=config.cfg_weight, block_weight=config.block_weight)
        self.allowed_modes = {"step": ("step",), "cfg": ("cfg",), "block": ("block",),
                              "mix": ("step", "cfg", "block")}[config.mode]
        if "block" in self.allowed_modes and config.block_range() is None:
            self.allowed_modes = tuple(g for g in self.allowed_modes if g != "block")
        self.block_range = config.block_range()
        self.report = RunReport(node="LightCacheSampler", mode=config.mode, total_steps=self.total_steps)
        self.report.cost_by_granularity.update({"cfg": 0.0, "block": config.block_cost(), "step": 0.0})
        if self.degenerate:
            self.report.notes.append("degenerate sigma schedule: every evaluation computes")
        # decision of the evaluation in flight (read by DIFFUSION_MODEL / block patches)
        self.current: str | None = None
        self.consecutive_reuse = 0
        self.accumulated = 0.0
        self.meta: tuple | None = None
        # change signal state (subsampled, tiny)
        self.x_prev_sub: torch.Tensor | None = None
        self.x_last_compute_sub: torch.Tensor | None = None
        self.eps_last_compute_sub: torch.Tensor | None = None
        self.eps_norm: float | None = None
        self.k_ratio: float | None = None
        # which caches are valid
        self.step_uuids: set = set()
        self.cfg_branches: set[int] = set()
        self.block_uuids: set = set()
        self._block_in: dict = {}  # uuid -> input of the first cached block (compute evaluations only)
        self.evaluations = 0
        self.last_progress = 0.0

    # ------------------------------------------------------------------ helpers
    def step_of(self, sigma: float) -> int | None:
        if self.degenerate:
            return None
        return step_index_for_sigma(self.sample_sigmas, sigma)

    def _subsample(self, x: torch.Tensor) -> torch.Tensor:
        s = max(int(self.config.subsample), 1)
        x = x[:, : self.config.output_channels] if self.config.output_channels else x
        if s > 1 and x.dim() >= 3:
            x = x[..., ::s, ::s]
        return x.detach().float()

    def reset_caches(self, reason: str) -> None:
        self.store.clear(release_buffers=False)
        self.step_uuids.clear()
        self.cfg_branches.clear()
        self.block_uuids.clear()
        self._block_in.clear()
        self.x_prev_sub = self.x_last_compute_sub = self.eps_last_compute_sub = None
        self.eps_norm = self.k_ratio = None
        self.accumulated = 0.0
        self.consecutive_reuse = 0
        if reason:
            self.report.notes.append(reason)

    def check_metadata(self, x: torch.Tensor) -> None:
        meta = (tuple(x.shape), x.dtype, x.device)
        if self.meta is not None and meta != self.meta:
            self.reset_caches(f"input changed {self.meta[0]}/{self.meta[1]} -> {meta[0]}/{meta[1]}: caches reset")
        self.meta = meta

    # ------------------------------------------------------------------ the decision
    def _step_change(self, x_sub: torch.Tensor) -> float:
        """r = k * |x - x_prev| / |eps_prev| for this evaluation (inf when unknown)."""
        if self.x_prev_sub is None or self.k_ratio is None or not self.eps_norm or self.x_prev_sub.shape != x_sub.shape:
            return math.inf
        dx = float((x_sub - self.x_prev_sub).abs().mean())
        return self.k_ratio * dx / self.eps_norm

    def _available(self, uuids_by_branch: dict[int, list], present: list[int]) -> list[str]:
        allowed = []
        all_uuids = [u for b in present for u in uuids_by_branch.get(b, [])]
        for g in self.allowed_modes:
            if g == "step" and all_uuids and all(u in self.step_uuids for u in all_uuids):
                allowed.append(g)
            elif g == "cfg" and 0 in present and len(present) > 1 and all(b in self.cfg_branches for b in present if b != 0):
                allowed.append(g)
            elif g == "block" and all_uuids and all(u in self.block_uuids for u in all_uuids):
                allowed.append(g)
        return allowed

    def decide(self, step: int | None, r: float, uuids_by_branch: dict[int, list], present: list[int]) -> str:
        if step is None or not math.isfinite(r):
            return "compute"
        if not self.window.allows_reuse(step, self.total_steps, self.consecutive_reuse):
            return "compute"
        allowed = self._available(uuids_by_branch, present)
        if not allowed:
            return "compute"
        return choose_granularity(self.accumulated, r, self.policy, allowed)

    # ------------------------------------------------------------------ CALC_COND_BATCH
    def calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        start = time.perf_counter()
        sigma = compat.apply_model_sigma(timestep)
        step = self.step_of(sigma)
        self.check_metadata(x_in)
        present = [i for i, c in enumerate(conds) if c is not None and len(c) > 0]
        uuids_by_branch = {i: [compat.cond_entry_uuid(e) for e in conds[i]] for i in present}
        x_sub = self._subsample(x_in)
        r = self._step_change(x_sub)
        decision = self.decide(step, r, uuids_by_branch, present)
        if self.config.verbose:
            log.info("LightCache step %s sigma %.4f r %.4f A %.4f k %s -> %s", step, sigma, r, self.accumulated, self.k_ratio, decision)
        self.current = decision
        try:
            if decision == "cfg":
                only_cond = [conds[0]] + [None] * (len(conds) - 1)
                out = executor(model, only_cond, x_in, timestep, model_options, *args, **kwargs)
                out = list(out)
                for b in present:
                    if b == 0:
                        continue
                    out[b] = self._rebuild_branch(out[0], b, sigma)
                    self.store.release(("cfg", b))
            else:
                out = executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        finally:
            self.current = None
        if decision == "compute":
            self._after_compute(out, x_in, x_sub, sigma, present)
            self.accumulated = 0.0
            self.consecutive_reuse = 0
        else:
            self.accumulated += r
            self.consecutive_reuse += 1
        self.x_prev_sub = x_sub
        self._prefetch_next(step, r, decision, uuids_by_branch, present)
        self._record(step, sigma, decision, present, time.perf_counter() - start)
        return out

    def _eps(self, out0: torch.Tensor, x_in: torch.Tensor, sigma: float) -> torch.Tensor:
        return (x_in - out0) / sigma if sigma > 1e-6 else (x_in - out0)

    def _after_compute(self, out, x_in, x_sub, sigma, present) -> None:
        # CFG deltas in noise units: (eps_branch - eps_cond) = (out_cond - out_branch) / sigma
        scale = 1.0 / sigma if sigma > 1e-6 else 1.0
        if 0 in present:
            for b in present:
                if b != 0:
                    self.store.put(("cfg", b), ((out[0] - out[b]) * scale).detach())
                    self.cfg_branches.add(b)
            eps_sub = self._subsample(self._eps(out[0], x_in, sigma))
            if self.x_last_compute_sub is not None and self.eps_last_compute_sub is not None \
                    and self.x_last_compute_sub.shape == x_sub.shape:
                dx = float((x_sub - self.x_last_compute_sub).abs().mean())
                de = float((eps_sub - self.eps_last_compute_sub).abs().mean())
                if dx > 0:
                    self.k_ratio = de / dx
            self.x_last_compute_sub, self.eps_last_compute_sub = x_sub, eps_sub
            self.eps_norm = float(eps_sub.abs().mean()) or None

    def _rebuild_branch(self, out0: torch.Tensor, branch: int, sigma: float) -> torch.Tensor:
        delta = self.store.get(("cfg", branch))
        factor = sigma if sigma > 1e-6 else 1.0
        return out0 - delta.to(out0.dtype) * factor

    def _prefetch_next(self, step, r, decision, uuids_by_branch, present) -> None:
        """Start host->device copies for what the predicted next evaluation reuses
        (assumes the next change is like this one's)."""
        if step is None or not math.isfinite(r):
            return
        consecutive = 0 if decision == "compute" else self.consecutive_reuse
        if not self.window.allows_reuse(min(step + 1, self.total_steps), self.total_steps, consecutive):
            return
        allowed = self._available(uuids_by_branch, present)
        guess = choose_granularity(self.accumulated, r, self.policy, allowed) if allowed else "compute"
        uuids = [u for b in present for u in uuids_by_branch.get(b, [])]
        if guess == "step":
            self.store.prefetch([("step", u) for u in uuids])
        elif guess == "cfg":
            self.store.prefetch([("cfg", b) for b in present if b != 0])
        elif guess == "block":
            self.store.prefetch([("block", u) for u in uuids])

    def _record(self, step, sigma, decision, present, seconds) -> None:
        self.evaluations += 1
        step_i = -1 if step is None else int(step)
        for b in present:
            branch = BRANCH_NAMES.get(b, f"cond{b}")
            if decision == "compute" or (decision == "cfg" and b == 0):
                self.report.add(step_i, sigma, branch, "compute", "full", seconds / max(len(present), 1))
            else:
                self.report.add(step_i, sigma, branch, "reuse", decision, seconds / max(len(present), 1))
        now = time.perf_counter()
        if self.node_id is not None and (now - self.last_progress > 0.25 or step_i >= self.total_steps - 1):
            self.last_progress = now
            text = (f"LightCache {self.config.mode}: step {step_i + 1}/{self.total_steps} "
                    f"[{decision}] reused {self.report.reused_count()}/{len(self.report.records)} evaluations")
            compat.send_progress_text(text, self.node_id)

    # ------------------------------------------------------------------ DIFFUSION_MODEL
    def diffusion_model(self, executor, args, kwargs, transformer_options):
        decision = self.current
        x = args[0]
        xo = x[:, : self.config.output_channels] if self.config.output_channels else x
        uuids = list(transformer_options.get("uuids") or [])
        n = len(uuids)
        if decision == "step" and n > 0 and xo.shape[0] % n == 0:
            b = xo.shape[0] // n
            parts = []
            for i, u in enumerate(uuids):
                res = self.store.get(("step", u))
                if res is None or res.shape[1:] != xo.shape[1:]:
                    parts = None
                    break
                parts.append(xo[i * b:(i + 1) * b] + res.to(xo.dtype))
            for u in uuids:
                self.store.release(("step", u))
            if parts is not None:
                return torch.cat(parts, dim=0)
            decision = "compute"  # a residual is missing: run the model (decision logged as reuse; rare)
        output = executor(*args, **kwargs)
        if decision == "compute" and n > 0 and isinstance(output, torch.Tensor) and output.shape[0] % n == 0 \
                and output.shape[1:] == xo.shape[1:]:
            b = output.shape[0] // n
            for i, u in enumerate(uuids):
                self.store.put(("step", u), (output[i * b:(i + 1) * b] - xo[i * b:(i + 1) * b]).detach())
                self.step_uuids.add(u)
        return output

    # ------------------------------------------------------------------ block patches
    def block(self, segment: str, index: int, args: dict, extra: dict, run_original):
        decision = self.current
        name, first, end = self.block_range
        to = args.get("transformer_options", {})
        uuids = list(to.get("uuids") or [])
        img = args["img"]
        n = len(uuids)
        if decision is None or n == 0 or img.shape[0] % n != 0:
            return run_original(args, extra)
        b = img.shape[0] // n
        last = end - 1
        if decision == "block":
            passthrough = {k: args[k] for k in ("img", "txt") if k in args}
            if index < last:
                return passthrough
            parts = []
            for i, u in enumerate(uuids):
                res = self.store.get(("block", u))
                parts.append(img[i * b:(i + 1) * b] + res.to(img.dtype))
                self.store.release(("block", u))
            passthrough["img"] = torch.cat(parts, dim=0)
            return passthrough
        if decision == "compute" and index == first:
            self._block_in = {u: img[i * b:(i + 1) * b] for i, u in enumerate(uuids)}
        out = run_original(args, extra)
        if decision == "compute" and index == last and self._block_in:
            out_img = out["img"]
            for i, u in enumerate(uuids):
                src = self._block_in.get(u)
                if src is not None and src.shape == out_img[i * b:(i + 1) * b].shape:
                    self.store.put(("block", u), (out_img[i * b:(i + 1) * b] - src).detach())
                    self.block_uuids.add(u)
            self._block_in = {}
        return out

    # ------------------------------------------------------------------ teardown
    def finish(self) -> RunReport:
        stats = self.store.stats.as_dict()
        self.report.cache_stats = stats
        self.store.clear(release_buffers=True)
        self._block_in = {}
        self.x_prev_sub = self.x_last_compute_sub = self.eps_last_compute_sub = None
        self.current = None
        return self.report


# ----------------------------------------------------------------------------- wrappers

def _config_of(model_options: dict) -> CacheConfig | None:
    return model_options.get("transformer_options", {}).get(KEY)


def outer_sample_wrapper(executor, *args, **kwargs):
    """Fresh RunState per run on a clone of the guider's model_options; freed in ``finally``."""
    guider = executor.class_obj
    orig_model_options = guider.model_options
    run: RunState | None = None
    try:
        config = _config_of(orig_model_options)
        if config is None:
            return executor(*args, **kwargs)
        guider.model_options = compat.create_model_options_clone(orig_model_options)
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        device = guider.model_patcher.load_device
        run = RunState(config, sigmas, device, compat.executing_node_id())
        to = guider.model_options.setdefault("transformer_options", {})
        to[RUN_KEY] = run
        if "block" in run.allowed_modes:
            install_block_patches(guider.model_options, run)
        return executor(*args, **kwargs)
    finally:
        if run is not None:
            report = run.finish()
            if run.config.report_sink is not None:
                run.config.report_sink.reports.append(report)
            log.info(report.summary_line())
        guider.model_options = orig_model_options


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    run = model_options.get("transformer_options", {}).get(RUN_KEY)
    if run is None:
        return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
    return run.calc_cond_batch(executor, model, conds, x_in, timestep, model_options, *args, **kwargs)


def diffusion_model_wrapper(executor, *args, **kwargs):
    to = compat.transformer_options_of(args, kwargs)
    run = to.get(RUN_KEY) if isinstance(to, dict) else None
    if run is None or run.current is None:
        return executor(*args, **kwargs)
    return run.diffusion_model(executor, args, kwargs, to)


class _BlockPatch:
    """One ``patches_replace["dit"]`` entry; chains to the replacement it displaced."""

    def __init__(self, segment: str, index: int, previous: Any) -> None:
        self.segment, self.index, self.previous = segment, index, previous

    def _original(self, args, extra):
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        run = args.get("transformer_options", {}).get(RUN_KEY)
        if run is None or run.current is None:
            return self._original(args, extra)
        return run.block(self.segment, self.index, args, extra, self._original)


def install_block_patches(model_options: dict, run: RunState) -> None:
    """Add block patches for the cached range to the run's (cloned) model_options."""
    name, first, end = run.block_range
    to = model_options["transformer_options"]
    replace = dict(to.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for i in range(first, end):
        dit[(name, i)] = _BlockPatch(name, i, dit.get((name, i)))
    replace["dit"] = dit
    to["patches_replace"] = replace


# ----------------------------------------------------------------------------- apply

class LightCacheError(ValueError):
    pass


def apply_lightcache(model, config: CacheConfig, node_name: str = "LightCache Model Patch"):
    """A clone of ``model`` carrying ``config`` and the keyed wrappers; ``mode="off"`` returns ``model``."""
    if config.mode == "off":
        return model
    if config.mode not in MODES:
        raise LightCacheError(f"{node_name}: cache_mode {config.mode!r} is not one of {MODES}.")
    if config.mode == "block" and config.block_range() is None:
        raise LightCacheError(
            f"{node_name}: cache_mode 'block' needs a DiT whose block loop honours patches_replace['dit'] "
            f"(Wan, HunyuanVideo, Flux...); this model ({type(compat.diffusion_model_of(model)).__name__}) has none. "
            f"Fix: choose cache_mode 'step' or 'cfg' (or 'mix', which then mixes step and cfg).")
    m = model.clone()
    m.model_options.setdefault("transformer_options", {})[KEY] = config
    W = compat.WrappersMP
    for wtype, fn in ((W.OUTER_SAMPLE, outer_sample_wrapper), (W.CALC_COND_BATCH, calc_cond_batch_wrapper),
                      (W.DIFFUSION_MODEL, diffusion_model_wrapper)):
        m.remove_wrappers_with_key(wtype, KEY)
        m.add_wrapper_with_key(wtype, KEY, fn)
    return m
