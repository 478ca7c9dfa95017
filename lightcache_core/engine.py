"""The hybrid caching engine, host-agnostic: one run, its trajectories, the decision and the reuse math.

A host adapter (the ComfyUI nodes, the diffusers adapter) feeds it, per model
evaluation, the input latent ``x``, the noise level ``sigma``, the step index and
which CFG branches are present, and gets back a ``Decision``:

* ``"step"``: the adapter runs nothing and asks ``Trajectory.predict(branch, sigma)``
  for every branch's output;
* ``"cfg"``: the adapter runs the cond branch only and asks
  ``Trajectory.rebuild_branch(cond_output, branch, sigma)`` for the others;
* ``"block"``: the adapter runs the model; its block hooks call
  ``BlockReuse.first_blocks_done`` / ``range_done`` / ``add_residual``;
* ``"compute"``: the adapter runs the model and hands the outputs to ``record_compute``.

Outputs are in the model's prediction units (noise or velocity; ComfyUI's
denoised outputs are converted by the adapter), one tensor per CFG branch
(0 cond, 1 uncond, ...). Everything the run caches lives in one ``CacheStore``
per device (host memory with ``cpu`` placement); every signal stays on the device
and the decision reads them back once per evaluation.

How ``mix`` decides is written down in ``policy.py`` (the rule), ``signals.py`` (the
errors) and ``extrapolation.py`` (the prediction); the numbers that chose it are in
the README ("How mix decides").
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

from .cache_store import CacheStore, StoreConfig
from .extrapolation import extrapolate, slope
from .policy import COMPUTE, GRANULARITIES, HybridPolicy, choose_granularity, forecast_reuse
from .report import RunReport
from .schedules import StepWindow
from .signals import BlockSignals, TrajectorySignals, subsample_tokens

MIN_SIGMA = 1e-5  # below this an output in noise units is ill-conditioned: compute, never record
FEW_STEPS = 8  # distilled 4-8 step runs (Lightning, lightx2v, CausVid): every step matters, none is reused
BLOCK_CALIBRATION_PRIOR = 2.0  # block reuse's prediction starts pessimistic (see Trajectory.block_calibration)
PLACEMENTS = ("auto", "device", "cpu")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings for one run (validated; dimensionless unless noted).

    granularities: the reuse kinds the run may choose, a subset of ("step", "cfg", "block").
    threshold: error budget between full computes (see ``policy.py``); 0 never reuses.
    start_percent / end_percent: part of the run (fraction of steps) where reuse may happen.
    warmup_steps / final_compute_steps: steps at the start / end that always compute.
    max_consecutive_reuse: safety cap on reuses in a row (0 = none).
    extrapolation: damping of the first-order output prediction (0 = hold the last output).
    subsample: stride of the signals' spatial subsampling.
    block_cost: fraction of a full evaluation a block-reuse evaluation still runs.
    placement: ``CacheStore`` placement ("auto", "device", "cpu").
    """

    granularities: tuple[str, ...] = GRANULARITIES
    threshold: float = 0.6
    start_percent: float = 0.0
    end_percent: float = 1.0
    warmup_steps: int = 3
    final_compute_steps: int = 1
    max_consecutive_reuse: int = 8
    extrapolation: float = 0.5
    subsample: int = 2
    block_cost: float = 1.0
    placement: str = "auto"

    def __post_init__(self) -> None:
        unknown = set(self.granularities) - set(GRANULARITIES)
        if unknown:
            raise ValueError(f"unknown granularities {sorted(unknown)}; expected a subset of {GRANULARITIES}")
        if not 0.0 <= self.extrapolation <= 1.0:
            raise ValueError(f"extrapolation must be in [0, 1], got {self.extrapolation}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        if self.subsample < 1:
            raise ValueError(f"subsample must be >= 1, got {self.subsample}")
        if not 0.0 <= self.block_cost <= 1.0:
            raise ValueError(f"block_cost must be in [0, 1], got {self.block_cost}")
        # the remaining fields are validated by the objects built from them
        HybridPolicy(budget=self.threshold, max_consecutive_reuse=self.max_consecutive_reuse)
        StepWindow(start_percent=self.start_percent, end_percent=self.end_percent, warmup_steps=self.warmup_steps,
                   final_compute_steps=self.final_compute_steps)


@dataclass
class Decision:
    """What one evaluation does, with the evidence it was taken on (floats, already on the host)."""

    step: int | None
    sigma: float
    decision: str = COMPUTE
    distance: torch.Tensor | None = None  # the latent's relative move since the last full compute (device)
    errors: dict = field(default_factory=dict)
    costs: dict = field(default_factory=dict)
    growth: dict = field(default_factory=dict)
    block_estimate: float = math.nan  # block reuse's uncalibrated predicted error
    block_error: float = 0.0  # the fresh error block reuse settled on
    forecast: list = field(default_factory=list)  # a compute's forecast of the reuse run after it

    @property
    def wants_block_residual(self) -> bool:
        """A compute whose forecast reuses blocks stores the range's residual (nothing else does)."""
        return self.decision == COMPUTE and "block" in self.forecast


class BlockGroup:
    """Block-reuse state of one group of batch rows (one model call's rows) on one device."""

    def __init__(self) -> None:
        self.signals = BlockSignals(stride=1)  # the block hooks hand it pre-subsampled tensors
        self.ready = False  # a middle residual is stored for every row key of the group


class Trajectory:
    """One denoising trajectory (a context window on a device): signals, accumulated error, outputs.

    The store holds, per branch, ``y`` (the output of the last full compute at
    ``history[branch]``), ``dy`` (the slope between the last two full computes) and,
    after a partial compute (cfg or block), ``yr``: that evaluation's output, which
    later reuses hold instead of ``y`` (what a partial compute made fresh is kept; the
    slope comes from full computes only).
    """

    def __init__(self, engine: HybridEngine, key: Hashable, device: torch.device) -> None:
        self.engine = engine
        self.key = key
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Forget everything (the store entries of this trajectory are dropped by the caller)."""
        config = self.engine.config
        self.signals = TrajectorySignals(stride=config.subsample, cfg_scale=self.engine.cfg_scale)
        self.accumulated = 0.0
        self.consecutive = 0
        self.last_compute_step: int | None = None
        self.history: dict[int, float] = {}
        self.slopes: set[int] = set()
        self.rebased: dict[int, float] = {}
        self.forecast: list[str] = []  # the rest of the reuse run the last compute forecast
        self.meta: tuple | None = None
        self.block_groups: dict[Hashable, BlockGroup] = {}
        # Block reuse's prediction (its share of the held output's error) against the fresh first-blocks
        # evidence it meets in the block loop: starts pessimistic, so residuals are stored for block reuse
        # only where it clearly pays, and learns from every block attempt.
        self.block_calibration = BLOCK_CALIBRATION_PRIOR

    @property
    def store(self) -> CacheStore:
        return self.engine.store_for(self.device)

    def step_key(self, branch: int, part: str) -> tuple:
        return ("step", self.key, branch, part)

    def check_input(self, x: torch.Tensor) -> None:
        """A changed shape or dtype (a new resolution, an upscale pass) starts the trajectory over."""
        meta = (tuple(x.shape), x.dtype)
        if self.meta is not None and self.meta != meta:
            store = self.store
            for key in store.keys():
                if len(key) > 1 and key[1] == self.key:
                    store.drop(key)
            old = self.meta
            self.reset()
            self.engine.note(f"input changed {old[0]}/{old[1]} -> {meta[0]}/{meta[1]}: caches reset")
        self.meta = meta

    # ------------------------------------------------------------------ the decision
    def decide(self, x: torch.Tensor, sigma: torch.Tensor | float, step_of: Callable[[float], int | None],
               present: list[int]) -> Decision:
        """The decision for one evaluation of ``x`` at ``sigma`` (one host read of device values).

        step_of: maps the sigma value to the run's step index (None when unknown).
        present: the CFG branches this evaluation has (0 cond, 1 uncond, ...).
        """
        engine = self.engine
        distance = self.signals.distance(x)
        device_errors = self.signals.predicted_errors(distance)
        share = self._block_share()
        names = ["sigma", "distance"] + list(device_errors) + (["block_share"] if share is not None else [])
        sigma_t = sigma.detach().flatten()[:1].to(distance.device, torch.float32).reshape(()) \
            if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma), device=distance.device)
        values = torch.stack([sigma_t, distance.float()] + [e.float() for e in device_errors.values()]
                             + ([share.float()] if share is not None else [])).tolist()  # the one host read
        named = dict(zip(names, values))
        sigma_value = named["sigma"]
        step = step_of(sigma_value)
        errors = {g: named[g] for g in device_errors}
        decision = Decision(step, sigma_value, COMPUTE, distance, errors, self.costs(present))
        if "hold" in errors and "block_share" in named:
            decision.block_estimate = named["block_share"] * errors["hold"]
            errors["block"] = self.block_calibration * decision.block_estimate
        age = (step - self.last_compute_step) if step is not None and self.last_compute_step is not None else 0
        if age > 0:
            decision.growth = {g: e / age for g, e in errors.items() if g in engine.config.granularities
                               and math.isfinite(e)}
        if self._triggered(step, sigma_value):
            candidates = {g: errors[g] for g in engine.config.granularities if g in errors
                          and self._servable(g, present)}
            decision.decision = choose_granularity(candidates, decision.costs, self.accumulated, engine.policy)
        if decision.decision == COMPUTE and step is not None and decision.growth:
            steps_left = max(engine.total_steps - engine.config.final_compute_steps - step - 1, 0)
            decision.forecast = forecast_reuse(decision.growth, decision.costs, engine.policy, steps_left)
        return decision

    def costs(self, present: list[int]) -> dict[str, float]:
        """Fraction of a full evaluation each granularity still runs (cfg: the cond rows' share)."""
        return {"step": 0.0, "cfg": 1.0 / max(len(present), 1), "block": self.engine.config.block_cost}

    def _triggered(self, step: int | None, sigma: float) -> bool:
        """Context-aware trigger: reuse may start once the warm-up has computed and two full computes
        calibrated the signals; never in the final steps, outside the window, at sigma ~ 0, or past
        the safety cap."""
        engine = self.engine
        if engine.too_few_steps:
            return False
        if step is None or not math.isfinite(sigma) or sigma < MIN_SIGMA or not self.signals.calibrated:
            return False
        if not engine.window.allows_reuse(step, engine.total_steps, 0):
            return False
        return not engine.policy.cap_reached(self.consecutive)

    def _servable(self, granularity: str, present: list[int]) -> bool:
        if not present or not all(b in self.history for b in present):
            return False
        if granularity == "cfg":
            return 0 in present and len(present) > 1
        if granularity == "block":
            return self.engine.block_off_reason is None and bool(self.block_groups) and \
                all(g.ready for g in self.block_groups.values())
        return True

    def _block_share(self) -> torch.Tensor | None:
        if "block" not in self.engine.config.granularities or self.signals.anchor_x is None:
            return None
        shares = [g.signals.share for g in self.block_groups.values() if g.signals.share is not None]
        if not shares:
            return None
        return torch.stack([s.to(self.signals.anchor_x.device) for s in shares]).max()

    def settle(self, decision: Decision) -> None:
        """Book what the evaluation did (after the model ran, or did not)."""
        if decision.decision == COMPUTE:
            self.forecast = list(decision.forecast)
            self.accumulated, self.consecutive, self.last_compute_step = 0.0, 0, decision.step
        else:
            error = decision.block_error if decision.decision == "block" else decision.errors.get(decision.decision, 0.0)
            self.accumulated += error
            self.consecutive += 1
            if self.forecast:
                self.forecast.pop(0)
        self._prefetch()

    def _prefetch(self) -> None:
        nxt = self.forecast[0] if self.forecast else None
        store = self.store
        if nxt in ("step", "cfg"):
            store.prefetch([self.step_key(b, p) for b in self.history for p in ("y", "yr", "dy")])
        elif nxt == "block":
            store.prefetch([k for k in store.keys() if k[0] == "block" and k[1] == self.key])

    # ------------------------------------------------------------------ step reuse
    def predict(self, branch: int, sigma: float) -> torch.Tensor:
        """The predicted output of ``branch`` at ``sigma`` (on the compute device)."""
        return self.predict_and_base(branch, sigma)[0]

    def predict_and_base(self, branch: int, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(prediction, the held base output it extrapolates from) for ``branch`` at ``sigma``."""
        engine, store = self.engine, self.store
        base_part = "yr" if branch in self.rebased else "y"
        base_sigma = self.rebased.get(branch, self.history[branch])
        y = engine.get("step", store, self.step_key(branch, base_part))
        dy = engine.get("step", store, self.step_key(branch, "dy")) if branch in self.slopes else None
        prediction = extrapolate(y, dy, sigma, base_sigma, engine.config.extrapolation)
        store.release(self.step_key(branch, base_part))
        store.release(self.step_key(branch, "dy"))
        return prediction, y

    def rebuild_branch(self, cond_output: torch.Tensor, branch: int, sigma: float) -> torch.Tensor:
        """cfg reuse: ``branch``'s output from the fresh cond output and the predicted difference."""
        return cond_output - (self.predict(0, sigma) - self.predict(branch, sigma))

    def record_compute(self, x: torch.Tensor, outputs: dict[int, torch.Tensor], sigma: float,
                       last_step: bool) -> None:
        """After a full compute: the signals (with hindsight), the outputs and the slopes."""
        if sigma < MIN_SIGMA:
            return
        hindsight = {b: self.predict_and_base(b, sigma) for b in outputs if b in self.history}
        complete = len(hindsight) == len(outputs)
        self.signals.observe_compute(x, outputs, {b: p for b, (p, _) in hindsight.items()} if complete else None,
                                     {b: y for b, (_, y) in hindsight.items()} if complete else None)
        engine, store = self.engine, self.store
        for b in list(self.rebased):
            store.drop(self.step_key(b, "yr"))
        self.rebased.clear()
        if last_step or engine.too_few_steps:
            return  # nothing reads a history after the final step, or in a run too short to reuse
        for b, v in outputs.items():
            if engine.config.extrapolation > 0 and b in self.history:
                previous = engine.get("step", store, self.step_key(b, "y"))
                dy = slope(v, previous, sigma, self.history[b]) if previous is not None else None
                store.release(self.step_key(b, "y"))
                if dy is not None:
                    engine.put("step", store, self.step_key(b, "dy"), dy, reuse_distance=1)
                    self.slopes.add(b)
            engine.put("step", store, self.step_key(b, "y"), v, reuse_distance=1)
            self.history[b] = sigma

    def rebase(self, outputs: dict[int, torch.Tensor], sigma: float) -> None:
        """Keep a partial compute's outputs as the base of later reuses. The signals' anchor stays at
        the last full compute, so the accumulated error still counts the parts that stayed stale."""
        if sigma < MIN_SIGMA:
            return
        for b, v in outputs.items():
            if b in self.history:
                self.engine.put("step", self.store, self.step_key(b, "yr"), v, reuse_distance=1)
                self.rebased[b] = sigma


class Evaluation:
    """One evaluation in flight, as the block hooks see it (possibly on several threads at once, as
    under ComfyUI's multi-GPU CFG split): the decision, the scratch of each row group, the outcome."""

    def __init__(self, trajectory: Trajectory, decision: Decision) -> None:
        self.trajectory = trajectory
        self.decision = decision
        self.lock = threading.Lock()
        self.groups_reused = 0
        self.groups_fell_back = 0
        self.fresh_errors: list[float] = []
        self._scratch: dict[Hashable, dict] = {}

    @property
    def kind(self) -> str:
        return self.decision.decision

    def scratch_for(self, group: Hashable) -> dict:
        with self.lock:
            return self._scratch.setdefault(group, {})


STREAMS = ("img", "txt")  # double-stream blocks carry a text stream beside the image tokens


class BlockReuse:
    """Middle-range block reuse, decided with fresh evidence; the host's block hooks call it.

    Per evaluation and row group (one model call's rows, each row with a key such as a
    cond uuid), the hooks report:

    1. ``model_input(h)`` at the model's first block (its hidden input);
    2. ``first_blocks_done(streams)`` when the cached range is about to run. In a block
       evaluation the drift of the first blocks' residual decides: reuse (True: the
       range's blocks must return their input, the last then ``add_residual``) or fall
       back to computing. In a compute evaluation the range's input is *cloned* (Flux-
       style blocks update their input in place, so a reference would be overwritten
       by the blocks it measures) when the forecast wants a residual;
    3. ``range_done(streams_out)`` after the range computed: ``output - input`` per row key
       and stream is stored (or an older residual dropped);
    4. ``model_output(h)`` after the model's last block, for the signals.
    """

    # The block signals see every 16th token and 4th channel: four such copies per evaluation are
    # 1/16 of one hidden state, in its own dtype (about 90 MiB for Wan 14B at 720p, batched CFG).
    TOKEN_STRIDE, CHANNEL_STRIDE = 16, 4

    def __init__(self, engine: HybridEngine) -> None:
        self.engine = engine

    def _sub(self, h: torch.Tensor) -> torch.Tensor:
        return subsample_tokens(h, self.TOKEN_STRIDE, self.CHANNEL_STRIDE)

    def group_state(self, evaluation: Evaluation, group: Hashable) -> BlockGroup:
        with self.engine.lock:
            return evaluation.trajectory.block_groups.setdefault(group, BlockGroup())

    def model_input(self, evaluation: Evaluation, group: Hashable, h: torch.Tensor) -> None:
        evaluation.scratch_for(group)["h0"] = self._sub(h)

    def first_blocks_done(self, evaluation: Evaluation, group: Hashable, streams: dict[str, torch.Tensor]) -> bool:
        """True when this group reuses the cached range (see the class docstring)."""
        scratch = evaluation.scratch_for(group)
        state = self.group_state(evaluation, group)
        engine, trajectory = self.engine, evaluation.trajectory
        img = streams["img"]
        first = self._first_residual(scratch, img)
        if evaluation.kind == "block":
            fresh = math.inf
            signals = trajectory.signals
            if state.ready and signals.k_out is not None and engine.block_off_reason is None:
                k_held = signals.k_out * signals.calibration.get("hold", 1.0)
                fresh = float(state.signals.fresh_error(first, k_held).item())
                self._learn(evaluation, fresh)
            if math.isfinite(fresh) and trajectory.accumulated + fresh <= engine.policy.budget:
                scratch["reuse"] = True
                with evaluation.lock:
                    evaluation.groups_reused += 1
                    evaluation.fresh_errors.append(fresh)
                return True
            with evaluation.lock:
                evaluation.groups_fell_back += 1
        scratch["first"] = first
        scratch["src_sub"] = self._sub(img)
        if (evaluation.decision.wants_block_residual or evaluation.kind == "block") and engine.block_off_reason is None:
            scratch["src"] = self._keep_input(evaluation, group, streams)
        return False

    def _keep_input(self, evaluation: Evaluation, group: Hashable, streams: dict[str, torch.Tensor]) -> dict:
        """The range's input, for ``output - input`` once the range has run. A copy, because Flux-style
        blocks update their input in place. With ``cpu`` placement it goes straight to the store (host
        memory, copied asynchronously) and comes back at the range's end, so caching the middle blocks
        holds no extra hidden state on the device while they run; otherwise a device clone."""
        engine = self.engine
        kept = {}
        for k, v in streams.items():
            if not isinstance(v, torch.Tensor):
                continue
            if engine.config.placement == "cpu":
                key = ("block_input", evaluation.trajectory.key, id(evaluation), group, k)
                engine.store_for(v.device).put(key, v.detach())
                kept[k] = key
            else:
                kept[k] = v.detach().clone()
        return kept

    def _input_back(self, kept, device: torch.device) -> torch.Tensor:
        if isinstance(kept, torch.Tensor):
            return kept
        store = self.engine.store_for(device)
        value = store.get(kept)
        store.drop(kept)
        return value

    def _first_residual(self, scratch: dict, img: torch.Tensor) -> torch.Tensor:
        """Subsampled residual of the blocks before the range (the range input itself when none run before
        it). HunyuanVideo's single stream appends text tokens: compare the image prefix."""
        h = self._sub(img)
        h0 = scratch.get("h0")
        if h0 is None or h0.shape[0] != h.shape[0] or h0.shape[2] != h.shape[2]:
            return h
        return h[:, :h0.shape[1]] - h0

    def _learn(self, evaluation: Evaluation, fresh: float) -> None:
        """Move the trajectory's block calibration towards what the fresh evidence says of the prediction."""
        estimate = evaluation.decision.block_estimate
        if math.isfinite(fresh) and math.isfinite(estimate) and estimate > 0:
            trajectory = evaluation.trajectory
            with self.engine.lock:
                trajectory.block_calibration = 0.5 * trajectory.block_calibration + 0.5 * (fresh / estimate)

    def range_done(self, evaluation: Evaluation, group: Hashable, row_keys: tuple,
                   streams_out: dict[str, torch.Tensor]) -> None:
        scratch = evaluation.scratch_for(group)
        if "src_sub" not in scratch:
            return
        state = self.group_state(evaluation, group)
        engine, trajectory = self.engine, evaluation.trajectory
        out_img = streams_out["img"]
        scratch["middle"] = self._sub(out_img) - scratch.pop("src_sub")
        src = scratch.pop("src", None)
        store = engine.store_for(out_img.device)
        if src is not None and engine.block_off_reason is not None:
            for kept in src.values():  # turned off mid-evaluation: the kept input goes
                if not isinstance(kept, torch.Tensor):
                    store.drop(kept)
            src = None
        if src is None:
            if state.ready:  # an older residual must never be reused after a newer compute
                for key in [("block", trajectory.key, r, k) for r in row_keys for k in STREAMS]:
                    store.drop(key)
                state.ready = False
            return
        for k, kept in src.items():
            after = streams_out.get(k)
            if not isinstance(after, torch.Tensor):
                continue
            before = self._input_back(kept, after.device)
            if before is None or after.shape != before.shape:
                continue
            residual = (after - before).detach()
            del before
            rows = residual.shape[0] // len(row_keys)
            forecast = evaluation.decision.forecast
            distance = forecast.index("block") + 1 if "block" in forecast else 1
            for i, r in enumerate(row_keys):
                engine.put("block", store, ("block", trajectory.key, r, k), residual[i * rows:(i + 1) * rows],
                           reuse_distance=distance)
        state.ready = True

    def add_residual(self, evaluation: Evaluation, row_keys: tuple, streams: dict[str, torch.Tensor]) -> dict:
        """The range's output in a reused group: each stream plus its cached residual, per row key."""
        engine, trajectory = self.engine, evaluation.trajectory
        out = dict(streams)
        for k, h in streams.items():
            if not isinstance(h, torch.Tensor):
                continue
            store = engine.store_for(h.device)
            rows = h.shape[0] // len(row_keys)
            parts = []
            for i, r in enumerate(row_keys):
                key = ("block", trajectory.key, r, k)
                residual = engine.get("block", store, key)
                part = h[i * rows:(i + 1) * rows]
                parts.append(part + residual.to(h.dtype) if residual is not None else part)
                store.release(key)
            out[k] = torch.cat(parts, dim=0)
        return out

    def model_output(self, evaluation: Evaluation, group: Hashable, h: torch.Tensor) -> None:
        scratch = evaluation.scratch_for(group)
        if "first" in scratch and "middle" in scratch:
            self.group_state(evaluation, group).signals.observe_compute(
                scratch.pop("first"), scratch.pop("middle"), self._sub(h), evaluation.decision.distance)

    def settle(self, evaluation: Evaluation) -> str:
        """What a block evaluation turned out to be: "block" when any group reused, else "compute"."""
        if evaluation.groups_reused == 0:
            return COMPUTE
        decision = evaluation.decision
        decision.block_error = max(evaluation.fresh_errors) if evaluation.fresh_errors else \
            decision.errors.get("block", 0.0)
        return "block"


class HybridEngine:
    """One run of the hybrid cache: its trajectories, stores (one per device) and report.

    total_steps: steps of the run's schedule; cfg_scale: the CFG scale (1 when unknown).
    store_factory(device) builds a store (a host adapter passes its free-memory reader and
    pinned-memory allocator); by default a plain ``CacheStore`` with ``config.placement``.
    """

    def __init__(self, config: EngineConfig, total_steps: int, cfg_scale: float, report: RunReport,
                 store_factory: Callable[[torch.device], CacheStore] | None = None) -> None:
        self.config = config
        self.total_steps = int(total_steps)
        self.cfg_scale = float(cfg_scale)
        self.report = report
        self.policy = HybridPolicy(budget=float(config.threshold), max_consecutive_reuse=config.max_consecutive_reuse)
        self.window = StepWindow(start_percent=config.start_percent, end_percent=config.end_percent,
                                 warmup_steps=config.warmup_steps, final_compute_steps=config.final_compute_steps,
                                 max_consecutive_reuse=0)
        self.report.cost_by_granularity.update({"step": 0.0, "cfg": 0.5, "block": config.block_cost})
        self.stores: dict[torch.device, CacheStore] = {}
        self.trajectories: dict[Hashable, Trajectory] = {}
        self.lock = threading.Lock()
        self.block_off_reason: str | None = None
        self.blocks = BlockReuse(self)
        self._store_factory = store_factory or (lambda d: CacheStore(d, StoreConfig(placement=config.placement)))
        self._notes: set[str] = set()
        reusable = self.total_steps - config.warmup_steps - config.final_compute_steps
        self.too_few_steps = self.total_steps <= FEW_STEPS or reusable < 2
        if self.too_few_steps and config.granularities and config.threshold > 0:
            self.note(f"{self.total_steps} steps: too few to reuse any safely (few-step and distilled runs change "
                      f"a lot per step), so every step computes; caching pays from about {FEW_STEPS + 2} steps")

    def note(self, text: str) -> None:
        with self.lock:
            if text not in self._notes:
                self._notes.add(text)
                self.report.notes.append(text)

    def store_for(self, device: torch.device) -> CacheStore:
        device = torch.device(device)
        with self.lock:
            store = self.stores.get(device)
            if store is None:
                store = self.stores[device] = self._store_factory(device)
            return store

    def trajectory(self, key: Hashable, device: torch.device) -> Trajectory:
        """The trajectory ``key`` (e.g. a context window) on ``device``, created on first use."""
        full_key = (key, str(device))
        with self.lock:
            trajectory = self.trajectories.get(full_key)
            if trajectory is None:
                trajectory = self.trajectories[full_key] = Trajectory(self, full_key, torch.device(device))
            return trajectory

    def put(self, granularity: str, store: CacheStore, key: Hashable, tensor: torch.Tensor,
            reuse_distance: float | None = None) -> None:
        """Store ``tensor``; ``reuse_distance``: evaluations until it is read (the store's placement hint)."""
        store.put(key, tensor, reuse_distance=reuse_distance)
        self.report.note_stored(granularity, store.nbytes(key))

    def get(self, granularity: str, store: CacheStore, key: Hashable) -> torch.Tensor | None:
        value = store.get(key)
        if value is not None:
            self.report.note_read(granularity, store.nbytes(key))
        return value

    def turn_block_off(self, reason: str) -> None:
        """Block reuse stops for the rest of the run (e.g. side inputs inside the block loop)."""
        if self.block_off_reason is None:
            self.block_off_reason = reason

    def finish(self, error: BaseException | None = None) -> RunReport:
        """Free every cache and pinned buffer; return the final report."""
        stats: dict = {}
        for store in self.stores.values():
            for k, v in store.stats.as_dict().items():
                stats[k] = stats.get(k, 0) + v if isinstance(v, (int, float)) else v
            for note in getattr(store, "notes", []) or []:
                self.note(note)
            store.clear(release_buffers=True)
        self.report.cache_stats = stats
        self.trajectories.clear()
        if self.block_off_reason:
            self.note(self.block_off_reason)
        if error is not None:
            self.note(f"run ended with {type(error).__name__}: {error}")
        return self.report


def planned_entries(config: EngineConfig, latent_shape: tuple, latent_dtype: torch.dtype, hidden_shape: tuple,
                    hidden_dtype: torch.dtype, branches: int, *, block_forecast: bool,
                    streams: int = 1) -> tuple[list[tuple], list[tuple]]:
    """What one trajectory of a run stores, and what the engine holds on the device while a full compute
    runs, without running anything (memory planning at full size, e.g. ``make memplan``).

    latent_shape / hidden_shape: one branch's latent ``[1, C, T, H, W]`` and hidden state at the cached
    block range ``[1, tokens, dim]``; branches: CFG branches evaluated; block_forecast: whether computes
    store a block residual (the forecast wants block reuse); streams: 2 for double-stream ranges.
    Returns ``(entries, working)``: entries are ``(kind, key, shape, dtype, reuse_distance)`` as the engine
    passes them to ``CacheStore.put``; working are ``(name, shape, dtype)`` device tensors.
    """
    entries: list[tuple] = []
    working: list[tuple] = []
    granularities = set(config.granularities)
    for b in range(branches):
        entries.append(("step", ("step", b, "y"), tuple(latent_shape), latent_dtype, 1))
        if config.extrapolation > 0:
            entries.append(("step", ("step", b, "dy"), tuple(latent_shape), latent_dtype, 1))
        if granularities & {"cfg", "block"}:
            entries.append(("step", ("step", b, "yr"), tuple(latent_shape), latent_dtype, 1))
    if "block" in granularities:
        batched = (hidden_shape[0] * branches,) + tuple(hidden_shape[1:])
        signal = (batched[0], -(-batched[1] // BlockReuse.TOKEN_STRIDE), -(-batched[2] // BlockReuse.CHANNEL_STRIDE))
        working += [(f"block signal copy {i}", signal, hidden_dtype) for i in range(4)]
        if block_forecast:
            for b in range(branches):
                for k in STREAMS[:streams]:
                    entries.append(("block", ("block", b, k), tuple(hidden_shape), hidden_dtype, 1))
            if config.placement != "cpu":
                working += [("input of the cached block range (clone)", batched, hidden_dtype)] * streams
    return entries, working
