"""Sliced VAE Decode vs VAEDecode vs VAEDecodeTiled on the tiny Wan 2.1 VAE (dim 16), each in its own process.

Size: 81 frames (21 latent) at the largest frame that decodes in about a minute on a small CPU; set
``LIGHTCACHE_BENCH_VAE_SIZE=HxW`` (pixels) to change it, e.g. ``480x832`` on a fast machine or GPU.
Metrics per case: wall time and peak decode memory (peak RSS minus RSS before, or CUDA peak) of the decode
call alone, and max |diff| / PSNR against VAEDecode (computed by the framework from the saved frames).
"""
from __future__ import annotations

import os
import sys

from bench.framework import BenchCase

SIZE = os.environ.get("LIGHTCACHE_BENCH_VAE_SIZE", "96x160")
HEIGHT, WIDTH = (int(v) for v in SIZE.lower().split("x"))
LATENT_FRAMES = int(os.environ.get("LIGHTCACHE_BENCH_VAE_FRAMES", "21"))
PARAMS = {"height": HEIGHT, "width": WIDTH, "latent_frames": LATENT_FRAMES, "seed": 0}


THREADS = int(os.environ.get("LIGHTCACHE_BENCH_THREADS", "1"))


def _setup(params):
    import torch

    if THREADS > 0 and not torch.cuda.is_available():
        torch.set_num_threads(THREADS)  # steadier CPU timings on a shared machine
    import nodes
    from harness import fixtures

    vae = nodes.VAELoader().load_vae(fixtures.WAN_VAE.name)[0]
    import comfy.model_management as mm

    mm.load_models_gpu([vae.patcher])
    z = torch.randn(1, 16, params["latent_frames"], params["height"] // 8, params["width"] // 8,
                    generator=torch.Generator().manual_seed(params["seed"]))
    return vae, {"samples": z}


def _run(ctx, fn):
    import torch

    with torch.inference_mode():
        images, m = ctx.measure(fn)
    ctx.save_tensor("images", images)
    return {"seconds": m.seconds, "peak_bytes": m.peak_bytes, "frames": int(images.shape[0]),
            "output_bytes": images.numel() * images.element_size()}


def run_vaedecode(params, ctx) -> dict:
    import nodes

    vae, latent = _setup(params)
    return _run(ctx, lambda: nodes.VAEDecode().decode(vae, latent)[0])


def run_vaedecode_tiled(params, ctx) -> dict:
    import nodes

    vae, latent = _setup(params)
    # VAEDecodeTiled's defaults: tile 512, overlap 64, temporal 64 frames, temporal overlap 8.
    return _run(ctx, lambda: nodes.VAEDecodeTiled().decode(vae, latent, 512, 64, 64, 8)[0])


def run_sliced(params, ctx) -> dict:
    vae, latent = _setup(params)
    node = next(m for name, m in sys.modules.items() if name.endswith(".nodes.vae_node")).SlicedVAEDecode
    reports = []

    def go():
        out = node.execute(latent, vae, frames_per_slice=params.get("frames_per_slice", 0),
                           row_chunks=params.get("row_chunks", 0), budget_mb=params.get("budget_mb", 0))
        reports.append(out.result[1])
        return out.result[0]

    metrics = _run(ctx, go)
    metrics["note_report"] = reports[0]
    return metrics


GROUP = "vae_decode"
CASES = [
    BenchCase("vae/VAEDecode", GROUP, run_vaedecode, PARAMS),
    BenchCase("vae/VAEDecodeTiled-defaults", GROUP, run_vaedecode_tiled, PARAMS, baseline="vae/VAEDecode", compare_key="images"),
    BenchCase("vae/SlicedVAEDecode-defaults", GROUP, run_sliced, PARAMS, baseline="vae/VAEDecode", compare_key="images"),
    BenchCase("vae/SlicedVAEDecode-no-row-chunks", GROUP, run_sliced, {**PARAMS, "row_chunks": 1},
              baseline="vae/VAEDecode", compare_key="images"),
]
