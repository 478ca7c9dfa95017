"""Cheap error signals for the hybrid decision, one per reuse granularity.

All signals are measured on subsampled tensors and kept on the compute device as
0-d tensors; the caller gathers what it needs into one small tensor and syncs
once per evaluation (``torch.stack(...).tolist()``), so the GPU keeps running
ahead of the CPU.

Unit of every predicted error: the mean absolute error of the CFG-combined model
output in noise units (``(x - denoised) / sigma``), relative to the mean absolute
value of the input latent ``x``.  With ``dist = mean|x - x_c| / mean|x|`` the
relative distance the latent has moved since the last full compute ``c``:

* step reuse (every branch predicted):  ``e_step = k_out * dist``, where
  ``k_out = mean|g - g'| / mean|x - x'|`` is the output-change per input-change
  ratio of the CFG-combined output ``g`` between the last two full computes
  (EasyCache's transformation rate).
* cfg reuse (cond computed, the other branches rebuilt from the guidance
  difference ``d = v_cond - v_uncond``): ``e_cfg = (s - 1) * k_diff * dist`` with
  ``k_diff = mean|d - d'| / mean|x - x'|`` and ``s`` the CFG scale, because
  ``g = v_cond + (s - 1) * d`` and only ``d`` is stale.
* block reuse (first and last blocks computed, middle residual reused):
  measured *fresh* inside the block loop once the first blocks have run, from
  the drift of their residual (``BlockSignals``), scaled by the share of the
  step's change that the middle blocks carry.

Hindsight calibration: at every full compute the signals also measure what each
reuse *would* have produced at that evaluation (the step prediction, the held
output, the cfg rebuild) against the truth, and keep the ratio of that realized
error to the formula's prediction (``calibration``, an exponential average).
The decision multiplies each formula by its ratio, so the granularities compete
on the errors they really cause on this model, not on a common proxy: on the
trained tiny Wan, for instance, rebuilding the uncond branch from a stale
guidance difference costs more than predicting both branches, and the
calibration is what keeps ``mix`` from choosing it there.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def subsample_latent(x: torch.Tensor, stride: int) -> torch.Tensor:
    """A float32 copy of every ``stride``-th element of the last two dims (rows, columns).

    x: ``[B, C, ..., H, W]`` (any rank >= 3); rank < 3 is only copied. Always a copy,
    so a caller may keep it while the source is later modified in place.
    """
    if stride > 1 and x.dim() >= 3:
        x = x[..., ::stride, ::stride]
    return x.detach().to(torch.float32, copy=True)


def subsample_tokens(h: torch.Tensor, token_stride: int, channel_stride: int | None = None) -> torch.Tensor:
    """A copy of every ``token_stride``-th token and ``channel_stride``-th channel (default: the same
    stride) of a hidden state ``[B, tokens, dim]``, in its own dtype (a copy: transformer blocks may
    update their input in place afterwards; kept narrow so the block signals stay a small fraction
    of one hidden state on the device)."""
    channel_stride = token_stride if channel_stride is None else channel_stride
    if h.dim() == 3 and (token_stride > 1 or channel_stride > 1):
        h = h[:, ::token_stride, ::channel_stride]
    return h.detach().clone()


def mean_abs(t: torch.Tensor) -> torch.Tensor:
    """Mean absolute value, accumulated and returned in float32 (inputs may be bf16/fp16)."""
    return t.abs().mean(dtype=torch.float32)


def guided_output(outputs: dict[int, torch.Tensor], cfg_scale: float) -> torch.Tensor:
    """The CFG combination ``v_u + s * (v_c - v_u)`` of branch 0 (cond) and 1 (uncond) outputs;
    the cond output alone when there is no uncond branch."""
    cond = outputs[0]
    if 1 not in outputs:
        return cond
    return outputs[1] + cfg_scale * (cond - outputs[1])


class TrajectorySignals:
    """Step and cfg signals of one trajectory (one sampling slot).

    stride: subsampling stride of the latent's last two dims.
    cfg_scale: the guider's CFG scale ``s`` (1 when unknown).
    """

    def __init__(self, stride: int = 2, cfg_scale: float = 1.0) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride = int(stride)
        self.cfg_scale = float(cfg_scale)
        self.computes = 0
        self.anchor_x: torch.Tensor | None = None  # subsampled x at the last full compute
        self._anchor_out: torch.Tensor | None = None  # subsampled g there
        self._anchor_diff: torch.Tensor | None = None  # subsampled d there (None without uncond)
        self.k_out: torch.Tensor | None = None
        self.k_diff: torch.Tensor | None = None
        self.output_drift: torch.Tensor | None = None  # mean|g - g'| / mean|x| between the last two computes
        self.input_drift: torch.Tensor | None = None  # mean|x - x'| / mean|x| between the last two computes
        self.calibration: dict[str, torch.Tensor] = {}  # "step" / "hold" / "cfg" -> realized / predicted

    @property
    def calibrated(self) -> bool:
        """True once two full computes measured the change ratios."""
        return self.k_out is not None

    def observe_compute(self, x: torch.Tensor, outputs: dict[int, torch.Tensor],
                        predicted: dict[int, torch.Tensor] | None = None,
                        held: dict[int, torch.Tensor] | None = None) -> None:
        """Record a full compute: ``x`` the input latent, ``outputs`` the model output of
        each present branch in noise units (0 cond, 1 uncond); ``predicted`` / ``held``:
        what step reuse would have returned here with / without extrapolation (same
        branches), for the hindsight calibration."""
        x_sub = subsample_latent(x, self.stride)
        outs = {b: subsample_latent(v, self.stride) for b, v in outputs.items()}
        out = guided_output(outs, self.cfg_scale)
        diff = outs[0] - outs[1] if 0 in outs and 1 in outs else None
        if predicted and held and set(predicted) == set(outs) == set(held):
            self._calibrate(x_sub, out, diff, {b: subsample_latent(v, self.stride) for b, v in predicted.items()},
                            {b: subsample_latent(v, self.stride) for b, v in held.items()})
        if self.anchor_x is not None and self.anchor_x.shape == x_sub.shape:
            dx = mean_abs(x_sub - self.anchor_x)
            scale = mean_abs(x_sub) + EPS
            self.k_out = mean_abs(out - self._anchor_out) / (dx + EPS)
            self.output_drift = mean_abs(out - self._anchor_out) / scale
            self.input_drift = dx / scale
            if diff is not None and self._anchor_diff is not None:
                self.k_diff = max(self.cfg_scale - 1.0, 0.0) * mean_abs(diff - self._anchor_diff) / (dx + EPS)
            else:
                self.k_diff = None
        self.anchor_x, self._anchor_out, self._anchor_diff = x_sub, out, diff
        self.computes += 1

    def _calibrate(self, x_sub, out, diff, predicted, held, weight: float = 0.5) -> None:
        if self.anchor_x is None or self.anchor_x.shape != x_sub.shape or self.k_out is None:
            return
        scale = mean_abs(x_sub) + EPS
        distance = mean_abs(x_sub - self.anchor_x) / scale
        realized = {"step": mean_abs(out - guided_output(predicted, self.cfg_scale)) / scale,
                    "hold": mean_abs(out - guided_output(held, self.cfg_scale)) / scale}
        formula = {"step": self.k_out * distance, "hold": self.k_out * distance}
        if diff is not None and self.k_diff is not None and 1 in predicted:
            realized["cfg"] = max(self.cfg_scale - 1.0, 0.0) * mean_abs(diff - (predicted[0] - predicted[1])) / scale
            formula["cfg"] = self.k_diff * distance
        for name, value in realized.items():
            ratio = value / (formula[name] + EPS)
            old = self.calibration.get(name)
            self.calibration[name] = ratio if old is None else weight * old + (1.0 - weight) * ratio

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """``mean|x - x_c| / mean|x|`` since the last full compute (0-d device tensor)."""
        x_sub = subsample_latent(x, self.stride)
        if self.anchor_x is None or self.anchor_x.shape != x_sub.shape:
            return torch.full((), float("inf"), device=x.device)
        return mean_abs(x_sub - self.anchor_x) / (mean_abs(x_sub) + EPS)

    def predicted_errors(self, distance: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predicted errors at ``distance`` (0-d device tensors), calibrated in hindsight:
        "step" (extrapolated prediction), "hold" (the last output held, what block reuse's
        stale middle is compared with) and "cfg" (only with a guidance-difference ratio)."""
        errors = {}
        if self.k_out is not None:
            base = self.k_out * distance
            errors["step"] = base * self.calibration.get("step", 1.0)
            errors["hold"] = base * self.calibration.get("hold", 1.0)
        if self.k_diff is not None:
            errors["cfg"] = self.k_diff * distance * self.calibration.get("cfg", 1.0)
        return errors


class BlockSignals:
    """The first-blocks evidence for block reuse of one group of batch rows.

    At full computes the block loop reports the residual of the blocks before the
    cached range (``first``), the cached range's own residual (``middle``) and the
    hidden state after the last block (``final``), all subsampled.  From two
    computes:

    * ``share``: mean|middle - middle'| / mean|final - final'|, the part of the
      model's change that block reuse leaves stale (1 = all of it);
    * ``first_rate``: the first residual's relative drift per unit of relative
      input distance, to turn a fresh first-residual drift into a distance.

    ``fresh_error(first_now, k_out)`` is then block reuse's predicted error, from
    evidence of *this* evaluation: ``share * k_out * drift_now / first_rate``.
    """

    def __init__(self, stride: int = 4) -> None:
        self.stride = int(stride)
        self._first: torch.Tensor | None = None
        self._middle: torch.Tensor | None = None
        self._final: torch.Tensor | None = None
        self.share: torch.Tensor | None = None
        self.first_rate: torch.Tensor | None = None

    @property
    def calibrated(self) -> bool:
        return self.share is not None and self.first_rate is not None

    def observe_compute(self, first: torch.Tensor, middle: torch.Tensor, final: torch.Tensor,
                        input_distance: torch.Tensor | None) -> None:
        """first / middle: residuals ``[B, tokens, dim]``; final: hidden state after the
        last block; input_distance: the latent's relative move since the previous
        compute (``TrajectorySignals.input_drift``), None when unknown."""
        f, m, o = (subsample_tokens(t, self.stride) for t in (first, middle, final))
        if self._first is not None and self._first.shape == f.shape:
            self.share = torch.clamp(mean_abs(m - self._middle) / (mean_abs(o - self._final) + EPS), max=1.0)
            drift = mean_abs(f - self._first) / (mean_abs(self._first) + EPS)
            if input_distance is not None:
                self.first_rate = drift / (input_distance + EPS)
        self._first, self._middle, self._final = f, m, o

    def first_drift(self, first_now: torch.Tensor) -> torch.Tensor:
        """Relative drift of the first blocks' residual since the last compute (0-d)."""
        f = subsample_tokens(first_now, self.stride)
        if self._first is None or self._first.shape != f.shape:
            return torch.full((), float("inf"), device=first_now.device)
        return mean_abs(f - self._first) / (mean_abs(self._first) + EPS)

    def fresh_error(self, first_now: torch.Tensor, k_out: torch.Tensor) -> torch.Tensor:
        """Predicted block-reuse error from this evaluation's first-blocks residual (0-d)."""
        if not self.calibrated:
            return torch.full((), float("inf"), device=first_now.device)
        return self.share * k_out * self.first_drift(first_now) / (self.first_rate + EPS)
