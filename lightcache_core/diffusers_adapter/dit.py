"""DiTs: the core engine per transformer call (``LightCacheDenoiserHook``, ``LightCacheBlockHook``)."""
from __future__ import annotations

import contextvars
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache_store import CacheStore, StoreConfig
from ..deepcache import PLACEMENT
from ..engine import MIN_SIGMA, Evaluation, HybridEngine
from ..policy import COMPUTE
from ..report import RunReport
from .arguments import _first_tensor, _output_kind, _Signature, _with_tensor
from .clock import _StepClock
from .config import (BLOCK_HOOK, BLOCK_LISTS, BRANCH_IDS, DENOISER_HOOK, MAX_REPORTS, DitCacheConfig,
                     LightCacheDiffusersError)
from .hooks import _hook_types, _Installed, _state_manager


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


# ----------------------------------------------------------------------------- install


def _block_list(model: torch.nn.Module) -> str | None:
    for name in BLOCK_LISTS:
        blocks = getattr(model, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return name
    return None


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
