"""One sampling-run lifecycle for every caching path (DiT hybrid, UNet DeepCache).

Modelled on ComfyUI's ``comfy_extras/nodes_easycache.py``: a node stores only
immutable settings on a ``model.clone()``; a keyed OUTER_SAMPLE wrapper builds the
run's state when sampling starts, on a copy of the guider's ``model_options``, and
tears it down in ``finally`` (errors and interrupts, which are ``BaseException``
in newer hosts, included). Nothing per-run lives on the model, so clones and
concurrent runs never share mutable state.

Reports travel back to the node that asked for them through a context variable
(``report_channel``) set around the sampling call, not through an object stored
on the model: a patched model can be cloned, shared between samplers or kept in
the node cache without carrying anyone's report.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch

from ..lightcache_core import RunReport
from ..lightcache_core.schedules import step_index_for_sigma
from . import compat

log = logging.getLogger("LightCache")


class ReportChannel:
    """Collects the reports of the runs one node execution starts (plain data, no tensors)."""

    def __init__(self) -> None:
        self._reports: list[RunReport] = []
        self._lock = threading.Lock()

    def deliver(self, report: RunReport) -> None:
        with self._lock:
            self._reports.append(report)

    @property
    def reports(self) -> list[RunReport]:
        with self._lock:
            return list(self._reports)


_CHANNEL: contextvars.ContextVar[ReportChannel | None] = contextvars.ContextVar("lightcache_report_channel", default=None)


@contextlib.contextmanager
def report_channel() -> Iterator[ReportChannel]:
    """``with report_channel() as channel: <sample>``: runs started inside deliver to ``channel``."""
    channel = ReportChannel()
    token = _CHANNEL.set(channel)
    try:
        yield channel
    finally:
        _CHANNEL.reset(token)


class StepClock:
    """Maps the sigma of a model evaluation to the step index of the run's schedule.

    sigmas: the schedule handed to the sampler (``[steps + 1]``, descending, usually
    ending in 0). ``degenerate`` schedules (fewer than two distinct sigmas) map to None.
    """

    def __init__(self, sigmas: Any) -> None:
        if isinstance(sigmas, torch.Tensor):
            self.sigmas = sigmas.detach().flatten().double().cpu()
        else:
            self.sigmas = torch.tensor([], dtype=torch.float64)
        self.values = [float(v) for v in self.sigmas.tolist()]  # read once: lookups never touch a tensor
        self.total_steps = max(len(self.values) - 1, 0)
        self.degenerate = self.total_steps < 1 or step_index_for_sigma(self.values, 0.0) is None
        self._cache: dict[float, int | None] = {}

    def step_of(self, sigma: Any) -> int | None:
        """The step index of ``sigma`` (float or tensor; its first element), None when unknown."""
        if self.degenerate:
            return None
        value = sigma_value(sigma)
        if value not in self._cache:
            self._cache[value] = step_index_for_sigma(self.values, value)
        return self._cache[value]

    def next_sigma(self, step: int) -> float:
        return self.values[min(step + 1, self.total_steps)]


def sigma_value(sigma: Any) -> float:
    """A sigma as a Python float (one host read of a device tensor's first element)."""
    if isinstance(sigma, torch.Tensor):
        return float(sigma.detach().flatten()[0].item()) if sigma.numel() else math.nan
    return float(sigma)


class ProgressText:
    """Throttled progress text under the node that runs the sampler (no-op without a UI)."""

    def __init__(self, node_id: str | None, min_interval_s: float = 0.25) -> None:
        self.node_id = node_id
        self.min_interval_s = min_interval_s
        self._last = 0.0

    def update(self, text: str, force: bool = False) -> None:
        if self.node_id is None:
            return
        now = time.perf_counter()
        if force or now - self._last >= self.min_interval_s:
            self._last = now
            compat.send_progress_text(text, self.node_id)


class CachingRun(Protocol):
    """What a caching path provides for one sampling run."""

    report: RunReport

    def install(self, model_options: dict) -> None:
        """Add what the run needs to the run's own copy of ``model_options``."""

    def finish(self, error: BaseException | None) -> RunReport:
        """Free every cache, pinned buffer and per-run object; return the final report."""


def make_outer_sample_wrapper(run_key: str, start_run: Callable[[Any, Any], CachingRun | None]):
    """The OUTER_SAMPLE wrapper of a caching path.

    start_run(guider, sigmas) builds the run (or returns None to sample untouched);
    the run is reachable during sampling as ``transformer_options[run_key]`` of the
    run's copy of the guider's ``model_options``. Teardown and report delivery
    happen in ``finally``, whatever ends the run.
    """

    def outer_sample(executor, *args, **kwargs):
        guider = executor.class_obj
        original = guider.model_options
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        run = start_run(guider, sigmas)
        if run is None:
            return executor(*args, **kwargs)
        node_id = compat.executing_node_id()
        error: BaseException | None = None
        try:
            options = compat.create_model_options_clone(original)
            transformer_options = dict(options.get("transformer_options", {}))
            transformer_options[run_key] = run
            options["transformer_options"] = transformer_options
            run.install(options)
            guider.model_options = options
            return executor(*args, **kwargs)
        except BaseException as exc:  # interrupts included; re-raised
            error = exc
            raise
        finally:
            guider.model_options = original
            report = run.finish(error)
            log.info("[LightCache] %s", report.summary_line())
            # Under the sampler node that ran: with Model Patch + KSamplerAdvanced (e.g. each stage of a
            # Wan 2.2 two-expert run) this is where the stage's report shows.
            compat.send_progress_text(report.summary_line(), node_id)
            channel = _CHANNEL.get()
            if channel is not None:
                channel.deliver(report)

    return outer_sample


def install_wrappers(patcher: Any, key: str, wrappers: dict) -> None:
    """Replace this pack's wrappers under ``key`` on ``patcher`` (a clone) with ``wrappers``
    (``{WrappersMP type: function}``); other packs' keyed wrappers are untouched."""
    for wrapper_type, fn in wrappers.items():
        patcher.remove_wrappers_with_key(wrapper_type, key)
        patcher.add_wrapper_with_key(wrapper_type, key, fn)


def run_of(transformer_options: Any, run_key: str) -> Any:
    """The run a wrapper or patch belongs to, from the options it was called with (None outside)."""
    if isinstance(transformer_options, dict):
        return transformer_options.get(run_key)
    return None
