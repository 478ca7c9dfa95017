"""LightCache Sampler vs KSampler vs ComfyUI's EasyCache on the TRAINED tiny Wan (issue 4 benchmark).

Every case runs in its own process (tests/bench/framework.py). Inside a case,
each (prompt, seed) pair is timed PAIRED: a KSampler run, then the variant,
alternating, so machine drift cancels; the speedup is
sum(KSampler seconds) / sum(variant seconds) of the sampler node. Fidelity
(PSNR/SSIM) is against that pair's KSampler latent (latent space; the fixture
has no VAE). Settings: 30 euler/simple steps, CFG 5, prompts x seeds below.

    python tests/bench/run.py sampler                 # all sampler cases
    python tests/bench/bench_sampler.py               # summary + acceptance from out/bench/results.json

Environment: LIGHTCACHE_BENCH_QUICK=1 uses 2 (prompt, seed) pairs instead of 8;
LIGHTCACHE_BENCH_THREADS=N sets torch's CPU threads (useful on a loaded machine).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.framework import RESULTS, BenchCase  # noqa: E402

GROUP = "sampler"
STEPS = 30
CFG = 5.0
PAIRS_FULL = [(p, s) for p in (0, 2, 5, 7) for s in (1, 2)]
PAIRS_QUICK = [(0, 1), (5, 2)]
EASYCACHE_THRESHOLDS = [0.05, 0.1, 0.2, 0.3, 0.5]  # 0.2 is EasyCache's default
OUR_MODES = ["off", "mix", "step", "cfg", "block"]


def _pairs() -> list[tuple[int, int]]:
    return PAIRS_QUICK if os.environ.get("LIGHTCACHE_BENCH_QUICK") == "1" else PAIRS_FULL


def _setup_threads() -> None:
    n = os.environ.get("LIGHTCACHE_BENCH_THREADS")
    if n:
        import torch

        torch.set_num_threads(int(n))


def _graph(kind: str, params: dict, prompt_index: int, seed: int):
    from harness import graphs

    if kind == "ksampler":
        return graphs.trained_wan(seed=seed, cfg=CFG, steps=STEPS, prompt_index=prompt_index)
    if kind == "easycache":
        patch = ("EasyCache", {"reuse_threshold": params["reuse_threshold"], "start_percent": 0.15,
                               "end_percent": 0.95, "verbose": False})
        return graphs.trained_wan(seed=seed, cfg=CFG, steps=STEPS, prompt_index=prompt_index, model_patches=[patch])
    inputs = {"cache_mode": params["cache_mode"], "threshold": params.get("threshold", 0.3),
              "start_percent": params.get("start_percent", 0.0), "end_percent": params.get("end_percent", 1.0),
              "cache_device": params.get("cache_device", "auto")}
    inputs.update(params.get("extra", {}))
    return graphs.trained_wan(seed=seed, cfg=CFG, steps=STEPS, prompt_index=prompt_index,
                              sampler="LightCacheSampler", sampler_inputs=inputs)


class _EasyCacheLog:
    """Reads EasyCache's 'skipped N/M steps' log line."""

    def __enter__(self):
        import logging

        self.lines: list[str] = []
        outer = self

        class H(logging.Handler):
            def emit(self, record):
                outer.lines.append(record.getMessage())

        self.h = H(level=logging.INFO)
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.setLevel(logging.INFO)
        self.root.addHandler(self.h)
        return self

    def __exit__(self, *exc):
        self.root.removeHandler(self.h)
        self.root.setLevel(self.level)

    def skipped(self) -> int | None:
        for line in reversed(self.lines):
            m = re.search(r"EasyCache - skipped (\d+)/(\d+)", line)
            if m:
                return int(m.group(1))
        return None


def run_variant(kind: str, params: dict, ctx) -> dict:
    """Paired KSampler/variant timing over all pairs; fidelity vs each pair's KSampler latent."""
    from harness import corelink  # noqa: F401  (lightcache_core importable)
    from lightcache_core.metrics import psnr, ssim

    _setup_threads()
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    runner = ctx.runner
    pairs = _pairs()
    # warm-up (file cache, allocator) outside the measured region
    p, ids = _graph("ksampler", {}, *pairs[0])
    runner.run(p)
    base_s, var_s, psnrs, ssims = [], [], [], []
    skipped: dict[str, int] = {}
    evaluations = computed = 0
    last_report = ""
    for i, (pi, seed) in enumerate(pairs):
        order = ("base", "var") if i % 2 == 0 else ("var", "base")  # alternate who goes first
        for which in order:
            if which == "base":
                p, ids = _graph("ksampler", {}, pi, seed)
                res = runner.run(p)
                base_s.append(res.node_seconds[ids["sampler"]])
                ref = res.output(ids["sampler"])["samples"]
            else:
                p, vids = _graph(kind, params, pi, seed)
                with _EasyCacheLog() as eclog:
                    vres = runner.run(p)
                var_s.append(vres.node_seconds[vids["sampler"]])
                out = vres.output(vids["sampler"])["samples"]
                if kind == "lightcache":
                    ui = (vres.ui.get(vids["sampler"]) or {}).get("lightcache_report", [{}])[0]
                    for g, n in (ui.get("reused_by_granularity") or {}).items():
                        skipped[g] = skipped.get(g, 0) + n
                    evaluations += ui.get("evaluations", 0) or 0
                    computed += ui.get("computed", 0) or 0
                    last_report = vres.output(vids["sampler"], 1)
                elif kind == "easycache":
                    n = eclog.skipped()
                    if n is not None:
                        skipped["step"] = skipped.get("step", 0) + 2 * n  # both branches skip
                        evaluations += 2 * STEPS
                        computed += 2 * (STEPS - n)
        psnrs.append(psnr(out, ref))
        ssims.append(ssim(out, ref))
        if i == 0:
            ctx.save_tensor("latent", out)
    finite = [v for v in psnrs if v != float("inf")]
    metrics = {
        "seconds": sum(var_s), "baseline_seconds": sum(base_s), "paired_speedup": sum(base_s) / sum(var_s),
        "psnr": (sum(finite) / len(finite)) if finite else float("inf"), "ssim": sum(ssims) / len(ssims),
        "pairs": len(pairs), "evaluations": evaluations, "computed_evaluations": computed,
        "skipped_by_granularity": skipped,
    }
    metrics["note_skipped"] = ", ".join(f"{g} {n}" for g, n in sorted(skipped.items())) or "none"
    metrics["note_paired"] = f"{metrics['paired_speedup']:.2f}x over {len(pairs)} paired runs"
    if last_report:
        metrics["note_timeline"] = " | ".join(last_report.splitlines()[:3])
    return metrics


def case_lightcache(params: dict, ctx) -> dict:
    return run_variant("lightcache", params, ctx)


def case_easycache(params: dict, ctx) -> dict:
    return run_variant("easycache", params, ctx)


CASES = [BenchCase(name=f"sampler/lightcache_{m}", group=GROUP, func=case_lightcache, params={"cache_mode": m},
                   timeout_s=3600) for m in OUR_MODES]
CASES += [BenchCase(name=f"sampler/easycache_{t}", group=GROUP, func=case_easycache, params={"reuse_threshold": t},
                    timeout_s=3600) for t in EASYCACHE_THRESHOLDS]


# ----------------------------------------------------------------------------- summary / acceptance

def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of PSNR at speedup ``x`` on a (speedup, psnr) curve; clamps at the ends."""
    pts = sorted(curve)
    if not pts:
        return None
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def summarize(results: dict) -> str:
    cases = results.get("cases", results)
    curve = [(e["paired_speedup"], e["psnr"]) for n, e in cases.items()
             if n.startswith("sampler/easycache_") and "paired_speedup" in e]
    lines = ["EasyCache curve (speedup, PSNR):  " + ", ".join(f"{s:.2f}x/{p:.1f}dB" for s, p in sorted(curve))]
    for mode in OUR_MODES:
        e = cases.get(f"sampler/lightcache_{mode}")
        if not e or "paired_speedup" not in e:
            continue
        ref = interpolate(curve, e["paired_speedup"])
        margin = None if ref is None or e["psnr"] == float("inf") else e["psnr"] - ref
        lines.append(f"{mode:>6}: {e['paired_speedup']:.2f}x  PSNR {e['psnr']:.2f} dB  SSIM {e['ssim']:.4f}  "
                     f"skipped {e.get('skipped_by_granularity')}"
                     + (f"  EasyCache@same speed {ref:.2f} dB -> margin {margin:+.2f} dB" if margin is not None else ""))
    mix = cases.get("sampler/lightcache_mix")
    off = cases.get("sampler/lightcache_off")
    if mix and "paired_speedup" in mix:
        ref = interpolate(curve, mix["paired_speedup"])
        ok = mix["paired_speedup"] >= 2.0 and ref is not None and mix["psnr"] >= ref + 3.0
        lines.append(f"acceptance (default mix >= 2x and >= EasyCache + 3 dB): {'PASS' if ok else 'FAIL'}")
    if off and "paired_speedup" in off:
        lines.append(f"cache_mode=off overhead: {100 * (1 / off['paired_speedup'] - 1):+.1f}% (limit +2%)")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "results.json"
    print(summarize(json.loads(path.read_text())))
