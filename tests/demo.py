"""`make demo`: the bundled Wan 2.1 workflow, headless, baseline against LightCache.

It loads ``workflows/lightcache_wan21_t2v_1.3B.json`` exactly as a user would
drag it in, converts it to an API prompt, and points it at tiny local models:
the small *trained* Wan 2.1 DiT from ``../shared/fixtures`` (so the denoising
trajectory is a real one) and a generated tiny Wan VAE. The baseline is the
same graph with ComfyUI's own KSampler and VAEDecode.

Each variant runs in its own process (so peak memory is its own); the table
shows per-node time, total time, peak RSS and the fidelity of LightCache's
latent against the baseline's. The preview lands in ``out/demo/``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from harness import corelink  # noqa: E402,F401
from harness import host  # noqa: E402

WORKFLOW = "lightcache_wan21_t2v_1.3B.json"
OUT = host.REPO / "out" / "demo"
PROMPTS = 3  # prompt rows of the trained fixture, one run each


def build_prompt(variant: str, prompt_index: int) -> dict:
    from harness import workflow

    api = workflow.ui_to_api(workflow.load(WORKFLOW))
    api = workflow.adapt_for_fixtures(api, "trained_wan", width=128, height=128, length=17, steps=30, prompt_index=prompt_index)
    api = {k: v for k, v in api.items() if v["class_type"] not in ("SaveAnimatedWEBP", "SaveVideo", "CreateVideo")}
    return workflow.to_baseline(api) if variant == "baseline" else api


def child(variant: str, out_dir: Path) -> None:
    """Run one variant for every prompt; save outputs and figures."""
    import torch

    from bench.framework import measure

    models = host.CACHE / "models"
    booted = host.boot(models)
    from harness import fixtures
    from harness.runner import InProcessRunner

    fixtures.ensure_fixtures(models)
    runner = InProcessRunner(booted)
    record = {"runs": []}
    for index in range(PROMPTS):
        prompt = build_prompt(variant, index)
        result, m = measure(lambda: runner.run(prompt))
        sampler = next(k for k, v in prompt.items() if v["class_type"] in ("KSampler", "LightCacheSampler"))
        decode = next(k for k, v in prompt.items() if v["class_type"] in ("VAEDecode", "SlicedVAEDecode"))
        names = {k: v["class_type"] for k, v in prompt.items()}
        torch.save({"latent": result.output(sampler)["samples"], "images": result.output(decode)}, out_dir / f"{variant}_{index}.pt")
        report = result.outputs[sampler][1] if len(result.outputs[sampler]) > 1 else ""
        record["runs"].append({"seconds": m.seconds, "peak_bytes": m.peak_bytes,
                               "node_seconds": {f"{names[k]}#{k}": v for k, v in result.node_seconds.items()}, "report": report})
    (out_dir / f"{variant}.json").write_text(json.dumps(record))


def write_preview(out_dir: Path) -> Path:
    """An animated webp: baseline | LightCache decoded frames, and a latent view under each."""
    import torch
    from PIL import Image

    base, ours = torch.load(out_dir / "baseline_0.pt"), torch.load(out_dir / "lightcache_0.pt")

    def latent_rgb(latent: torch.Tensor) -> torch.Tensor:  # [1, 16, T, h, w] -> [T, H, W, 3] in [0, 1]
        x = latent[0, :3].permute(1, 2, 3, 0)
        x = (x - x.amin()) / (x.amax() - x.amin() + 1e-8)
        return torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), scale_factor=8, mode="nearest").permute(0, 2, 3, 1)

    frames = []
    lat_b, lat_o = latent_rgb(base["latent"]), latent_rgb(ours["latent"])
    for t in range(base["images"].shape[0]):
        lt = min(t // 4, lat_b.shape[0] - 1)
        top = torch.cat([base["images"][t], ours["images"][t]], dim=1)
        bottom = torch.cat([lat_b[lt], lat_o[lt]], dim=1)
        frame = (torch.cat([top, bottom], dim=0).clamp(0, 1) * 255).to(torch.uint8).numpy()
        frames.append(Image.fromarray(frame).resize((frame.shape[1] * 2, frame.shape[0] * 2), Image.NEAREST))
    path = out_dir / "preview.webp"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=120, loop=0)
    return path


def main() -> None:
    import torch

    from lightcache_core.metrics import psnr, ssim

    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for variant in ("baseline", "lightcache"):
        print(f"[demo] running {variant} ({PROMPTS} prompts, own process) ...", flush=True)
        subprocess.run([sys.executable, __file__, "--child", variant, str(OUT)], check=True)
    base, ours = (json.loads((OUT / f"{v}.json").read_text())["runs"] for v in ("baseline", "lightcache"))
    fid = []
    for i in range(PROMPTS):
        b, o = torch.load(OUT / f"baseline_{i}.pt"), torch.load(OUT / f"lightcache_{i}.pt")
        fid.append((psnr(o["latent"], b["latent"]), ssim(o["latent"][0], b["latent"][0])))

    def med(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    print("\n== per-node seconds (prompt 0) ==")
    for label, runs in (("baseline", base), ("LightCache", ours)):
        print(f"  {label:>10}: " + ", ".join(f"{k} {v:.2f}s" for k, v in runs[0]["node_seconds"].items()))
    t_b, t_o = med([r["seconds"] for r in base]), med([r["seconds"] for r in ours])
    m_b, m_o = med([r["peak_bytes"] for r in base]), med([r["peak_bytes"] for r in ours])
    print("\n== Wan 2.1 T2V workflow on the tiny trained Wan (30 steps, CFG 6, 128x128x17), median of "
          f"{PROMPTS} prompts ==")
    print(f"  {'':>12} {'time s':>8} {'peak RSS MiB':>13} {'PSNR dB':>8} {'SSIM':>7}")
    print(f"  {'KSampler':>12} {t_b:8.2f} {m_b / 2**20:13.1f} {'ref':>8} {'ref':>7}")
    print(f"  {'LightCache':>12} {t_o:8.2f} {m_o / 2**20:13.1f} {med([f[0] for f in fid]):8.2f} {med([f[1] for f in fid]):7.4f}")
    print(f"  speedup {t_b / t_o:.2f}x, peak memory {m_o / max(m_b, 1):.2f}x of baseline (PSNR/SSIM on the latent vs KSampler)")
    if ours[0]["report"]:
        print("\n== LightCache report (prompt 0) ==\n" + ours[0]["report"])
    preview = write_preview(OUT)
    print(f"\n[demo] preview (top: decoded frames baseline | LightCache; bottom: latent channels): {preview}")
    print(f"[demo] done in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
