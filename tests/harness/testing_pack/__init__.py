"""Test-only custom nodes, loaded by the harness beside LightCache.

* ``LightCacheTestConditioning``: seeded conditioning tensors of the right
  shape for each fixture family (there is no text encoder in the tests), or
  the trained fixtures' stored prompt embeddings.
* ``LightCacheTestUNetLoader``: builds SD1.5/SVD UNets at reduced width from
  ComfyUI's ``detect_unet_config`` and ``supported_models`` classes, because
  ComfyUI's own detection matches those families only at ``model_channels``
  320 (see tests/harness/fixtures.py).

This pack is never shipped to users.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils
import folder_paths

SHARED = Path(os.environ.get("LIGHTCACHE_SHARED", Path(__file__).resolve().parents[4] / "shared"))
PROMPT_FILES = {
    "trained_wan": SHARED / "fixtures" / "tiny-wan-trained" / "tiny_wan_t2v_trained.prompts.safetensors",
    "trained_sd15": SHARED / "fixtures" / "tiny-sd15-unet-trained" / "tiny_sd15_unet_trained.prompts.safetensors",
}
FAMILIES = ["wan", "wan_i2v", "hunyuan_video", "sd15", "svd", "trained_wan", "trained_sd15"]


def _randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


class LightCacheTestConditioning:
    """Seeded positive/negative conditioning for a fixture family."""

    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "make"
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (FAMILIES, {"tooltip": "Which fixture family the tensors are shaped for."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random embeddings."}),
            "prompt_index": ("INT", {"default": 0, "min": 0, "max": 7, "tooltip": "Class row of the trained fixtures' prompt table."}),
            "width": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8, "tooltip": "Pixel width (for image-conditioned families)."}),
            "height": ("INT", {"default": 64, "min": 8, "max": 4096, "step": 8, "tooltip": "Pixel height (for image-conditioned families)."}),
            "length": ("INT", {"default": 5, "min": 1, "max": 1024, "tooltip": "Pixel frames (Wan I2V latent frames = (length-1)//4+1)."}),
        }}

    def make(self, family, seed, prompt_index, width, height, length):
        if family in PROMPT_FILES:
            emb = comfy.utils.load_torch_file(str(PROMPT_FILES[family]))["EMB"]
            return ([[emb[prompt_index:prompt_index + 1].clone(), {}]], [[emb[8:9].clone(), {}]])
        if family in ("wan", "wan_i2v"):
            pos, neg = _randn((1, 8, 4096), seed, 0.5), _randn((1, 8, 4096), seed + 1, 0.5)
            extra = {}
            if family == "wan_i2v":
                frames = (length - 1) // 4 + 1
                extra = {"concat_latent_image": _randn((1, 16, frames, height // 8, width // 8), seed + 2)}
            return ([[pos, dict(extra)]], [[neg, dict(extra)]])
        if family == "hunyuan_video":
            extra = lambda s: {"pooled_output": _randn((1, 768), s), "guidance": 6.0}  # noqa: E731
            return ([[_randn((1, 8, 64), seed, 0.5), extra(seed + 2)]], [[_randn((1, 8, 64), seed + 1, 0.5), extra(seed + 3)]])
        if family == "sd15":
            return ([[_randn((1, 77, 768), seed, 0.5), {}]], [[_randn((1, 77, 768), seed + 1, 0.5), {}]])
        if family == "svd":
            image = _randn((1, 4, height // 8, width // 8), seed + 2)
            extra = {"concat_latent_image": image, "fps": 6, "motion_bucket_id": 127, "augmentation_level": 0.0}
            return ([[_randn((1, 1, 1024), seed, 0.5), dict(extra)]], [[torch.zeros(1, 1, 1024), {**extra, "concat_latent_image": torch.zeros_like(image)}]])
        raise ValueError(f"unknown family {family}")


class LightCacheTestUNetLoader:
    """Loads a reduced-width SD1.5 or SVD UNet through ComfyUI's own model classes."""

    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "unet_name": (folder_paths.get_filename_list("diffusion_models"), {"tooltip": "A UNet state dict in diffusion_models/."}),
            "family": (["SD15", "SVD_img2vid"], {"tooltip": "The supported-model class to build it with."}),
        }}

    def load(self, unet_name, family):
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        sd = comfy.utils.load_torch_file(path)
        config_file = Path(os.path.realpath(path)).with_name(Path(os.path.realpath(path)).name.replace(".safetensors", ".unet_config.json"))
        if config_file.exists():
            unet_config = json.loads(config_file.read_text())
        else:
            unet_config = comfy.model_detection.detect_unet_config(sd, "")
        model_config = getattr(comfy.supported_models, family)(unet_config)
        model_config.set_inference_dtype(torch.float32, None)
        load_device = comfy.model_management.get_torch_device()
        model = model_config.get_model(sd, "", device=comfy.model_management.unet_offload_device())
        model.load_model_weights(sd, "")
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())
        return (patcher,)


# tag -> list of (hook, block_index, total_blocks, block_type, token count) each time a test hook ran
HOOK_CALLS: dict = {}
HOOKS = ["attn1_patch", "attn2_patch", "double_block"]


class LightCacheTestBlockHooks:
    """Adds a ``transformer_options["patches"]`` hook the way other packs do (MultiTalk's ``attn1_patch``,
    ``attn2_patch``, post-block ``double_block`` patches): each call is recorded under ``tag`` with the
    block keys the host's loop set, and changes the tensor it returns, so a run that skipped or
    reordered a hook gives another output."""

    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model to add the hook to (cloned)."}),
            "hook": (HOOKS, {"tooltip": "Which patches list the hook goes in."}),
            "tag": ("STRING", {"default": "hooks", "tooltip": "Key of HOOK_CALLS the calls are recorded under."}),
        }}

    def patch(self, model, hook, tag):
        calls = HOOK_CALLS.setdefault(tag, [])

        def record(opts, tokens):
            calls.append((hook, opts.get("block_index"), opts.get("total_blocks"), opts.get("block_type"), tokens))

        def attn1(args, *rest, **kwargs):
            if isinstance(args, dict):  # Wan: {"x": attention output, "q", "k", "transformer_options"} -> x
                record(args["transformer_options"], args["x"].shape[1])
                return args["x"] * 1.5 + args["q"].flatten(2).mean() * 0.1 + args["k"].flatten(2).mean() * 0.1
            return {}  # other attn1_patch signatures: leave them alone

        def attn2(args, *rest, **kwargs):
            if isinstance(args, dict):  # Wan block: {"x": x after cross-attention, "transformer_options"} -> x
                record(args["transformer_options"], args["x"].shape[1])
                return args["x"] * 0.75 + args["x"].mean(dim=1, keepdim=True) * 0.25
            return args

        def post_block(args):  # {"img": block output, "x": model input, "vec", "block_index", ...} -> {"img"}
            opts = dict(args["transformer_options"], block_index=args.get("block_index"))
            record(opts, args["img"].shape[1])
            return {**args, "img": args["img"] - 0.25 * args["img"].mean(dim=1, keepdim=True)}

        m = model.clone()
        m.set_model_patch({"attn1_patch": attn1, "attn2_patch": attn2, "double_block": post_block}[hook], hook)
        return (m,)


NODE_CLASS_MAPPINGS = {
    "LightCacheTestConditioning": LightCacheTestConditioning,
    "LightCacheTestUNetLoader": LightCacheTestUNetLoader,
    "LightCacheTestBlockHooks": LightCacheTestBlockHooks,
}
