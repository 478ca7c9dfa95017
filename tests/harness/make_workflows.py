"""Generate the UI-format workflows in workflows/ from compact API specs.

    .venv/bin/python tests/harness/make_workflows.py

Widget order comes from the live node definitions (``api_to_ui``), so the
files always match the nodes. Each workflow names the standard model files a
user downloads, uses LightCache Sampler, Chunked Model Patch and Sliced VAE
Decode with the recommended settings, and carries a note explaining them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import host  # noqa: E402

LIGHTCACHE_NOTE = (
    "LightCache, recommended settings\n"
    "- Chunked Model Patch (mode auto): runs the largest feature maps of computed steps in chunks sized from free VRAM. "
    "Exact: same output, lower peak memory.\n"
    "- LightCache Sampler (cache_mode mix, threshold {threshold}): drop-in KSampler; per step it reuses the whole step, the "
    "negative (CFG) branch or the middle blocks when the accumulated change allows, and computes otherwise. "
    "cache_device auto keeps big cached features in pinned CPU memory. Lower threshold = closer to KSampler; "
    "cache_mode off = exactly KSampler. The second output is a readable report of what was reused.\n"
    "- Sliced VAE Decode (auto): decodes the video a few latent frames at a time, carrying the causal state, "
    "so the result equals VAE Decode with much lower peak memory.\n"
)


def _sampler(model, pos, neg, latent, steps, cfg, sampler="uni_pc", scheduler="simple", threshold=None, mode="mix", seed=42):
    inputs = dict(model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, positive=pos,
                  negative=neg, latent_image=latent, denoise=1.0, cache_mode=mode, start_percent=0.0, end_percent=1.0,
                  cache_device="auto")
    if threshold is not None:
        inputs["threshold"] = threshold
    return {"class_type": "LightCacheSampler", "inputs": inputs}


def wan_t2v(unet: str, title: str, width=832, height=480, length=33, steps=30, cfg=6.0, shift=8.0) -> tuple[dict, dict, str]:
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "4": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": shift}},
        "5": {"class_type": "ChunkedModelPatch", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a fox running through fresh snow at sunrise, cinematic, detailed fur"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry, low quality, static, watermark, text"}},
        "8": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": width, "height": height, "length": length, "batch_size": 1}},
        "9": _sampler(["5", 0], ["6", 0], ["7", 0], ["8", 0], steps, cfg),
        "10": {"class_type": "SlicedVAEDecode", "inputs": {"samples": ["9", 0], "vae": ["3", 0]}},
        "11": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["10", 0], "filename_prefix": "LightCache/wan", "fps": 16.0,
                                                            "lossless": False, "quality": 90, "method": "default"}},
    }
    # Column layout sized for the real node heights (the sampler grows after a run).
    pos = {"1": (40, 80), "2": (40, 260), "3": (40, 440), "4": (400, 80), "5": (400, 240), "6": (400, 520), "7": (400, 760),
           "8": (780, 760), "9": (780, 80), "10": (1200, 80), "11": (1200, 380)}
    return p, pos, title


def build_all() -> dict[str, dict]:
    from harness.workflow import api_to_ui

    specs = {
        "lightcache_wan21_t2v_1.3B.json": (*wan_t2v("wan2.1_t2v_1.3B_fp16.safetensors", "Wan 2.1 T2V 1.3B"),
                                           "Models: wan2.1_t2v_1.3B_fp16.safetensors (diffusion_models), umt5_xxl_fp8_e4m3fn_scaled.safetensors (text_encoders), wan_2.1_vae.safetensors (vae)."),
    }
    out = {}
    for name, (prompt, positions, title, models_line) in specs.items():
        threshold = prompt["9"]["inputs"].get("threshold", "default")
        note = f"{title} with LightCache\n{models_line}\n\n" + LIGHTCACHE_NOTE.format(threshold=threshold)
        out[name] = api_to_ui(prompt, positions=positions, notes=[{"text": note, "pos": (40, -260), "size": (1100, 300)}])
    return out


def main() -> None:
    host.boot(host.CACHE / "models")
    folder = Path(__file__).resolve().parents[2] / "workflows"
    folder.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (folder / name).write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", folder / name)


if __name__ == "__main__":
    main()
