"""The step clock: a denoiser call's step index, total steps and sigma."""
from __future__ import annotations

import weakref
from typing import Any

import torch


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
