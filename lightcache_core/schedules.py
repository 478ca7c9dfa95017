"""Step schedules and reuse gates: which sampler steps compute, which may reuse.

Everything here is pure.  Steps are 0-based indices into the sampler's sigma list; "progress" is
``step / total_steps`` in [0, 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def uniform_full_steps(total_steps: int, interval: int, start_step: int = 0) -> list[int]:
    """Full-compute steps of DeepCache's uniform 1:N schedule.

    Returns ``[start_step, start_step + interval, ...]`` below ``total_steps``; steps
    before ``start_step`` are not part of the run (a partial schedule started there).
    ``interval`` 1 computes every step.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    return list(range(start_step, max(total_steps, 0), interval))


def nonuniform_full_steps(total_steps: int, interval: int, center: float, power: float = 1.4) -> list[int]:
    """Full-compute steps packed densely around step ``center`` (DeepCache "pow" schedule).

    Well-defined replacement for DeepCache's ``sample_from_quad_center``, whose
    ``(-c) ** (1/p)`` is complex in Python (algorithms.md section 1.3).  With
    ``T = total_steps``, ``n = ceil(T / interval)``, ``c = clamp(center, 0, T-1)``
    (a step index) and ``p = power``:

        x_k   = linspace(-c ** (1/p), (T-1-c) ** (1/p), n)          k = 0..n-1
        pos_k = c + sign(x_k) * |x_k| ** p                          in [0, T-1]
        s_k   = floor(pos_k)

    Because ``|x| ** p`` is flat near 0 for ``p > 1``, positions crowd around ``c``.
    ``s_0 = 0`` and ``s_{n-1} = T-1`` always.  Collisions (spacing < 1 near the centre)
    are resolved deterministically: a forward pass makes the list strictly increasing
    (``s_k = max(s_k, s_{k-1} + 1)``), a backward pass pulls it back under ``T``
    (``s_k = min(s_k, s_{k+1} - 1)``).  The result has exactly ``n`` sorted unique steps
    and includes 0.  ``power`` 1 gives an (almost) uniform spread.
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if power < 1.0:
        raise ValueError(f"power must be >= 1, got {power}")
    if total_steps <= 0:
        return []
    n_full = math.ceil(total_steps / interval)
    if n_full >= total_steps:
        return list(range(total_steps))
    if n_full == 1:
        return [0]
    last = total_steps - 1
    c = min(max(float(center), 0.0), float(last))
    lo = -(c ** (1.0 / power))
    hi = (last - c) ** (1.0 / power)
    steps = []
    for k in range(n_full):
        x = lo + (hi - lo) * k / (n_full - 1)
        pos = c + math.copysign(abs(x) ** power, x)
        steps.append(min(max(int(math.floor(pos + 1e-9)), 0), last))
    steps[0], steps[-1] = 0, last
    for k in range(1, n_full):
        steps[k] = max(steps[k], steps[k - 1] + 1)
    steps[-1] = min(steps[-1], last)
    for k in range(n_full - 2, -1, -1):
        steps[k] = min(steps[k], steps[k + 1] - 1)
    return steps


@dataclass(frozen=True)
class StepWindow:
    """Where in a run reuse is allowed.

    start_percent / end_percent: progress window ``[start, end)`` (fractions of the run).
    warmup_steps: the first steps always compute.
    final_compute_steps: the last steps always compute.
    max_consecutive_reuse: cap on reuses in a row (<= 0 means unlimited).
    """

    start_percent: float = 0.0
    end_percent: float = 1.0
    warmup_steps: int = 0
    final_compute_steps: int = 1
    max_consecutive_reuse: int = 3

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_percent <= 1.0 or not 0.0 <= self.end_percent <= 1.0:
            raise ValueError(f"start/end_percent must be in [0, 1], got {self.start_percent}, {self.end_percent}")
        if self.start_percent > self.end_percent:
            raise ValueError(f"start_percent {self.start_percent} > end_percent {self.end_percent}")
        if self.warmup_steps < 0 or self.final_compute_steps < 0:
            raise ValueError("warmup_steps and final_compute_steps must be >= 0")

    def allows_reuse(self, step: int, total_steps: int, consecutive_reuse: int) -> bool:
        """True when step ``step`` of ``total_steps`` may reuse, given ``consecutive_reuse``
        reuses immediately before it."""
        if total_steps <= 0 or step < 0:
            return False
        progress = step / total_steps
        if not self.start_percent <= progress < self.end_percent:
            return False
        if step < self.warmup_steps or step >= total_steps - self.final_compute_steps:
            return False
        return self.max_consecutive_reuse <= 0 or consecutive_reuse < self.max_consecutive_reuse


def step_index_for_sigma(
    sample_sigmas: torch.Tensor,
    sigma: float | torch.Tensor,
    rtol: float = 1e-4,
) -> int | None:
    """Index of the sampler step evaluating at ``sigma``.

    sample_sigmas: 1-D sigma schedule (descending, usually ending in 0) as handed to
        the sampler; a tensor or sequence.
    sigma: current sigma (float, 0-d or [B] tensor; the first element is used).
    Returns the first index ``i`` with ``sigma`` close to ``sample_sigmas[i]``
    (relative ``rtol``); otherwise the index ``i`` of the interval
    ``sample_sigmas[i] > sigma > sample_sigmas[i+1]`` (mid-step evaluations of
    multi-evaluation samplers such as DPM2); sigmas above the first or below the last
    clamp to 0 or ``len - 1``.  None when the list is degenerate (fewer than 2 entries
    or all equal).  Note: second-order samplers (Heun) evaluate their correction at
    ``sample_sigmas[i+1]``, which maps to step ``i+1``.
    """
    if isinstance(sample_sigmas, (list, tuple)):
        sigmas = [float(s) for s in sample_sigmas]
    else:
        sigmas = [float(s) for s in torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().tolist()]
    if len(sigmas) < 2 or all(s == sigmas[0] for s in sigmas):
        return None
    if isinstance(sigma, torch.Tensor):
        if sigma.numel() == 0:
            return None
        sigma = float(sigma.flatten()[0].item())
    sigma = float(sigma)
    for i, s in enumerate(sigmas):
        if math.isclose(s, sigma, rel_tol=rtol, abs_tol=1e-8):
            return i
    for i in range(len(sigmas) - 1):
        high, low = max(sigmas[i], sigmas[i + 1]), min(sigmas[i], sigmas[i + 1])
        if low < sigma < high:
            return i
    return 0 if sigma > sigmas[0] else len(sigmas) - 1
