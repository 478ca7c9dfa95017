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

CHUNK_NOTE = ("- Chunked Model Patch (mode auto): runs the largest feature maps of computed steps in chunks sized from "
              "free VRAM. Exact: same output, lower peak memory.\n")
DECODE_NOTE = ("- Sliced VAE Decode (auto): decodes the video a few latent frames at a time, carrying the causal state, "
               "so the result equals VAE Decode with much lower peak memory.\n")
MIX_NOTE = (
    "- LightCache Sampler (cache_mode auto = mix for this transformer, threshold {threshold}): drop-in KSampler. Per step "
    "it predicts the whole step from the last computed ones, rebuilds the negative (CFG) branch, or reuses the middle "
    "blocks, whichever is cheapest while the predicted error fits the threshold, and computes otherwise. cache_device "
    "auto keeps big cached features in pinned CPU memory. Lower threshold = closer to KSampler; cache_mode off = "
    "exactly KSampler. The second output is a readable report of what was reused.\n")
DEEPCACHE_NOTE = (
    "- LightCache Sampler (cache_mode {mode}, threshold {threshold}): drop-in KSampler. On this UNet it reuses the deep "
    "UNet features between steps (DeepCache): full steps run every block, cache steps run only the outer blocks and "
    "take the deep feature from the cache. The threshold sets how many cache steps follow each full step (default "
    "0.6: two). cache_mode off = exactly KSampler. The second output is a readable report of what was reused.\n")
TWO_STAGE_NOTE = (
    "- LightCache Model Patch on each expert (high noise, low noise): each KSamplerAdvanced stage runs its own cache, "
    "with its own threshold; warm-up and last-step rules count within the stage's own steps, nothing cached in one "
    "stage is reused in the other, and each stage's report appears under its sampler and in the log. The high-noise "
    "stage lays out motion and composition: keep its threshold lower (0.3); the low-noise stage refines detail and "
    "takes more reuse (0.6).\n")


def _sampler(model, pos, neg, latent, steps, cfg, sampler="uni_pc", scheduler="simple", threshold=None, mode="auto", seed=42):
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


def wan22_ti2v_5b() -> tuple[dict, dict, str]:
    p, pos, _ = wan_t2v("wan2.2_ti2v_5B_fp16.safetensors", "Wan 2.2 TI2V 5B", width=1280, height=704, length=49, steps=20, cfg=5.0)
    p["3"]["inputs"]["vae_name"] = "wan2.2_vae.safetensors"
    p["8"] = {"class_type": "Wan22ImageToVideoLatent", "inputs": {"vae": ["3", 0], "width": 1280, "height": 704, "length": 49, "batch_size": 1}}
    p["4"]["inputs"]["shift"] = 8.0
    p["11"]["inputs"]["fps"] = 24.0
    return p, pos, "Wan 2.2 TI2V 5B (text to video)"


def hunyuan_t2v() -> tuple[dict, dict, str]:
    p, pos, _ = wan_t2v("hunyuan_video_t2v_720p_bf16.safetensors", "HunyuanVideo T2V", width=848, height=480, length=73, steps=30, cfg=1.0, shift=7.0)
    p["2"] = {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "llava_llama3_fp8_scaled.safetensors",
                                                          "type": "hunyuan_video", "device": "default"}}
    p["3"]["inputs"]["vae_name"] = "hunyuan_video_vae_bf16.safetensors"
    p["12"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 6.0}}
    p["9"]["inputs"]["positive"] = ["12", 0]
    p["11"]["inputs"]["fps"] = 24.0
    pos = dict(pos, **{"12": (400, 380), "6": (40, 620)})
    return p, pos, "HunyuanVideo T2V 720p (guidance-distilled: cfg 1, FluxGuidance 6)"


def svd_xt() -> tuple[dict, dict, str]:
    p = {
        "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd_xt.safetensors"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "SVD_img2vid_Conditioning", "inputs": {"clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": 1024,
                                                                   "height": 576, "video_frames": 25, "motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}},
        "4": {"class_type": "VideoLinearCFGGuidance", "inputs": {"model": ["1", 0], "min_cfg": 1.0}},
        "5": {"class_type": "ChunkedModelPatch", "inputs": {"model": ["4", 0]}},
        "9": _sampler(["5", 0], ["3", 0], ["3", 1], ["3", 2], 25, 2.5, sampler="euler", scheduler="karras"),
        "10": {"class_type": "SlicedVAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["10", 0], "filename_prefix": "LightCache/svd", "fps": 6.0,
                                                            "lossless": False, "quality": 90, "method": "default"}},
    }
    pos = {"1": (40, 80), "2": (40, 300), "3": (400, 80), "4": (400, 420), "5": (400, 560), "9": (780, 80), "10": (1200, 80), "11": (1200, 380)}
    return p, pos, "SVD-XT image to video (DeepCache-style UNet caching)"


def animatediff_lightning() -> tuple[dict, dict, str]:
    p = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "epicrealism_naturalSinRC1VAE.safetensors"}},
        "2": {"class_type": "ADE_LoadAnimateDiffModel", "inputs": {"model_name": "animatediff_lightning_8step_comfyui.safetensors"}},
        "3": {"class_type": "ADE_ApplyAnimateDiffModelSimple", "inputs": {"motion_model": ["2", 0]}},
        "4": {"class_type": "ADE_UseEvolvedSampling", "inputs": {"model": ["1", 0], "beta_schedule": "sqrt_linear (AnimateDiff)", "m_models": ["3", 0]}},
        "5": {"class_type": "ChunkedModelPatch", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a girl smiling, soft light, photorealistic"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "8": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 16}},
        "9": _sampler(["5", 0], ["6", 0], ["7", 0], ["8", 0], 8, 1.0, sampler="euler", scheduler="sgm_uniform"),
        "10": {"class_type": "SlicedVAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]}},
        "11": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["10", 0], "filename_prefix": "LightCache/animatediff", "fps": 8.0,
                                                            "lossless": False, "quality": 90, "method": "default"}},
    }
    pos = {"1": (40, 80), "2": (40, 300), "3": (40, 440), "4": (400, 80), "5": (400, 240), "6": (400, 400), "7": (400, 640),
           "8": (780, 760), "9": (780, 80), "10": (1200, 80), "11": (1200, 380)}
    return p, pos, "AnimateDiff-Lightning 8-step (needs ComfyUI-AnimateDiff-Evolved)"


def wan22_a14b_two_stage() -> tuple[dict, dict, str]:
    """Wan 2.2 T2V A14B: the high-noise expert for the first half of the steps, the low-noise expert for the rest."""
    common = dict(noise_seed=42, steps=20, cfg=3.5, sampler_name="euler", scheduler="simple")
    p = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "UNETLoader", "inputs": {"unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        "3": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "5": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 8.0}},
        "6": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["2", 0], "shift": 8.0}},
        "7": {"class_type": "ChunkedModelPatch", "inputs": {"model": ["5", 0]}},
        "8": {"class_type": "ChunkedModelPatch", "inputs": {"model": ["6", 0]}},
        "9": {"class_type": "LightCacheModelPatch", "inputs": {"model": ["7", 0], "cache_mode": "auto", "threshold": 0.3, "start_percent": 0.0,
                                                                "end_percent": 1.0, "cache_device": "auto"}},
        "10": {"class_type": "LightCacheModelPatch", "inputs": {"model": ["8", 0], "cache_mode": "auto", "threshold": 0.6, "start_percent": 0.0,
                                                                 "end_percent": 1.0, "cache_device": "auto"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "a fox running through fresh snow at sunrise, cinematic, detailed fur"}},
        "12": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["3", 0], "text": "blurry, low quality, static, watermark, text"}},
        "13": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 1280, "height": 720, "length": 81, "batch_size": 1}},
        "14": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["9", 0], "add_noise": "enable", "positive": ["11", 0], "negative": ["12", 0],
                                                             "latent_image": ["13", 0], "start_at_step": 0, "end_at_step": 10,
                                                             "return_with_leftover_noise": "enable", **common}},
        "15": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["10", 0], "add_noise": "disable", "positive": ["11", 0], "negative": ["12", 0],
                                                             "latent_image": ["14", 0], "start_at_step": 10, "end_at_step": 10000,
                                                             "return_with_leftover_noise": "disable", **common}},
        "16": {"class_type": "SlicedVAEDecode", "inputs": {"samples": ["15", 0], "vae": ["4", 0]}},
        "17": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["16", 0], "filename_prefix": "LightCache/wan22_a14b", "fps": 16.0,
                                                             "lossless": False, "quality": 90, "method": "default"}},
    }
    pos = {"1": (40, 80), "2": (40, 240), "3": (40, 400), "4": (40, 560), "5": (380, 80), "6": (380, 240), "7": (380, 400),
           "8": (380, 520), "9": (720, 80), "10": (720, 420), "11": (380, 700), "12": (380, 940), "13": (720, 760),
           "14": (1100, 80), "15": (1100, 520), "16": (1480, 80), "17": (1480, 380)}
    return p, pos, "Wan 2.2 T2V A14B two-stage (high noise, then low noise)"


WORKFLOWS = {
    "lightcache_wan21_t2v_1.3B.json": (lambda: wan_t2v("wan2.1_t2v_1.3B_fp16.safetensors", "Wan 2.1 T2V 1.3B"),
                                       "Models: wan2.1_t2v_1.3B_fp16.safetensors (diffusion_models), umt5_xxl_fp8_e4m3fn_scaled.safetensors (text_encoders), wan_2.1_vae.safetensors (vae)."),
    "lightcache_wan21_t2v_14B.json": (lambda: wan_t2v("wan2.1_t2v_14B_fp8_e4m3fn.safetensors", "Wan 2.1 T2V 14B", width=1280, height=720, length=33),
                                      "Models: wan2.1_t2v_14B_fp8_e4m3fn.safetensors (diffusion_models), umt5_xxl_fp8_e4m3fn_scaled.safetensors (text_encoders), wan_2.1_vae.safetensors (vae). At 720p the activation and decode peaks are largest: that is where Chunked Model Patch and Sliced VAE Decode matter most."),
    "lightcache_wan22_ti2v_5B.json": (wan22_ti2v_5b,
                                      "Models: wan2.2_ti2v_5B_fp16.safetensors (diffusion_models), umt5_xxl_fp8_e4m3fn_scaled.safetensors (text_encoders), wan2.2_vae.safetensors (vae)."),
    "lightcache_hunyuan_video_t2v.json": (hunyuan_t2v,
                                          "Models: hunyuan_video_t2v_720p_bf16.safetensors (diffusion_models), clip_l.safetensors + llava_llama3_fp8_scaled.safetensors (text_encoders), hunyuan_video_vae_bf16.safetensors (vae). Sliced VAE Decode falls back to VAE Decode for this VAE and says so in its report."),
    "lightcache_svd_xt_img2vid.json": (svd_xt,
                                       "Models: svd_xt.safetensors (checkpoints). Put your start image in ComfyUI/input. cache_mode deepcache reuses the deep UNet features; threshold trades speed for fidelity."),
    "lightcache_wan22_t2v_a14b_two_stage.json": (wan22_a14b_two_stage,
                                                 "Models: wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors and wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors (diffusion_models), umt5_xxl_fp8_e4m3fn_scaled.safetensors (text_encoders), wan_2.1_vae.safetensors (vae). Two KSamplerAdvanced stages split the 20 steps at step 10."),
    "lightcache_animatediff_lightning.json": (animatediff_lightning,
                                              "Needs the ComfyUI-AnimateDiff-Evolved pack. Models: epicrealism_naturalSinRC1VAE.safetensors (checkpoints), animatediff_lightning_8step_comfyui.safetensors (animatediff_models). cfg 1 as Lightning expects; deepcache skips the motion modules inside skipped UNet blocks and runs those in recomputed blocks."),
}


def build_all() -> dict[str, dict]:
    from harness.workflow import api_to_ui

    out = {}
    for name, (spec, models_line) in WORKFLOWS.items():
        prompt, positions, title = spec()
        sampler = next((n["inputs"] for n in prompt.values() if n["class_type"] == "LightCacheSampler"), None)
        unet = any(n["class_type"] in ("ImageOnlyCheckpointLoader", "CheckpointLoaderSimple") for n in prompt.values())
        if sampler is None:
            cache = TWO_STAGE_NOTE
        elif unet:
            cache = DEEPCACHE_NOTE.format(mode=sampler.get("cache_mode", "auto") + (" = deepcache for this UNet"
                                          if sampler.get("cache_mode", "auto") == "auto" else ""),
                                          threshold=sampler.get("threshold", "default"))
        else:
            cache = MIX_NOTE.format(threshold=sampler.get("threshold", "default"))
        note = f"{title} with LightCache\n{models_line}\n\n" + "LightCache, recommended settings\n" + CHUNK_NOTE + cache + DECODE_NOTE
        out[name] = api_to_ui(prompt, positions=positions, notes=[{"text": note, "pos": (40, -300), "size": (1100, 320)}])
    return out


def write_thumbnail(path: Path, title: str) -> None:
    """A small card for the template browser (a same-named .jpg is its thumbnail)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 288), (29, 39, 51))
    draw = ImageDraw.Draw(img)
    draw.text((24, 20), "LightCache", fill=(127, 209, 255))
    draw.text((24, 44), title, fill=(230, 230, 230))
    for i, (label, colour) in enumerate((("Chunked Model Patch", (95, 191, 127)), ("LightCache Sampler", (242, 193, 78)), ("Sliced VAE Decode", (224, 122, 95)))):
        x = 24 + i * 162
        draw.rounded_rectangle((x, 120, x + 150, 190), radius=10, outline=colour, width=3)
        draw.text((x + 10, 148), label, fill=colour)
    for i, code in enumerate("CCCSSGSBSSCSSGSSSC"):
        colour = {"C": (120, 120, 120), "S": (95, 191, 127), "G": (78, 201, 242), "B": (242, 193, 78)}[code]
        draw.rectangle((24 + i * 26, 222, 46 + i * 26, 244), fill=colour)
    img.save(path, quality=85)


def main() -> None:
    host.boot(host.CACHE / "models")
    folder = Path(__file__).resolve().parents[2] / "workflows"
    folder.mkdir(exist_ok=True)
    for name, workflow in build_all().items():
        (folder / name).write_text(json.dumps(workflow, indent=1) + "\n")
        title = WORKFLOWS[name][0]()[2]
        write_thumbnail(folder / name.replace(".json", ".jpg"), title)
        print("wrote", folder / name)


if __name__ == "__main__":
    main()
