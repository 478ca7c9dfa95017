"""Predicting a skipped model output from the last full computes (TaylorSeer-style, damped).

A reused evaluation at noise level ``sigma`` returns

    y_hat = y_c + damping * slope * (sigma - sigma_c)

where ``y_c`` is the output of the last full compute (at ``sigma_c``) and
``slope = (y_c - y_p) / (sigma_c - sigma_p)`` the first-order difference to the
compute before it.  ``damping`` 0 holds the last output constant (plain reuse);
1 is the full first-order Taylor step.

Why damped: on the trained tiny Wan (30 euler steps, CFG 5) the full first-order
step overshoots when the computes are far apart (it loses 4-8 dB against plain
reuse at 3-4x fewer evaluations), plain reuse lags when they are close, and half
a step was the best single setting across 1.7x-4x (+4 to +6 dB over plain reuse;
measured in the README's "How mix decides").  Outputs are in noise units (the
model's own prediction), which change more slowly than the residual
``output - input``: holding the output beat holding the residual by 0.5-1.4 dB.
"""

from __future__ import annotations

import torch


def slope(y: torch.Tensor, y_prev: torch.Tensor, sigma: float, sigma_prev: float) -> torch.Tensor | None:
    """First-order difference ``(y - y_prev) / (sigma - sigma_prev)``; None when the sigmas coincide
    or the shapes differ (then only a constant hold is possible)."""
    if y.shape != y_prev.shape or sigma == sigma_prev:
        return None
    return (y - y_prev.to(y.dtype)) / (sigma - sigma_prev)


def extrapolate(y: torch.Tensor, dy: torch.Tensor | None, sigma: float, sigma_c: float, damping: float) -> torch.Tensor:
    """``y + damping * dy * (sigma - sigma_c)`` (``y`` itself when ``dy`` is None or damping is 0).

    y, dy: same shape; the result has ``y``'s dtype and device and never aliases ``y``
    when a step is taken (a caller may not modify a returned ``y`` in place either).
    """
    if dy is None or damping == 0.0:
        return y
    return y + (damping * (sigma - sigma_c)) * dy.to(y.dtype)
