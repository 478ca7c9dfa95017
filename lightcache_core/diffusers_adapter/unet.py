"""UNets: DeepCache per UNet call (``DeepCacheStepHook``, ``DeepCacheSkipHook``, ``DeepCacheEntryHook``)."""
from __future__ import annotations

import contextvars
import time
from collections.abc import Callable, Hashable
from typing import Any

import torch

from ..cache_store import CacheStore, StoreConfig
from ..deepcache import PLACEMENT, BranchPlan, DeepCacheSettings, plan_for_blocks
from ..report import RunReport, format_bytes
from .arguments import _Signature
from .clock import _StepClock
from .config import DEEPCACHE_ENTRY_HOOK, DEEPCACHE_SKIP_HOOK, DEEPCACHE_STEP_HOOK, MAX_REPORTS
from .hooks import _hook_types, _Installed, _state_manager


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


# ----------------------------------------------------------------------------- install


def _is_unet(model: torch.nn.Module) -> bool:
    downs, ups = getattr(model, "down_blocks", None), getattr(model, "up_blocks", None)
    return isinstance(downs, torch.nn.ModuleList) and isinstance(ups, torch.nn.ModuleList) and \
        len(downs) == len(ups) and len(downs) >= 2 and hasattr(model, "mid_block")


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
