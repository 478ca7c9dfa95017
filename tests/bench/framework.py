"""`make bench`: each configuration in its own process, ratios against a baseline of the same run.

A benchmark module ``tests/bench/bench_<area>.py`` defines ``CASES``, a list
of :class:`BenchCase`. The parent process starts one child per case
(``python tests/bench/run.py --child <module> <case>``); the child boots the
ComfyUI host, runs the case function and writes its metrics (and any saved
tensors) to a scratch folder. The parent then prints one table per group
with ratios against the group's baseline case, and writes every figure to
``out/bench/results.json``.

Case functions receive ``(params, ctx)`` and return a dict of metrics. Useful
keys the tables understand: ``seconds`` (wall time of the measured region),
``peak_bytes`` (peak RSS of the region minus RSS just before it, or CUDA peak
allocated minus allocated before on CUDA), ``psnr``/``ssim``/``max_abs`` when a
case computes fidelity itself. Save a tensor with ``ctx.save_tensor(key, t)``:
for cases with ``compare_key`` the parent computes PSNR, SSIM and max |diff|
against the baseline case's tensor of the same key.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
RESULTS = Path(os.environ.get("LIGHTCACHE_BENCH_OUT", REPO / "out" / "bench"))


@dataclass(frozen=True)
class BenchCase:
    """One configuration: ``func(params, ctx) -> metrics`` run in a fresh process."""

    name: str
    group: str
    func: Callable[[dict, "BenchContext"], dict]
    params: dict = field(default_factory=dict)
    baseline: str | None = None  # case name in the same group; None = this is the baseline
    compare_key: str | None = None
    timeout_s: float = 900.0
    env: dict = field(default_factory=dict)  # extra environment for the child process (e.g. allocator settings)


@dataclass
class Measurement:
    """Wall seconds and peak memory (bytes above the level just before) of one region."""

    seconds: float
    peak_bytes: int
    before_bytes: int
    cuda: bool = False


def measure(fn: Callable[[], object]) -> tuple[object, Measurement]:
    """Run ``fn`` once; return its result and the region's wall time and peak memory.

    Peak memory comes from the core's ``PeakMemory`` (what the nodes report):
    CUDA peak allocated above the allocation before, else sampled RSS above
    the RSS before.
    """
    import gc

    import psutil
    import torch

    from harness import corelink  # noqa: F401
    from lightcache_core.memory_probe import PeakMemory

    gc.collect()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    process = psutil.Process()
    with PeakMemory(device, lambda: process.memory_info().rss) as probe:
        start = time.perf_counter()
        result = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return result, Measurement(seconds, probe.peak, probe.before, cuda=device == "cuda")


class BenchContext:
    """What a case function gets in its child process: the host, a runner, a tensor sink."""

    def __init__(self, scratch: Path) -> None:
        sys.path.insert(0, str(TESTS))
        from harness import corelink  # noqa: F401  (cases may import lightcache_core directly)
        from harness import fixtures, host

        self.models_dir = Path(os.environ.get("LIGHTCACHE_MODELS_DIR", host.CACHE / "models"))
        self.host = host.boot(self.models_dir)
        fixtures.ensure_fixtures(self.models_dir)
        self.scratch = scratch
        self._runner = None
        self.tensors: dict[str, str] = {}

    @property
    def runner(self):
        if self._runner is None:
            from harness.runner import InProcessRunner

            self._runner = InProcessRunner(self.host)
        return self._runner

    measure = staticmethod(measure)

    def save_tensor(self, key: str, tensor) -> None:
        import torch

        path = self.scratch / f"{key}.pt"
        torch.save(tensor.detach().cpu(), path)
        self.tensors[key] = str(path)


def discover(only: list[str] | None = None) -> list[tuple[str, BenchCase]]:
    """All ``(module, case)`` pairs from tests/bench/bench_*.py, filtered by group/module/name substrings."""
    sys.path.insert(0, str(TESTS))
    found = []
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        module = importlib.import_module(f"bench.{path.stem}")
        for case in getattr(module, "CASES", []):
            if only and not any(o in (path.stem, case.group) or o in case.name for o in only):
                continue
            found.append((path.stem, case))
    return found


def run_child(module_name: str, case_name: str, scratch: Path) -> None:
    """Child-process entry: run one case and write ``metrics.json`` into ``scratch``."""
    sys.path.insert(0, str(TESTS))
    module = importlib.import_module(f"bench.{module_name}")
    case = next(c for c in module.CASES if c.name == case_name)
    ctx = BenchContext(scratch)
    metrics = case.func(dict(case.params), ctx)
    (scratch / "metrics.json").write_text(json.dumps({"metrics": metrics, "tensors": ctx.tensors}, default=float))


def _fidelity(ours: str, ref: str) -> dict:
    import psutil
    import torch

    from harness import corelink  # noqa: F401  (puts lightcache_core on sys.path)
    from lightcache_core.metrics import psnr, ssim

    a, b = torch.load(ours).float(), torch.load(ref).float()
    if a.shape != b.shape:
        return {"fidelity_error": f"shape {tuple(a.shape)} vs {tuple(b.shape)}"}
    return {"psnr": psnr(a, b), "ssim": ssim(a, b), "max_abs": float((a - b).abs().max())}


def run_all(only: list[str] | None = None) -> dict:
    """Parent entry: run every case in its own process, print tables, write results JSON."""
    cases = discover(only)
    if not cases:
        raise SystemExit(f"no benchmark cases match {only}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    workdir = Path(tempfile.mkdtemp(prefix="lightcache-bench-"))
    for module_name, case in cases:
        scratch = workdir / case.name.replace("/", "_")
        scratch.mkdir(parents=True, exist_ok=True)
        print(f"[bench] {case.group:>14} | {case.name} ...", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(Path(__file__).with_name("run.py")), "--child", module_name, case.name, str(scratch)],
                              capture_output=True, text=True, timeout=case.timeout_s, env={**os.environ, **case.env})
        entry: dict = {"group": case.group, "baseline": case.baseline, "params": case.params, "process_seconds": time.perf_counter() - start}
        if proc.returncode != 0:
            entry["error"] = (proc.stderr or proc.stdout)[-3000:]
            print(f"[bench]   FAILED:\n{entry['error']}", flush=True)
        else:
            data = json.loads((scratch / "metrics.json").read_text())
            entry.update(data["metrics"])
            entry["_tensors"] = data["tensors"]
        results[case.name] = entry
    for name, entry in results.items():
        case = next(c for _, c in cases if c.name == name)
        base = results.get(case.baseline) if case.baseline else None
        if case.compare_key and base and case.compare_key in entry.get("_tensors", {}) and case.compare_key in base.get("_tensors", {}):
            for k, v in _fidelity(entry["_tensors"][case.compare_key], base["_tensors"][case.compare_key]).items():
                entry.setdefault(k, v)
        if base and "error" not in entry and "error" not in base:
            if entry.get("seconds") and base.get("seconds"):
                entry["speedup_vs_baseline"] = base["seconds"] / entry["seconds"]
            if entry.get("peak_bytes") and base.get("peak_bytes"):
                entry["memory_ratio_vs_baseline"] = entry["peak_bytes"] / base["peak_bytes"]
    for entry in results.values():
        entry.pop("_tensors", None)
    payload = {"machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                           "cuda": _cuda_name()}, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": results}
    out_path = RESULTS / "results.json"
    if only and out_path.exists():  # a partial run updates, not replaces, the last full results
        previous = json.loads(out_path.read_text())
        previous.get("cases", {}).update(results)
        payload["cases"] = previous.get("cases", results)
    out_path.write_text(json.dumps(payload, indent=2, default=float))
    print_tables(results)
    for module_name in dict.fromkeys(m for m, _ in cases):  # each area's own summary / acceptance lines
        summarize = getattr(importlib.import_module(f"bench.{module_name}"), "summarize", None)
        if callable(summarize):
            print(f"\n== {module_name} summary ==\n{summarize(payload)}")
    print(f"\n[bench] results written to {out_path}")
    return payload


def _cuda_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


COLUMNS = [("seconds", "time s", "{:.3f}"), ("speedup_vs_baseline", "speedup", "{:.2f}x"), ("peak_bytes", "peak MiB", None),
           ("memory_ratio_vs_baseline", "mem ratio", "{:.2f}"), ("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
           ("max_abs", "max|diff|", "{:.2e}")]


def print_tables(results: dict) -> None:
    groups: dict[str, list[tuple[str, dict]]] = {}
    for name, entry in results.items():
        groups.setdefault(entry["group"], []).append((name, entry))
    for group, rows in groups.items():
        cols = [c for c in COLUMNS if any(c[0] in e for _, e in rows)]
        extra = sorted({k for _, e in rows for k, v in e.items() if k.startswith("note_")})
        print(f"\n== {group} ==")
        header = ["case"] + [c[1] for c in cols]
        table = [header]
        for name, e in rows:
            if "error" in e:
                table.append([name] + ["FAILED"] + [""] * (len(cols) - 1))
                continue
            row = [name]
            for key, _, fmt in cols:
                v = e.get(key)
                if v is None or isinstance(v, str):
                    row.append("" if v is None else str(v))
                elif fmt is None:
                    row.append(f"{v / 2**20:.1f}")
                else:
                    row.append(fmt.format(v))
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        for _, e in rows:
            for k in extra:
                if k in e:
                    print(f"  {k[5:]}: {e[k]}")


def median(values: list[float]) -> float:
    return statistics.median(values)


__all__ = ["BenchCase", "BenchContext", "Measurement", "measure", "median", "run_all", "run_child", "discover", "asdict"]
