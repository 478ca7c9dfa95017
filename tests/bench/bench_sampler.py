"""Speed against fidelity (Pareto) of LightCache Sampler on the TRAINED tiny models, through ComfyUI.

Wan: trained tiny Wan 2.1, 30 euler/simple steps, CFG 5, 8 (prompt, seed) pairs.
UNet: trained tiny SD1.5, a batch of 8 latents as frames, 25 euler/normal steps, CFG 5, 3 pairs.

Every configuration runs in its own process (tests/bench/framework.py). Per pair, KSampler and the
configuration run back to back (who goes first alternates), and two speeds are reported:

* counted speedup: transformer-block (Wan) or UNet-block (SD1.5) evaluations of KSampler divided
  by those of the configuration, per batch row, counted with forward hooks on the blocks
  (deterministic, independent of machine load); the Pareto comparisons use this one;
* measured speedup: the median over pairs of KSampler seconds / configuration seconds (the
  sampler node's wall time), which shows what the per-evaluation bookkeeping costs.

Fidelity: PSNR / SSIM of the latent against that pair's KSampler latent.

Baselines implemented here, not in the pack:
* ``uniform k``: the fixed schedule any adaptive policy must beat at equal compute: compute the
  first 3 steps, the last step and every k-th step; every other step reuses the last computed
  residual (model output - input, per cond uuid), a DIFFUSION_MODEL wrapper of a test-only node;
* ComfyUI's own EasyCache at several ``reuse_threshold`` values.

    python tests/bench/run.py sampler            # every case (about 15 minutes on 2 cores)
    python tests/bench/bench_sampler.py          # the Pareto table + acceptance from out/bench/results.json
    LIGHTCACHE_BENCH_QUICK=1 ...                 # 2 pairs instead of 8 (Wan) / 1 instead of 3 (UNet)
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.framework import RESULTS, BenchCase  # noqa: E402
from harness.model_nodes import ModelPatchNode  # noqa: E402

GROUP = "sampler"
WAN = {"steps": 30, "cfg": 5.0, "pairs": [(p, s) for p in (0, 2, 5, 7) for s in (1, 2)], "quick": [(0, 1), (5, 2)]}
SD15 = {"steps": 25, "cfg": 5.0, "batch": 8, "size": 256, "pairs": [(0, 0), (5, 1), (2, 2)], "quick": [(0, 0)]}
MIX_THRESHOLDS = [0.1, 0.2, 0.3, 0.6, 1.0, 1.5, 2.5]
DEFAULT_THRESHOLD = 0.6
UNIFORM_K = [2, 3, 4, 5, 6]
EASYCACHE = [0.05, 0.1, 0.2]
DEEPCACHE_THRESHOLDS = [0.3, 0.6, 0.9, 1.2]


# ----------------------------------------------------------------------------- test-only pieces

class UniformScheduleNode(ModelPatchNode):
    """MODEL -> MODEL: the fixed uniform reuse schedule (the baseline of the issue), never shipped."""

    EXTRA_INPUTS = {"k": ("INT", {"default": 2, "min": 1, "max": 100, "tooltip": "compute every k-th step"})}

    def patch(self, model, k):
        import comfy.patcher_extension
        import torch

        from lightcache_core.schedules import step_index_for_sigma

        state: dict = {}

        def outer(executor, *args, **kwargs):
            sigmas = args[3] if len(args) > 3 else kwargs["sigmas"]
            state.clear()
            state["sigmas"] = sigmas.detach().cpu()
            try:
                return executor(*args, **kwargs)
            finally:
                state.clear()

        def forward(executor, *args, **kwargs):
            to = kwargs.get("transformer_options") or next(a for a in reversed(args) if isinstance(a, dict))
            x = args[0]
            sigmas = state["sigmas"]
            total = sigmas.numel() - 1
            step = step_index_for_sigma(sigmas, to["sigmas"])
            uuids = list(to.get("uuids") or [])
            compute = step is None or step < 3 or step >= total - 1 or step % k == 0
            n = x.shape[0] // max(len(uuids), 1)
            if not compute and all(u in state for u in uuids):
                return torch.cat([x[i * n:(i + 1) * n] + state[u] for i, u in enumerate(uuids)], dim=0)
            out = executor(*args, **kwargs)
            for i, u in enumerate(uuids):
                state[u] = (out[i * n:(i + 1) * n] - x[i * n:(i + 1) * n]).detach()
            return out

        m = model.clone()
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "lightcache_bench_uniform", outer)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "lightcache_bench_uniform", forward)
        return (m,)


def _block_classes() -> list[type]:
    import importlib

    found = []
    for module, names in (("comfy.ldm.wan.model", ("WanAttentionBlock",)),
                          ("comfy.ldm.flux.layers", ("DoubleStreamBlock", "SingleStreamBlock")),
                          ("comfy.ldm.modules.diffusionmodules.openaimodel", ("ResBlock",)),
                          ("comfy.ldm.modules.attention", ("SpatialTransformer",))):
        mod = importlib.import_module(module)
        found += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return found


@contextlib.contextmanager
def count_block_rows():
    """Counts block evaluations per batch row (a batched-CFG call of 2 rows counts 2).

    The block classes' ``forward`` is wrapped at class level for the duration: one extra Python call per
    block (a global module hook would add one per sub-module and slow the uncached runs more than the
    cached ones, skewing the measured speedup). Layers DeepCache skips have an instance-level ``forward``
    and are therefore not counted.
    """
    counts = {"rows": 0}
    originals = {}

    def counting(original):
        def forward(self, *args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            counts["rows"] += int(x.shape[0])
            return original(self, *args, **kwargs)
        return forward

    for cls in _block_classes():
        originals[cls] = cls.__dict__["forward"]
        cls.forward = counting(originals[cls])
    try:
        yield counts
    finally:
        for cls, original in originals.items():
            cls.forward = original


# ----------------------------------------------------------------------------- graphs

def _pairs(spec: dict) -> list:
    return spec["quick"] if os.environ.get("LIGHTCACHE_BENCH_QUICK") == "1" else spec["pairs"]


def wan_graph(kind: str, params: dict, prompt_index: int, seed: int):
    from harness import graphs

    common = dict(seed=seed, cfg=WAN["cfg"], steps=WAN["steps"], prompt_index=prompt_index)
    if kind == "ksampler":
        return graphs.trained_wan(**common)
    if kind == "uniform":
        return graphs.trained_wan(**common, model_patches=[("LightCacheBenchUniform", {"k": params["k"]})])
    if kind == "easycache":
        patch = ("EasyCache", {"reuse_threshold": params["reuse_threshold"], "start_percent": 0.15,
                               "end_percent": 0.95, "verbose": False})
        return graphs.trained_wan(**common, model_patches=[patch])
    return graphs.trained_wan(**common, sampler="LightCacheSampler", sampler_inputs=_lightcache_inputs(params))


def _lightcache_inputs(params: dict) -> dict:
    inputs = {"cache_mode": params["cache_mode"], "threshold": params.get("threshold", DEFAULT_THRESHOLD),
              "start_percent": 0.0, "end_percent": 1.0, "cache_device": params.get("cache_device", "auto")}
    inputs.update(params.get("extra", {}))
    return inputs


def sd15_graph(kind: str, params: dict, prompt_index: int, seed: int):
    from harness import fixtures
    from harness.graphs import Graph, out

    g = Graph()
    model = out(g.add("LightCacheTestUNetLoader", unet_name=fixtures.TRAINED_SD15_LINK.name, family="SD15"))
    if kind == "easycache":
        model = out(g.add("EasyCache", model=model, reuse_threshold=params["reuse_threshold"], start_percent=0.15,
                          end_percent=0.95, verbose=False))
    c = g.add("LightCacheTestConditioning", family="trained_sd15", seed=seed, prompt_index=prompt_index,
              width=SD15["size"], height=SD15["size"], length=SD15["batch"])
    lat = g.add("EmptyLatentImage", width=SD15["size"], height=SD15["size"], batch_size=SD15["batch"])
    lightcache = kind == "lightcache"
    s = g.add("LightCacheSampler" if lightcache else "KSampler", model=model, positive=out(c, 0), negative=out(c, 1),
              latent_image=out(lat), seed=seed, steps=SD15["steps"], cfg=SD15["cfg"], sampler_name="euler",
              scheduler="normal", denoise=1.0, **(_lightcache_inputs(params) if lightcache else {}))
    return g.prompt(), {"sampler": s}


GRAPHS = {"wan": (wan_graph, WAN), "sd15": (sd15_graph, SD15)}


# ----------------------------------------------------------------------------- one configuration

def register_test_nodes(host) -> None:
    host.nodes.NODE_CLASS_MAPPINGS.setdefault("LightCacheBenchUniform", UniformScheduleNode)


def evaluate(runner, family: str, kind: str, params: dict, pairs: list, timed: bool = True) -> dict:
    """Counted and (when ``timed``) measured speedup, PSNR and SSIM of one configuration over ``pairs``."""
    from lightcache_core.metrics import psnr, ssim

    graph, spec = GRAPHS[family]
    ratios, psnrs, ssims, base_rows, var_rows, granularity = [], [], [], 0, 0, {}
    last_report = ""
    for i, (prompt_index, seed) in enumerate(pairs):
        results = {}
        order = ("base", "var") if i % 2 == 0 else ("var", "base")
        for which in order:
            p, ids = graph("ksampler" if which == "base" else kind, params, prompt_index, seed)
            with count_block_rows() as counts:
                res = runner.run(p)
            results[which] = (res, ids, counts["rows"])
        (bres, bids, brows), (vres, vids, vrows) = results["base"], results["var"]
        ref, out = bres.output(bids["sampler"])["samples"], vres.output(vids["sampler"])["samples"]
        base_rows += brows
        var_rows += vrows
        psnrs.append(psnr(out, ref))
        ssims.append(ssim(out, ref))
        if timed:
            ratios.append(bres.node_seconds[bids["sampler"]] / vres.node_seconds[vids["sampler"]])
        if kind == "lightcache":
            ui = (vres.ui.get(vids["sampler"]) or {}).get("lightcache_report", [{}])[0]
            for g, n in (ui.get("reused_by_granularity") or {}).items():
                granularity[g] = granularity.get(g, 0) + n
            last_report = vres.output(vids["sampler"], 1)
    finite = [v for v in psnrs if v != float("inf")]
    metrics = {"counted_speedup": base_rows / max(var_rows, 1), "psnr": statistics.mean(finite) if finite else float("inf"),
               "ssim": statistics.mean(ssims), "pairs": len(pairs), "reused_by_granularity": granularity}
    if timed:
        metrics["measured_speedup"] = statistics.median(ratios)
    if last_report:
        metrics["note_timeline"] = " | ".join(last_report.splitlines()[:3])
    return metrics


def case(params: dict, ctx) -> dict:
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False
    register_test_nodes(ctx.host)
    family = params["family"]
    graph, spec = GRAPHS[family]
    pairs = _pairs(spec)
    p, _ = graph("ksampler", {}, *pairs[0])  # warm-up outside the measured region
    ctx.runner.run(p)
    return evaluate(ctx.runner, family, params["kind"], params, pairs)


def _cases() -> list[BenchCase]:
    cases = []

    def add(name, **params):
        cases.append(BenchCase(name=f"sampler/{name}", group=GROUP, func=case, params=params, timeout_s=3600))

    add("wan_lightcache_off", family="wan", kind="lightcache", cache_mode="off")
    for t in MIX_THRESHOLDS:
        add(f"wan_mix_{t}", family="wan", kind="lightcache", cache_mode="mix", threshold=t)
    for mode in ("step", "cfg", "block"):
        add(f"wan_{mode}", family="wan", kind="lightcache", cache_mode=mode)
    for k in UNIFORM_K:
        add(f"wan_uniform_k{k}", family="wan", kind="uniform", k=k)
    for t in EASYCACHE:
        add(f"wan_easycache_{t}", family="wan", kind="easycache", reuse_threshold=t)
    for t in DEEPCACHE_THRESHOLDS:
        add(f"sd15_deepcache_{t}", family="sd15", kind="lightcache", cache_mode="deepcache", threshold=t)
    add("sd15_auto", family="sd15", kind="lightcache", cache_mode="auto")
    for t in EASYCACHE:
        add(f"sd15_easycache_{t}", family="sd15", kind="easycache", reuse_threshold=t)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------- summary / acceptance

def interpolate(curve: list[tuple[float, float]], x: float) -> float | None:
    """PSNR of a (speedup, PSNR) curve at speedup ``x`` (linear between points); None outside the curve."""
    pts = sorted(curve)
    if not pts or x < pts[0][0] - 1e-9 or x > pts[-1][0] + 1e-9:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def frontier_at(curve: list[tuple[float, float]], x: float) -> float | None:
    """Best PSNR of a Pareto frontier (``_upper_curve``) at speedup ``x``: interpolated inside it, the
    slowest point's PSNR below it (that point is both faster and better), None above its fastest point."""
    pts = sorted(curve)
    if pts and x < pts[0][0]:
        return pts[0][1]
    return interpolate(pts, x)


def _upper_curve(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier: for each speedup the best PSNR reached at that speedup or more."""
    best, out = float("-inf"), []
    for x, y in sorted(points, reverse=True):
        if y > best:
            best = y
            out.append((x, y))
    return sorted(out)


def summarize(results: dict) -> str:
    cases = {k[len("sampler/"):]: v for k, v in results.get("cases", results).items()
             if k.startswith("sampler/") and "counted_speedup" in v}
    lines = []
    for family, title in (("wan", "trained tiny Wan 2.1, 30 euler steps, CFG 5"),
                          ("sd15", "trained tiny SD1.5 UNet, 25 euler steps, CFG 5, batch 8")):
        rows = sorted(((n, e) for n, e in cases.items() if n.startswith(family + "_")),
                      key=lambda kv: kv[1]["counted_speedup"])
        if not rows:
            continue
        lines.append(f"Pareto: {title} (counted = block evaluations; measured = paired wall time, median)")
        lines.append(f"  {'configuration':<26}{'counted':>9}{'measured':>10}{'PSNR dB':>9}{'SSIM':>8}  reused")
        for n, e in rows:
            measured = e.get("measured_speedup")
            lines.append(f"  {n[len(family) + 1:]:<26}{e['counted_speedup']:>8.2f}x"
                         f"{(f'{measured:.2f}x' if measured else '-'):>10}{e['psnr']:>9.2f}{e['ssim']:>8.4f}  "
                         f"{e.get('reused_by_granularity') or ''}")
    lines += _acceptance(cases)
    return "\n".join(lines)


def _acceptance(cases: dict) -> list[str]:
    lines = []
    mix = [(e["counted_speedup"], e["psnr"]) for n, e in cases.items() if n.startswith("wan_mix_")]
    uniform = {n: e for n, e in cases.items() if n.startswith("wan_uniform_")}
    if mix and uniform:
        mix_curve = _upper_curve(mix)
        worst = None
        for n, e in sorted(uniform.items(), key=lambda kv: kv[1]["counted_speedup"]):
            ours = frontier_at(mix_curve, e["counted_speedup"])
            margin = None if ours is None else ours - e["psnr"]
            worst = margin if worst is None or margin is None or (worst is not None and margin < worst) else worst
            lines.append(f"  mix vs {n[4:]}: {e['counted_speedup']:.2f}x counted, uniform {e['psnr']:.2f} dB, mix "
                         + ("no point that fast" if ours is None else f"{ours:.2f} dB ({margin:+.2f} dB)"))
        ok = worst is not None and worst >= 3.0
        lines.append(f"acceptance (mix >= uniform + 3 dB at every uniform speedup): {'PASS' if ok else 'FAIL'}")
        margins = {}
        for mode in ("step", "cfg", "block"):
            e = cases.get(f"wan_{mode}")
            if e:
                ours = frontier_at(mix_curve, e["counted_speedup"])
                if ours is not None:
                    margins[mode] = ours - e["psnr"]
                lines.append(f"  mix vs {mode} alone at {e['counted_speedup']:.2f}x: {e['psnr']:.2f} dB, mix "
                             + ("no point that fast" if ours is None else f"{ours:.2f} dB ({ours - e['psnr']:+.2f})"))
        if margins:
            ok = min(margins.values()) >= 0.0 and max(margins.values()) >= 1.0
            lines.append(f"acceptance (mix at or above each single mode, >= 1 dB above one): {'PASS' if ok else 'FAIL'} "
                         f"(worst {min(margins.values()):+.2f} dB, best {max(margins.values()):+.2f} dB)")
    default = cases.get(f"wan_mix_{DEFAULT_THRESHOLD}")
    if default:
        ok = default["counted_speedup"] >= 2.5 and default["psnr"] >= 36.0
        lines.append(f"acceptance (default >= 2.5x counted at >= 36 dB): {'PASS' if ok else 'FAIL'} "
                     f"({default['counted_speedup']:.2f}x, {default['psnr']:.2f} dB)")
        if default.get("measured_speedup"):
            gap = default["measured_speedup"] / default["counted_speedup"]
            lines.append(f"  default measured/counted: {gap:.2f} (target >= 0.80 on a quiet machine)")
    off = cases.get("wan_lightcache_off")
    if off and off.get("measured_speedup"):
        lines.append(f"cache_mode=off time vs KSampler: {100 * (1 / off['measured_speedup'] - 1):+.1f}% (limit +2%), "
                     f"PSNR {off['psnr']}")
    auto, deep = cases.get("sd15_auto"), cases.get(f"sd15_deepcache_{DEFAULT_THRESHOLD}")
    if auto and deep:
        ok = auto["counted_speedup"] >= 2.2 and auto["psnr"] >= deep["psnr"] - 1.0
        lines.append(f"acceptance (SD1.5 defaults within 1 dB of deepcache at >= 2.2x): {'PASS' if ok else 'FAIL'} "
                     f"({auto['counted_speedup']:.2f}x, {auto['psnr']:.2f} dB vs {deep['psnr']:.2f} dB)")
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "results.json"
    print(summarize(json.loads(path.read_text())))
