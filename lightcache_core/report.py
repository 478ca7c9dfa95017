"""Run reports: what each model evaluation did, and a short human-readable summary.

A ``RunReport`` collects one ``EvalRecord`` per model evaluation (per step and CFG
branch), turns them into counts, an estimated speedup and a one-letter timeline, and
serialises to text/JSON for node outputs and logs.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field

GRANULARITY_CODES: dict[str, str] = {
    "full": "C",
    "step": "S",
    "cfg": "G",
    "block": "B",
    "deepcache": "D",
}

DEFAULT_COSTS: dict[str, float] = {"full": 1.0, "step": 0.0, "cfg": 0.5, "block": 0.3, "deepcache": 0.25}


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"``; ``0`` -> ``"0 B"`` (binary units)."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024.0
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class EvalRecord:
    """One model evaluation.

    step: sampler step index; sigma: noise level; branch: "cond", "uncond", "batch"...;
    decision: "compute" or "reuse"; granularity: "full" (computed) or the reuse kind
    ("step", "cfg", "block", "deepcache"); seconds: wall time of the evaluation.
    """

    step: int
    sigma: float
    branch: str
    decision: str
    granularity: str
    seconds: float = 0.0

    @property
    def code(self) -> str:
        """One-letter timeline code: C (compute), S, G (cfg/guidance), B, D."""
        if self.decision == "compute":
            return "C"
        return GRANULARITY_CODES.get(self.granularity, "?")


@dataclass
class RunReport:
    """Per-run record of compute/reuse decisions plus cache statistics.

    node / mode: which node and caching mode produced the run.
    total_steps: sampler steps.  cache_stats: ``CacheStats.as_dict()`` (bytes).
    schedule: full-compute steps when the mode has a fixed schedule.
    cost_by_granularity: cost of one evaluation relative to a full compute, used by
        ``estimated_speedup`` (a "full" compute costs ``cost["full"]``); the result is
        a cost-model estimate, and every text that shows it says so.
    bytes_stored / bytes_read: per granularity, bytes the run put into its cache and
        bytes it read back from it (a cache that is stored and never read is waste).
    model_rows_run: batch rows the model's trunk really evaluated (counted where the
        model runs, not where the decision is taken), None when not counted.
    """

    node: str
    mode: str
    total_steps: int
    records: list[EvalRecord] = field(default_factory=list)
    cache_stats: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    schedule: list[int] | None = None
    cost_by_granularity: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_COSTS))
    bytes_stored: dict[str, int] = field(default_factory=dict)
    bytes_read: dict[str, int] = field(default_factory=dict)
    model_rows_run: int | None = None

    def note_stored(self, granularity: str, nbytes: int) -> None:
        """Count ``nbytes`` put into the cache for ``granularity``."""
        self.bytes_stored[granularity] = self.bytes_stored.get(granularity, 0) + int(nbytes)

    def note_read(self, granularity: str, nbytes: int) -> None:
        """Count ``nbytes`` read back from the cache for ``granularity``."""
        self.bytes_read[granularity] = self.bytes_read.get(granularity, 0) + int(nbytes)

    def add(self, *args, **kwargs) -> EvalRecord:
        """Append a record: ``add(EvalRecord(...))`` or ``add(step, sigma, branch,
        decision, granularity, seconds=0.0)`` (positional or keyword).  Returns it."""
        if len(args) == 1 and not kwargs and isinstance(args[0], EvalRecord):
            record = args[0]
        else:
            record = EvalRecord(*args, **kwargs)
        self.records.append(record)
        return record

    def computed_count(self) -> int:
        """Evaluations that ran the model fully."""
        return sum(1 for r in self.records if r.decision == "compute")

    def reused_count(self) -> int:
        """Evaluations that reused cached features (any granularity)."""
        return sum(1 for r in self.records if r.decision != "compute")

    def reused_by_granularity(self) -> dict[str, int]:
        """Reuse counts keyed by granularity, e.g. ``{"step": 10, "cfg": 14}``."""
        return dict(Counter(r.granularity for r in self.records if r.decision != "compute"))

    def estimated_speedup(self) -> float:
        """Evaluations / cost in full-compute equivalents (1.0 with no records;
        ``inf`` when nothing had a cost)."""
        if not self.records:
            return 1.0
        cost = 0.0
        for r in self.records:
            key = "full" if r.decision == "compute" else r.granularity
            cost += self.cost_by_granularity.get(key, 1.0)
        return len(self.records) / cost if cost > 0 else math.inf

    def timeline(self) -> list[dict]:
        """One cell per evaluation in order: ``{"step", "branch", "g"}`` with ``g`` in
        C/S/G/B/D (compute/step/cfg/block/deepcache)."""
        return [{"step": r.step, "branch": r.branch, "g": r.code} for r in self.records]

    def timeline_strings(self) -> dict[str, str]:
        """Per-branch strings of codes in step order, e.g. ``{"cond": "CSSCSS"}``."""
        lines: dict[str, list[str]] = {}
        for r in self.records:
            lines.setdefault(r.branch, []).append(r.code)
        return {branch: "".join(codes) for branch, codes in lines.items()}

    def summary_line(self) -> str:
        """First line of ``to_text``."""
        reused = self.reused_by_granularity()
        detail = ", ".join(f"{g} {n}" for g, n in sorted(reused.items(), key=lambda kv: -kv[1]))
        speedup = self.estimated_speedup()
        speedup_text = "inf" if math.isinf(speedup) else f"{speedup:.2f}x"
        line = (f"LightCache {self.mode}: {self.total_steps} steps, {len(self.records)} evaluations; "
                f"computed {self.computed_count()}, reused {self.reused_count()}"
                + (f" ({detail})" if detail else "") + f"; est. speedup {speedup_text} (cost-model estimate)")
        if self.cache_stats:
            s = self.cache_stats
            line += (f"; cache: {s.get('entries', 0)} entries, {format_bytes(s.get('host_bytes', 0))} on host, "
                     f"peak {format_bytes(s.get('peak_device_bytes', 0))} on the compute device")
        return line

    def to_text(self) -> str:
        """Compact multi-line summary: counts line, per-branch timelines, schedule, notes."""
        lines = [self.summary_line()]
        for branch, codes in self.timeline_strings().items():
            lines.append(f"  {branch:>7}: {codes}")
        if self.records:
            lines.append("  legend: C compute, S step reuse, G cfg reuse, B block reuse, D deepcache")
        if self.schedule is not None:
            lines.append(f"  full steps: {self.schedule}")
        for g in sorted(set(self.bytes_stored) | set(self.bytes_read)):
            lines.append(f"  {g} cache: stored {format_bytes(self.bytes_stored.get(g, 0))}, "
                         f"read back {format_bytes(self.bytes_read.get(g, 0))}")
        if self.model_rows_run is not None:
            lines.append(f"  the model trunk ran {self.model_rows_run} batch-row evaluations")
        waits = self.cache_stats.get("prefetch_wait_s") if self.cache_stats else None
        if waits:
            lines.append(f"  prefetch wait: {waits:.4f} s")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict: fields, records, and derived counts (speedup None if inf)."""
        speedup = self.estimated_speedup()
        return {
            "node": self.node,
            "mode": self.mode,
            "total_steps": self.total_steps,
            "evaluations": len(self.records),
            "computed": self.computed_count(),
            "reused": self.reused_count(),
            "reused_by_granularity": self.reused_by_granularity(),
            "estimated_speedup": None if math.isinf(speedup) else speedup,
            "speedup_is_estimate": True,
            "bytes_stored": dict(self.bytes_stored),
            "bytes_read": dict(self.bytes_read),
            "model_rows_run": self.model_rows_run,
            "schedule": list(self.schedule) if self.schedule is not None else None,
            "cache_stats": dict(self.cache_stats),
            "notes": list(self.notes),
            "cost_by_granularity": dict(self.cost_by_granularity),
            "timeline": self.timeline(),
            "records": [asdict(r) for r in self.records],
        }

    def to_json(self) -> str:
        """``to_dict`` as JSON text."""
        return json.dumps(self.to_dict())


@dataclass
class DecodeReport:
    """How a latent video was decoded.

    slices: decode calls; frames_per_slice: latent frames per call; peak_bytes: peak
    device memory during decode (bytes); seconds: wall time; path: which decoder path
    ran (e.g. "sliced", "tiled", "full").
    """

    slices: int
    frames_per_slice: int
    peak_bytes: int
    seconds: float
    path: str
    notes: list[str] = field(default_factory=list)

    def to_text(self) -> str:
        """One line plus notes."""
        lines = [f"LightCache decode ({self.path}): {self.slices} slices x {self.frames_per_slice} frames; "
                 f"peak {format_bytes(self.peak_bytes)}; {self.seconds:.2f} s"]
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)
