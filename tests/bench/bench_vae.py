"""Sliced VAE Decode vs VAEDecode vs VAEDecodeTiled on the tiny Wan 2.1 VAE (dim 16).

Size: 81 frames (21 latent) at the largest frame that decodes in about a minute on a small CPU; set
``LIGHTCACHE_BENCH_VAE_SIZE=HxW`` (pixels) to change it, e.g. ``480x832`` on a fast machine or GPU, and
``LIGHTCACHE_BENCH_VAE_FRAMES`` for the latent frame count.

Two kinds of process, so that time and memory do not disturb each other:

* ``vae/time``: ONE process decodes the same latent with the three nodes side by side, round robin,
  ``LIGHTCACHE_BENCH_VAE_REPEATS`` times (default 3) after one warm-up decode each; a node's time is its
  median, and its ratio is median node / median VAEDecode, so drift on a shared machine hits all alike.
* ``vae/<node>``: one process per node for its peak decode memory: peak RSS minus RSS before (on CUDA:
  ``max_memory_allocated`` above the allocation before), after one warm-up decode by the same node of a
  2-latent-frame clip, so a library's one-time set-up is not counted as decode memory. On CPU these
  processes run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's own starting threshold, held fixed): every
  freed block of 128 KiB or more then goes back to the OS, so RSS follows the memory the decode holds,
  which is what CUDA's ``max_memory_allocated`` counts. With glibc's adaptive default the heap keeps what
  earlier work freed, and RSS says more about the process's history than about the decode (measured: a
  warmed-up process showed 1.6 MiB for a whole Sliced VAE Decode). The frames these processes decode give
  max |diff| and PSNR against VAEDecode.

    python tests/bench/run.py vae          # these cases
    python tests/bench/bench_vae.py        # summary + acceptance from out/bench/results.json
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.framework import RESULTS, BenchCase  # noqa: E402

SIZE = os.environ.get("LIGHTCACHE_BENCH_VAE_SIZE", "96x160")
HEIGHT, WIDTH = (int(v) for v in SIZE.lower().split("x"))
LATENT_FRAMES = int(os.environ.get("LIGHTCACHE_BENCH_VAE_FRAMES", "21"))
REPEATS = int(os.environ.get("LIGHTCACHE_BENCH_VAE_REPEATS", "3"))
THREADS = int(os.environ.get("LIGHTCACHE_BENCH_THREADS", "1"))
PARAMS = {"height": HEIGHT, "width": WIDTH, "latent_frames": LATENT_FRAMES, "seed": 0}
WARMUP_FRAMES = 2
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}  # see the module docstring

GROUP = "vae_decode"
NODES = ["VAEDecode", "VAEDecodeTiled-defaults", "SlicedVAEDecode-defaults", "SlicedVAEDecode-whole-frames"]


def _setup(params):
    import torch

    if THREADS > 0 and not torch.cuda.is_available():
        torch.set_num_threads(THREADS)  # steadier CPU timings on a shared machine
    import comfy.model_management as mm
    import nodes
    from harness import fixtures

    vae = nodes.VAELoader().load_vae(fixtures.WAN_VAE.name)[0]
    mm.load_models_gpu([vae.patcher])
    return vae


def _latent(params, frames: int):
    import torch

    z = torch.randn(1, 16, params["latent_frames"], params["height"] // 8, params["width"] // 8,
                    generator=torch.Generator().manual_seed(params["seed"]))
    return {"samples": z[:, :, :frames]}


def _decoder(name: str, vae):
    """``latent -> (IMAGE, report or None)`` for one of NODES, each at its defaults."""
    import nodes

    if name == "VAEDecode":
        return lambda latent: (nodes.VAEDecode().decode(vae, latent)[0], None)
    if name == "VAEDecodeTiled-defaults":
        # VAEDecodeTiled's defaults: tile 512, overlap 64, temporal 64 frames, temporal overlap 8.
        return lambda latent: (nodes.VAEDecodeTiled().decode(vae, latent, 512, 64, 64, 8)[0], None)
    sliced = next(m for n, m in sys.modules.items() if n.endswith(".nodes.vae_node")).SlicedVAEDecode
    row_chunks = 1 if name.endswith("whole-frames") else 0

    def run(latent):
        out = sliced.execute(latent, vae, row_chunks=row_chunks)
        return out.result[0], out.result[1]

    return run


def run_memory(params, ctx) -> dict:
    """One node in its own process: warm-up on a short clip, then peak decode memory of the full clip."""
    import torch

    vae = _setup(params)
    decode = _decoder(params["node"], vae)
    with torch.inference_mode():
        decode(_latent(params, WARMUP_FRAMES))
        latent = _latent(params, params["latent_frames"])
        (images, report), m = ctx.measure(lambda: decode(latent))
    ctx.save_tensor("images", images)
    metrics = {"peak_bytes": m.peak_bytes, "frames": int(images.shape[0]),
               "output_bytes": images.numel() * images.element_size(), "memory_env": MEMORY_ENV}
    if report:
        metrics["note_report"] = report
    return metrics


def run_time(params, ctx) -> dict:
    """All timed nodes in one process, round robin; medians and ratios against VAEDecode."""
    import time

    import torch

    vae = _setup(params)
    names = NODES[:3]
    decoders = {n: _decoder(n, vae) for n in names}
    latent = _latent(params, params["latent_frames"])
    seconds: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            decoders[n](_latent(params, WARMUP_FRAMES))
        for _ in range(params["repeats"]):
            for n in names:
                start = time.perf_counter()
                images, _ = decoders[n](latent)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                seconds[n].append(time.perf_counter() - start)
                del images
    med = {n: statistics.median(v) for n, v in seconds.items()}
    ratios = {n: med[n] / med["VAEDecode"] for n in names}
    note = "  ".join(f"{n} {med[n]:.2f} s ({ratios[n]:.2f}x)" for n in names)
    return {"seconds": med["SlicedVAEDecode-defaults"], "median_seconds": med, "all_seconds": seconds,
            "time_ratio_vs_vaedecode": ratios, "note_medians": f"{note}  [median of {params['repeats']}]"}


SVD_PARAMS = {"frames": 14, "latent_size": 8, "slices": [7, 4, 1], "seed": 14}


def run_svd_slices(params, ctx) -> dict:
    """SVD's temporal decoder mixes the frames of the chunk it decodes: how far slices smaller than VAE
    Decode's chunk move the frames (full-size random-weight SVD VAE fixture; auto is exact)."""
    import torch

    import nodes
    from harness import fixtures
    from lightcache_core.metrics import psnr

    if THREADS > 0 and not torch.cuda.is_available():
        torch.set_num_threads(THREADS)
    fixtures.ensure_fixtures(ctx.models_dir, (fixtures.SVD_VAE,))
    vae = nodes.VAELoader().load_vae(fixtures.SVD_VAE.name)[0]
    sliced = next(m for n, m in sys.modules.items() if n.endswith(".nodes.vae_node")).SlicedVAEDecode
    size = params["latent_size"]
    latent = {"samples": torch.randn(params["frames"], 4, size, size,
                                     generator=torch.Generator().manual_seed(params["seed"]))}
    with torch.inference_mode():
        ref = nodes.VAEDecode().decode(vae, latent)[0]
        rows = {}
        for per_slice in [0] + params["slices"]:
            images = sliced.execute(latent, vae, frames_per_slice=per_slice).result[0]
            rows[per_slice] = {"psnr": psnr(images, ref), "max_abs": float((images - ref).abs().max())}
    frames = params["frames"]
    labels = {k: "auto" if k == 0 else f"{k} of {frames} frames" for k in rows}
    note = "  ".join(f"{labels[k]}: PSNR {v['psnr']:.1f} dB, max|diff| {v['max_abs']:.2f}" for k, v in rows.items())
    return {"svd_slices": rows, "note_svd": note}


CASES = [BenchCase(f"vae/{NODES[0]}", GROUP, run_memory, {**PARAMS, "node": NODES[0]}, env=MEMORY_ENV)]
CASES += [BenchCase(f"vae/{n}", GROUP, run_memory, {**PARAMS, "node": n}, baseline=f"vae/{NODES[0]}",
                    compare_key="images", env=MEMORY_ENV) for n in NODES[1:]]
CASES += [BenchCase("vae/time", "vae_decode_time", run_time, {**PARAMS, "repeats": REPEATS}, timeout_s=3600.0)]
CASES += [BenchCase("vae/svd-slices", "vae_svd", run_svd_slices, SVD_PARAMS)]


def summarize(results: dict) -> str:
    """Acceptance lines: memory <= 1/3 of VAEDecode at <= +10 % time, exact; below VAEDecodeTiled."""
    cases = results.get("cases", results)
    base = cases.get("vae/VAEDecode", {})
    ours = cases.get("vae/SlicedVAEDecode-defaults", {})
    tiled = cases.get("vae/VAEDecodeTiled-defaults", {})
    timing = cases.get("vae/time", {})
    if not (base.get("peak_bytes") and ours.get("peak_bytes") and timing.get("time_ratio_vs_vaedecode")):
        return "vae: incomplete results"
    lines = []
    for name in NODES:
        e = cases.get(f"vae/{name}", {})
        if not e.get("peak_bytes"):
            continue
        t = timing.get("median_seconds", {}).get(name)
        lines.append(f"{name:>30}: peak {e['peak_bytes'] / 2**20:7.1f} MiB ({e['peak_bytes'] / base['peak_bytes']:.2f}x)"
                     + (f"  time {t:6.2f} s ({timing['time_ratio_vs_vaedecode'][name]:.2f}x)" if t else "")
                     + (f"  max|diff| {e['max_abs']:.2e}" if "max_abs" in e else ""))
    mem = ours["peak_bytes"] / base["peak_bytes"]
    slower = timing["time_ratio_vs_vaedecode"]["SlicedVAEDecode-defaults"]
    exact = ours.get("max_abs", 1.0) <= 1e-5
    lines.append(f"acceptance (defaults: memory <= 1/3 of VAEDecode, time <= 1.10x, max|diff| <= 1e-5): "
                 f"{mem:.3f}x, {slower:.2f}x, {ours.get('max_abs', float('nan')):.1e} -> "
                 f"{'PASS' if mem <= 1 / 3 and slower <= 1.10 and exact else 'FAIL'}")
    if tiled.get("peak_bytes"):
        ok = ours["peak_bytes"] < tiled["peak_bytes"] and ours.get("max_abs", 1.0) < tiled.get("max_abs", 0.0)
        lines.append(f"acceptance (less memory than VAEDecodeTiled's defaults, smaller error): {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "results.json"
    print(summarize(json.loads(path.read_text())))
