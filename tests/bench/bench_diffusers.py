"""LightCache from diffusers against diffusers' own cache hooks, on tiny diffusers pipelines (`make bench BENCH=diffusers`).

Pipelines (tests/harness/tiny_diffusers.py; no download):

* Wan: ``WanPipeline`` on the TRAINED tiny Wan 2.1 fixture (../shared/fixtures/tiny-wan-trained/:
  a 6-block, dim-256 ``WanTransformer3DModel`` whose ComfyUI / original-Wan state dict is converted by
  diffusers' ``convert_wan_transformer_to_diffusers``; ``trained_wan_pipeline``), the fixture's prompt
  embeddings (class c = ``EMB[c]``, negative = ``EMB[8]``), 30 flow-matching euler steps at shift 5,
  CFG 5 (diffusers calls the transformer once per branch, in ``cache_context("cond"/"uncond")``),
  128x128x17 (latent 16x5x16x16), 3 (class, seed) pairs;
* SVD: ``StableVideoDiffusionPipeline`` with a tiny ``UNetSpatioTemporalConditionModel`` built from a
  config with RANDOM weights, 25 euler steps, 64x64x8, 2 pairs (diffusers has no cache hook for UNets:
  LightCache's DeepCache only).

Every configuration runs in its own process (tests/bench/framework.py). In it, per pair, the
plain pipeline and the configuration run back to back (who goes first alternates), after one
warm-up of each. Reported:

* counted speedup: module evaluations of the plain pipeline / of the configuration, counted
  where the work happens (Wan: every block's self-attention ``to_q``, cross-attention ``to_q``
  and FFN; SVD: every UNet resnet), so hooks that skip whole blocks (FirstBlockCache, MagCache,
  SeaCache, LightCache) and hooks that skip attention only (PyramidAttentionBroadcast,
  FasterCache, TaylorSeer) count alike; deterministic;
* measured speedup: median over pairs of plain seconds / configuration seconds (pipeline call,
  ``output_type="latent"``, one torch thread: the models are so small that a second thread only
  waits on the first on a shared 2-core machine);
* PSNR / SSIM of the final latent against the same pair's plain latent;
* peak memory: peak RSS of one warm configuration call above the RSS before it (CPU; glibc's
  mmap threshold held at 128 KiB, see docs/DEVELOPING.md), and for LightCache the bytes its
  cache held (``RunReport.cache_stats``).

diffusers' hooks run at their documented defaults, each as the docs enable it
(``transformer.enable_cache(Config())``): ``PyramidAttentionBroadcastConfig`` and
``FasterCacheConfig`` need ``current_timestep_callback`` (``lambda: pipe.current_timestep``,
as documented); ``MagCacheConfig`` needs model-specific ``mag_ratios``, obtained as documented
by a ``calibrate=True`` run (another prompt and seed) with ``num_inference_steps`` = the run's.
FasterCache cannot run on WanPipeline (it needs CFG's two branches batched in one call; see
``_unsupported``): its row says so.

    python tests/bench/run.py diffusers                 # every case (~10 minutes on 2 cores)
    python tests/bench/bench_diffusers.py               # the table + acceptance from out/bench/results.json
    LIGHTCACHE_BENCH_QUICK=1 ...                        # one pair per family
"""
from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from bench.framework import RESULTS, BenchCase  # noqa: E402

GROUP = "diffusers"
WAN = {"steps": 30, "cfg": 5.0, "size": 128, "frames": 17, "shift": 5.0, "pairs": [(0, 1), (2, 2), (5, 3)],
       "quick": [(0, 1)], "calibration": (7, 9)}  # size / frames: the trained fixture's (latent 16x5x16x16)
SVD = {"steps": 25, "size": 64, "frames": 8, "pairs": [(0, 1), (3, 2)], "quick": [(0, 1)]}
LIGHTCACHE_MIX = [0.05, 0.1, 0.2, 0.3, 0.6, 1.0]
DEFAULT_THRESHOLD = 0.6
HOOKS = ("FirstBlockCache", "PyramidAttentionBroadcast", "FasterCache", "MagCache", "TaylorSeerCache", "SeaCache",
         "TextKVCache")
ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _pairs(spec: dict) -> list:
    return spec["quick"] if os.environ.get("LIGHTCACHE_BENCH_QUICK") == "1" else spec["pairs"]


# ----------------------------------------------------------------------------- the two pipelines


def _wan(params: dict):
    from harness import tiny_diffusers as tiny

    pipe = tiny.trained_wan_pipeline(shift=WAN["shift"])
    emb, _ = tiny.trained_wan_prompts()
    units = [m for b in pipe.transformer.blocks for m in (b.attn1.to_q, b.attn2.to_q, b.ffn)]

    def run(prompt: int, seed: int):
        return tiny.run_trained_wan(pipe, prompt=prompt, seed=seed, steps=WAN["steps"], guidance=WAN["cfg"], emb=emb)
    return pipe, units, run


def _svd(params: dict):
    from harness import tiny_diffusers as tiny

    pipe = tiny.svd_pipeline()

    def run(prompt: int, seed: int):
        return tiny.run_svd(pipe, prompt=prompt, seed=seed, steps=SVD["steps"], size=SVD["size"], frames=SVD["frames"])
    return pipe, tiny.unet_block_units(pipe.unet), run


FAMILIES = {"wan": (_wan, WAN), "svd": (_svd, SVD)}


# ----------------------------------------------------------------------------- configurations


def _hook_config(name: str, pipe, run) -> object:
    """diffusers' config of hook ``name`` at its documented defaults (see the module docstring)."""
    import diffusers.hooks as hooks

    timestep = {"current_timestep_callback": lambda: pipe.current_timestep}
    if name == "MagCache":
        return hooks.MagCacheConfig(mag_ratios=_calibrate_mag_ratios(pipe, run), num_inference_steps=WAN["steps"])
    if name in ("PyramidAttentionBroadcast", "FasterCache"):
        return getattr(hooks, f"{name}Config")(**timestep)
    return getattr(hooks, f"{name}Config")()


def _calibrate_mag_ratios(pipe, run) -> list[float]:
    """MagCache's documented calibration: a ``calibrate=True`` run prints the ratios to copy (cond context's)."""
    import diffusers.hooks as hooks

    pipe.transformer.enable_cache(hooks.MagCacheConfig(calibrate=True, num_inference_steps=WAN["steps"]))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            run(*WAN["calibration"])
    finally:
        pipe.transformer.disable_cache()
    arrays = [line for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[Mag")]
    if not arrays:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(arrays[0])]


@contextlib.contextmanager
def _installed(kind: str, params: dict, pipe, run):
    """The configuration on ``pipe`` for the duration of the block; yields a holder of LightCache's handle."""
    holder = {"handle": None}
    if kind == "plain":
        yield holder
    elif kind == "lightcache":
        from lightcache_core.diffusers_adapter import apply_lightcache

        holder["settings"] = {k: v for k, v in params.items() if k in ("mode", "threshold", "interval", "cache_device")}
        holder["handle"] = apply_lightcache(pipe, **holder["settings"])
        try:
            yield holder
        finally:
            holder["handle"].remove()
    elif kind == "hook":
        config = _hook_config(params["hook"], pipe, run)
        pipe.transformer.enable_cache(config)
        try:
            yield holder
        finally:
            pipe.transformer.disable_cache()
    else:
        raise ValueError(kind)


def case(params: dict, ctx) -> dict:
    import torch

    from harness import tiny_diffusers as tiny
    from lightcache_core.metrics import psnr, ssim

    torch.set_num_threads(1)
    build, spec = FAMILIES[params["family"]]
    pipe, units, run = build(params)
    pairs = _pairs(spec)
    kind = params["kind"]

    def timed(prompt, seed):
        with tiny.count_calls(units) as counts:
            start = time.perf_counter()
            out = run(prompt, seed)
            seconds = time.perf_counter() - start
        return out, seconds, counts["calls"]

    if kind == "hook":
        import diffusers
        import diffusers.hooks

        if not hasattr(diffusers.hooks, f"{params['hook']}Config"):
            return {"note_absent": f"diffusers {diffusers.__version__} has no {params['hook']}Config"}
    if kind == "plain":  # the baseline: its own figures, and how much of the output the block stack carries
        timed(*pairs[0])
        _, measurement = ctx.measure(lambda: run(*pairs[0]))
        seconds = [timed(p, s)[1] for p, s in pairs]
        metrics = {"seconds": statistics.median(seconds), "peak_bytes": measurement.peak_bytes, "pairs": len(pairs)}
        if params["family"] == "wan":
            metrics["block_stack_share"] = _block_stack_share(pipe, run, pairs[0])
        return metrics

    timed(*pairs[0])  # warm-up of the plain pipeline
    try:
        with _installed(kind, params, pipe, run) as holder:
            timed(*pairs[0])  # warm-up of the configuration (and of its one-off set-up)
            ratios, psnrs, ssims, plain_calls, var_calls, reports = [], [], [], 0, 0, []
            for i, (prompt, seed) in enumerate(pairs):
                results = {}
                for which in (("plain", "var") if i % 2 == 0 else ("var", "plain")):
                    if which == "plain":
                        with _suspended(kind, holder, pipe):
                            results[which] = timed(prompt, seed)
                    else:
                        results[which] = timed(prompt, seed)
                        if holder["handle"] is not None and holder["handle"].last_report is not None:
                            reports.append(holder["handle"].last_report)
                (ref, ref_s, ref_n), (out, out_s, out_n) = results["plain"], results["var"]
                ratios.append(ref_s / out_s)
                plain_calls += ref_n
                var_calls += out_n
                psnrs.append(psnr(out, ref))
                ssims.append(ssim(out, ref))
            _, measurement = ctx.measure(lambda: run(*pairs[0]))
    except Exception as exc:  # a hook that cannot run this pipeline is a row with the reason, not a crash
        reason = _unsupported(params, exc)
        if reason:
            return {"note_unsupported": reason}
        return {"note_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    finite = [v for v in psnrs if math.isfinite(v)]
    metrics = {"counted_speedup": plain_calls / max(var_calls, 1), "measured_speedup": statistics.median(ratios),
               "psnr": statistics.mean(finite) if finite else float("inf"), "ssim": statistics.mean(ssims),
               "peak_bytes": measurement.peak_bytes, "pairs": len(pairs)}
    if reports:
        reused: dict = {}
        for r in reports:
            for g, n in r.reused_by_granularity().items():
                reused[g] = reused.get(g, 0) + n
        metrics["reused_by_granularity"] = reused
        stats = reports[-1].cache_stats
        metrics["cache_bytes"] = max(stats.get("held_bytes_max", 0),
                                     stats.get("peak_device_bytes", 0) + stats.get("host_bytes", 0))
        metrics["note_timeline"] = " | ".join(f"{b}: {t}" for b, t in reports[-1].timeline_strings().items())
    return metrics


def _unsupported(params: dict, exc: Exception) -> str | None:
    """The one-line reason when ``exc`` is a known limitation of a diffusers hook on this pipeline, else None.

    FasterCache (diffusers/hooks/faster_cache.py) assumes classifier-free guidance runs both branches in one
    batch, [uncond; cond]: its attention hook caches ``output.chunk(2, dim=0)[1]`` (the cond half) whenever the
    batch equals the first call's. WanPipeline calls the transformer once per branch with batch 1, so
    ``chunk(2)`` returns one tensor and ``[1]`` raises IndexError on the first block."""
    if params.get("hook") == "FasterCache" and isinstance(exc, IndexError):
        return ("not supported by diffusers on WanPipeline: FasterCache needs CFG's uncond+cond batched in one "
                "call, WanPipeline runs them as two batch-1 calls (IndexError in faster_cache.py chunk(2)[1])")
    return None


@contextlib.contextmanager
def _suspended(kind: str, holder: dict, pipe):
    """The plain pipeline for one paired call: LightCache's hooks out (and back in after), diffusers' cache off."""
    if kind == "plain":
        yield
        return
    if kind == "lightcache":
        from lightcache_core.diffusers_adapter import apply_lightcache

        holder["handle"].remove()
        try:
            yield
        finally:
            holder["handle"] = apply_lightcache(pipe, **holder["settings"])
        return
    config = pipe.transformer._cache_config
    pipe.transformer.disable_cache()
    try:
        yield
    finally:
        pipe.transformer.enable_cache(config)


def _block_stack_share(pipe, run, pair) -> float:
    """mean |blocks' output - blocks' input| / mean |blocks' output| over one plain run: how much of the hidden
    state the transformer blocks change (the rest is the patch embedding of this step's input)."""
    shares = []
    blocks = pipe.transformer.blocks
    state = {}

    def first(module, args):
        state["h0"] = args[0].detach()

    def last(module, args, output):
        h0 = state.pop("h0", None)
        if h0 is not None:
            shares.append(float((output - h0).abs().mean() / (output.abs().mean() + 1e-12)))

    handles = [blocks[0].register_forward_pre_hook(first), blocks[-1].register_forward_hook(last)]
    try:
        run(*pair)
    finally:
        for h in handles:
            h.remove()
    return statistics.mean(shares)


def _cases() -> list[BenchCase]:
    cases = []

    def add(name, family, kind, **params):
        baseline = None if kind == "plain" else f"diffusers/{family}_plain"
        cases.append(BenchCase(name=f"diffusers/{name}", group=GROUP, func=case, baseline=baseline, timeout_s=1800,
                               params={"family": family, "kind": kind, **params}, env=dict(ENV)))

    add("wan_plain", "wan", "plain")
    for t in LIGHTCACHE_MIX:
        add(f"wan_lightcache_mix_{t}", "wan", "lightcache", mode="mix", threshold=t)
    for mode in ("step", "cfg", "block"):
        add(f"wan_lightcache_{mode}", "wan", "lightcache", mode=mode, threshold=DEFAULT_THRESHOLD)
    for hook in HOOKS:
        add(f"wan_{hook}", "wan", "hook", hook=hook)
    add("svd_plain", "svd", "plain")
    for interval in (2, 3, 4):
        add(f"svd_lightcache_deepcache_i{interval}", "svd", "lightcache", mode="deepcache", interval=interval)
    return cases


CASES = _cases()


# ----------------------------------------------------------------------------- summary / acceptance


def _rows(cases: dict, family: str) -> list[tuple[str, dict]]:
    return sorted(((n, e) for n, e in cases.items() if n.startswith(family + "_") and not n.endswith("_plain")),
                  key=lambda kv: kv[1].get("counted_speedup", 0.0))


def summarize(results: dict) -> str:
    cases = {k[len("diffusers/"):]: v for k, v in results.get("cases", results).items() if k.startswith("diffusers/")}
    lines = []
    for family, title in (("wan", f"tiny Wan 2.1 pipeline (TRAINED fixture tiny-wan-trained), {WAN['steps']} steps, "
                                  f"CFG {WAN['cfg']:g}, shift {WAN['shift']:g}, "
                                  f"{WAN['size']}x{WAN['size']}x{WAN['frames']}"),
                          ("svd", f"tiny SVD pipeline (RANDOM weights), {SVD['steps']} steps, "
                                  f"{SVD['size']}x{SVD['size']}x{SVD['frames']}")):
        rows = _rows(cases, family)
        if not rows:
            continue
        plain = cases.get(f"{family}_plain", {})
        lines.append(f"{title}; plain pipeline {plain.get('seconds', float('nan')):.2f} s, peak "
                     f"{plain.get('peak_bytes', 0) / 2**20:.1f} MiB")
        lines.append(f"  | configuration | counted | measured | PSNR dB | SSIM | peak MiB | cache held | reused |")
        lines.append(f"  |---|---|---|---|---|---|---|---|")
        for n, e in rows:
            label = n[len(family) + 1:]
            if "note_absent" in e:
                lines.append(f"  | {label} | not in this diffusers | | | | | | |")
                continue
            if "note_unsupported" in e:
                lines.append(f"  | {label} | {e['note_unsupported']} | | | | | | |")
                continue
            if "note_error" in e or "error" in e:
                lines.append(f"  | {label} | failed: {e.get('note_error') or e.get('error', '')[-200:].strip()} "
                             f"| | | | | | |")
                continue
            cache = e.get("cache_bytes")
            lines.append(f"  | {label} | {e['counted_speedup']:.2f}x | {e['measured_speedup']:.2f}x | "
                         f"{e['psnr']:.2f} | {e['ssim']:.4f} | {e.get('peak_bytes', 0) / 2**20:.1f} | "
                         f"{'' if cache is None else f'{cache / 2**10:.0f} KiB'} | "
                         f"{e.get('reused_by_granularity', '') or ''} |")
        share = plain.get("block_stack_share")
        if share is not None:
            lines.append(f"  the blocks change the hidden state by {100 * share:.1f} % of its magnitude on average "
                         f"(the rest is this step's patch embedding)")
    lines += _acceptance(cases)
    return "\n".join(lines)


def _acceptance(cases: dict) -> list[str]:
    ours = [(e["counted_speedup"], e["psnr"], n) for n, e in _rows(cases, "wan")
            if n.startswith("wan_lightcache") and "counted_speedup" in e]
    hooks = [(e["counted_speedup"], e["psnr"], n) for n, e in _rows(cases, "wan")
             if not n.startswith("wan_lightcache") and "counted_speedup" in e]
    lines = []
    if not ours or not hooks:
        return lines
    present = [h for h in HOOKS if f"wan_{h}" in cases and "note_absent" not in cases[f"wan_{h}"]]
    unsupported = [h for h in present if "note_unsupported" in cases[f"wan_{h}"]]
    failed = [h for h in present if "counted_speedup" not in cases[f"wan_{h}"] and h not in unsupported]
    lines.append(f"diffusers cache hooks in this diffusers: {', '.join(present)}"
                 + (f" (not supported on WanPipeline: {', '.join(unsupported)})" if unsupported else "")
                 + (f" (failed on Wan: {', '.join(failed)})" if failed else ""))
    useful = [h for h in hooks if h[0] >= 1.05]
    verdicts = []
    for speed, quality, name in sorted(useful, key=lambda h: -h[1]):
        matched = [o for o in ours if o[0] >= speed - 1e-9]
        best = max(matched, key=lambda o: o[1]) if matched else None
        ok = best is not None and best[1] >= quality
        verdicts.append(ok)
        lines.append(f"  vs {name[4:]} ({speed:.2f}x counted, {quality:.2f} dB): LightCache at >= {speed:.2f}x "
                     + (f"best {best[1]:.2f} dB ({best[2][4:]}, {best[0]:.2f}x): {'>=' if ok else '<'}" if best
                        else "has no configuration that fast"))
    if useful:
        top = max(useful, key=lambda h: h[1])
        ok = verdicts[0]
        lines.append(f"acceptance (tiny Wan, TRAINED fixture: LightCache PSNR >= the best hook's, {top[2][4:]} at "
                     f"{top[0]:.2f}x / {top[1]:.2f} dB, at a matched or higher counted speedup): {'PASS' if ok else 'FAIL'}")
        if not ok:  # only what the figures show, no cause
            matched = [o for o in ours if o[0] >= top[0] - 1e-9]
            best = max(matched, key=lambda o: o[1]) if matched else None
            lines.append(f"  why: at >= {top[0]:.2f}x counted, "
                         + (f"LightCache's best PSNR is {best[1]:.2f} dB ({best[2][4:]}), {top[1] - best[1]:.2f} dB "
                            f"below {top[2][4:]}'s {top[1]:.2f} dB" if best else "LightCache has no configuration")
                         + " on these 3 (class, seed) pairs")
    return lines


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "results.json"
    print(summarize(json.loads(path.read_text())))
