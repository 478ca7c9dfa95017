"""deepcache (UNet branch caching) benchmark: speed, fidelity and cache bytes against KSampler and EasyCache.

Trained SD1.5 fixture (``fixtures.TRAINED_SD15_LINK``; 4x32x32 latents, a batch of 8 as frames, 25 euler
steps, CFG 5, several prompts and seeds), all through ComfyUI prompt graphs:

* ``unet_sd15_paired``: one process, paired timing. For every (prompt, seed) it runs KSampler, the
  LightCache Sampler at defaults (cache_mode deepcache) and ``EasyCache`` -> KSampler at each
  ``reuse_threshold`` back to back; speedup = median over pairs of KSampler seconds / config
  seconds; PSNR/SSIM in latent space against that pair's KSampler output; bytes held by the store.
* ``unet_sd15_ksampler`` / ``unet_sd15_deepcache``: one configuration per process for the framework's
  table (time, peak RSS, PSNR/SSIM vs the baseline's saved latents).
* ``unet_svd_paired``: tiny SVD (random weights, functional figure): measured speedup vs the
  speedup the schedule and the branch's computed-cost fraction predict (RunReport.estimated_speedup).

Plain functions ``run_<name>(params)`` work outside the framework too (they boot the host).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from bench.framework import BenchCase  # noqa: E402

SD15_PARAMS = {"prompts": [[0, 0], [5, 1], [2, 2]], "batch": 8, "steps": 25, "cfg": 5.0, "size": 256,
               "thresholds": [0.05, 0.1, 0.2, 0.3]}
SVD_PARAMS = {"batch": 8, "steps": 25, "cfg": 2.5, "size": 256, "repeats": 2}


def _graph(family: str, prompt_index: int, seed: int, params: dict, sampler: str = "KSampler", sampler_inputs=None,
           easycache: float | None = None):
    from harness import fixtures
    from harness.graphs import Graph, out

    fixture, cls, cond = {"sd15": (fixtures.TRAINED_SD15_LINK, "SD15", "trained_sd15"),
                          "svd": (fixtures.SVD_UNET, "SVD_img2vid", "svd")}[family]
    g = Graph()
    model = out(g.add("LightCacheTestUNetLoader", unet_name=fixture.name, family=cls))
    if easycache is not None:
        model = out(g.add("EasyCache", model=model, reuse_threshold=easycache, start_percent=0.15, end_percent=0.95,
                          verbose=False))
    size, batch = params["size"], params["batch"]
    c = g.add("LightCacheTestConditioning", family=cond, seed=seed, prompt_index=prompt_index, width=size, height=size,
              length=batch)
    lat = g.add("EmptyLatentImage", width=size, height=size, batch_size=batch)
    s = g.add(sampler, model=model, positive=out(c, 0), negative=out(c, 1), latent_image=out(lat), seed=seed,
              steps=params["steps"], cfg=params["cfg"], sampler_name="euler", scheduler="normal", denoise=1.0,
              **(sampler_inputs or {}))
    return g.prompt(), s


DEEPCACHE_DEFAULTS = {"cache_mode": "deepcache", "threshold": 0.3, "start_percent": 0.0, "end_percent": 1.0,
                      "cache_device": "auto"}


def _report(res, node) -> dict:
    ui = (res.ui or {}).get(node) or {}
    reports = ui.get("lightcache_report") or []
    return reports[0] if reports else {}


def _timed(ctx, prompt, node):
    res, m = ctx.measure(lambda: ctx.runner.run(prompt))
    return res, m


def _ctx():
    import tempfile

    from bench.framework import BenchContext

    return BenchContext(Path(tempfile.mkdtemp(prefix="bench-unet-")))


def case_sd15_paired(params: dict, ctx) -> dict:
    from lightcache_core.metrics import psnr, ssim

    p = {**SD15_PARAMS, **params}
    names = ["deepcache"] + [f"easycache_{t:g}" for t in p["thresholds"]]
    ratios = {n: [] for n in names}
    fid = {n: [] for n in names}
    held = []
    report_text = ""
    for prompt_index, seed in p["prompts"]:
        kp, kn = _graph("sd15", prompt_index, seed, p)
        ref_res, ref_m = _timed(ctx, kp, kn)
        ref = ref_res.output(kn)["samples"]
        for name in names:
            if name == "deepcache":
                gp, gn = _graph("sd15", prompt_index, seed, p, "LightCacheSampler", DEEPCACHE_DEFAULTS)
            else:
                gp, gn = _graph("sd15", prompt_index, seed, p, easycache=float(name.split("_")[1]))
            res, m = _timed(ctx, gp, gn)
            x = res.output(gn)["samples"]
            ratios[name].append(ref_m.seconds / m.seconds)
            fid[name].append((psnr(x, ref), ssim(x, ref)))
            if name == "deepcache":
                rep = _report(res, gn)
                held.append(rep.get("cache_stats", {}).get("held_bytes_max"))
                report_text = res.output(gn, 1)
    out = {"pairs": len(p["prompts"]), "held_bytes_max": held[-1] if held else None}
    for name in names:
        out[f"{name}_speedup"] = statistics.median(ratios[name])
        out[f"{name}_psnr"] = statistics.mean(f[0] for f in fid[name])
        out[f"{name}_ssim"] = statistics.mean(f[1] for f in fid[name])
    out["speedup"] = out["deepcache_speedup"]
    out["psnr"] = out["deepcache_psnr"]
    out["ssim"] = out["deepcache_ssim"]
    out["note_curve"] = "; ".join(f"{n}: {out[f'{n}_speedup']:.2f}x {out[f'{n}_psnr']:.2f} dB {out[f'{n}_ssim']:.4f}"
                                  for n in names)
    out["note_report"] = report_text.splitlines()[0] if report_text else ""
    return out


def case_sd15_single(params: dict, ctx) -> dict:
    p = {**SD15_PARAMS, **params}
    prompt_index, seed = p["prompts"][0]
    deep = params.get("mode") == "deepcache"
    gp, gn = _graph("sd15", prompt_index, seed, p, *(("LightCacheSampler", DEEPCACHE_DEFAULTS) if deep else ()))
    res, m = _timed(ctx, gp, gn)
    ctx.save_tensor("latent", res.output(gn)["samples"])
    out = {"seconds": m.seconds, "peak_bytes": m.peak_bytes}
    if deep:
        out["held_bytes_max"] = _report(res, gn).get("cache_stats", {}).get("held_bytes_max")
    return out


def case_svd_paired(params: dict, ctx) -> dict:
    from lightcache_core.metrics import psnr

    p = {**SVD_PARAMS, **params}
    ratios, predicted, timed, held, fid = [], [], [], [], []
    for r in range(p["repeats"]):
        kp, kn = _graph("svd", 0, r, p)
        ref_res, ref_m = _timed(ctx, kp, kn)
        gp, gn = _graph("svd", 0, r, p, "LightCacheSampler", DEEPCACHE_DEFAULTS)
        res, m = _timed(ctx, gp, gn)
        ratios.append(ref_m.seconds / m.seconds)
        rep = _report(res, gn)
        predicted.append(rep.get("estimated_speedup") or float("nan"))
        timed.append(rep.get("cache_stats", {}).get("predicted_speedup_measured_cost") or float("nan"))
        held.append(rep.get("cache_stats", {}).get("held_bytes_max"))
        fid.append(psnr(res.output(gn)["samples"], ref_res.output(kn)["samples"]))
    measured, pred = statistics.median(ratios), statistics.median(predicted)
    pred_t = statistics.median(timed)
    return {"speedup": measured, "predicted_speedup": pred, "measured_over_predicted": measured / pred,
            "predicted_speedup_call_timing": pred_t, "measured_over_predicted_call_timing": measured / pred_t,
            "held_bytes_max": held[-1], "psnr": statistics.mean(fid),
            "note_svd": f"measured {measured:.2f}x vs predicted {pred:.2f}x from the MAC estimate ({100 * (measured / pred - 1):+.1f}%), "
                        f"{pred_t:.2f}x from timed cache/full calls ({100 * (measured / pred_t - 1):+.1f}%)"}


def run_sd15_paired(params: dict | None = None) -> dict:
    return case_sd15_paired(params or {}, _ctx())


def run_sd15_single(params: dict | None = None) -> dict:
    return case_sd15_single(params or {}, _ctx())


def run_svd_paired(params: dict | None = None) -> dict:
    return case_svd_paired(params or {}, _ctx())


CASES = [
    BenchCase("unet_sd15_paired", "unet_sd15", case_sd15_paired, timeout_s=7200.0),
    BenchCase("unet_sd15_ksampler", "unet_sd15_single", case_sd15_single, {"mode": "ksampler"}, timeout_s=1800.0),
    BenchCase("unet_sd15_deepcache", "unet_sd15_single", case_sd15_single, {"mode": "deepcache"},
              baseline="unet_sd15_ksampler", compare_key="latent", timeout_s=1800.0),
    BenchCase("unet_svd_paired", "unet_svd", case_svd_paired, timeout_s=3600.0),
]
