"""Tiny diffusers pipelines built from configs (no download), for the adapter's tests and bench.

Most have random weights; ``trained_wan_pipeline`` loads the TRAINED tiny Wan 2.1 fixture
(../shared/fixtures/tiny-wan-trained/, ComfyUI / original-Wan state dict) through diffusers'
own converter, so fidelity figures on it follow a real denoising trajectory.

The configs are those of diffusers' own tests (shared/reference/anchors.md section 5),
made a little deeper where the cache needs room to act: the Wan transformer has 4
blocks so block reuse has a middle range. Text and image encoders are left out where
the pipeline takes embeddings (Wan, AnimateDiff); SVD builds its CLIP vision encoder
from a config. Everything is seeded, so two builds give the same weights.

Importing this module imports diffusers (callers skip when it is missing).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import diffusers  # noqa: E402,F401

WAN_TEXT_DIM = 32
ANIMATEDIFF_TEXT_DIM = 16


def wan_pipeline(num_layers: int = 4, seed: int = 0):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=WAN_TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    vae = wan_vae(seed)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


TRAINED_WAN_DIR = Path(os.environ.get("LIGHTCACHE_SHARED", Path(__file__).resolve().parents[3] / "shared")) \
    / "fixtures" / "tiny-wan-trained"
TRAINED_WAN_SHIFT = 5.0  # the fixture was trained on sigmas shifted by 1 or 5; 5 is ComfyUI's Wan default


def trained_wan_transformer(path: Path | None = None):
    """The fixture's ``WanTransformer3DModel``: dim 256 (2 heads x 128), ffn 768, 6 blocks, in/out 16, text 4096.

    The original-Wan keys go through ``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers``
    and load with ``strict=True`` (no missing or unexpected key)."""
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.torch import load_file

    path = path or TRAINED_WAN_DIR / "tiny_wan_t2v_trained.safetensors"
    state = convert_wan_transformer_to_diffusers(load_file(str(path)))
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
        text_dim=4096, freq_dim=256, ffn_dim=768, num_layers=6, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
    transformer.load_state_dict(state, strict=True)
    return transformer.eval()


def trained_wan_prompts(path: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(EMB [9, 4, 4096], COL [4, 16]): rows 0-7 of EMB are the classes, row 8 the empty (negative) prompt."""
    from safetensors.torch import load_file

    d = load_file(str(path or TRAINED_WAN_DIR / "tiny_wan_t2v_trained.prompts.safetensors"))
    return d["EMB"], d["COL"]


def trained_wan_pipeline(shift: float = TRAINED_WAN_SHIFT):
    """``WanPipeline`` on the trained fixture. There is no VAE for its latent space: the random tiny VAE only
    fills the slot (run with ``output_type="latent"``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=trained_wan_transformer(), vae=wan_vae(0),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_trained_wan(pipe, prompt: int = 0, seed: int = 1, steps: int = 30, guidance: float = 5.0,
                    output_type: str = "latent", emb: torch.Tensor | None = None) -> torch.Tensor:
    """Class ``prompt`` (0-7) at the fixture's size: 128x128 pixels x 17 frames = latent [16, 5, 16, 16]."""
    if emb is None:
        emb = trained_wan_prompts()[0]
    with torch.no_grad():
        return pipe(prompt_embeds=emb[prompt:prompt + 1], negative_prompt_embeds=emb[8:9], height=128, width=128,
                    num_frames=17, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type=output_type).frames


def wan_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def wan_embeds(prompt: int, tokens: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, negative prompt) embeddings of "prompt" number ``prompt`` (a seeded stand-in for a text encoder)."""
    g = torch.Generator().manual_seed(1000 + prompt)
    return torch.randn(1, tokens, WAN_TEXT_DIM, generator=g), torch.randn(1, tokens, WAN_TEXT_DIM, generator=g)


def run_wan(pipe, prompt: int = 0, seed: int = 1, steps: int = 20, size: int = 64, frames: int = 9,
            guidance: float = 5.0, output_type: str = "latent") -> torch.Tensor:
    pe, ne = wan_embeds(prompt)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, height=size, width=size, num_frames=frames,
                    num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                    output_type=output_type).frames


def svd_pipeline(seed: int = 0):
    from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                           UNetSpatioTemporalConditionModel)
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), cross_attention_dim=32,
        num_attention_heads=8, in_channels=8, out_channels=4, layers_per_block=2, sample_size=32,
        addition_time_embed_dim=32, projection_class_embeddings_input_dim=96).eval()
    vae = AutoencoderKLTemporalDecoder(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                                       down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"], latent_channels=4,
                                       layers_per_block=2).eval()
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=5, num_attention_heads=4, image_size=32,
        intermediate_size=37, patch_size=1)).eval()
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, interpolation_type="linear",
        num_train_timesteps=1000, prediction_type="v_prediction", sigma_max=700.0, sigma_min=0.002, steps_offset=1,
        timestep_spacing="leading", timestep_type="continuous", trained_betas=None, use_karras_sigmas=True)
    pipe = StableVideoDiffusionPipeline(vae=vae, image_encoder=encoder, unet=unet, scheduler=scheduler,
                                        feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def svd_image(prompt: int) -> torch.Tensor:
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2000 + prompt))


def run_svd(pipe, prompt: int = 0, seed: int = 1, steps: int = 6, size: int = 16, frames: int = 2,
            output_type: str = "latent") -> torch.Tensor:
    with torch.no_grad():
        return pipe(svd_image(prompt), height=size, width=size, num_frames=frames, num_inference_steps=steps,
                    decode_chunk_size=frames, generator=torch.Generator().manual_seed(seed), output_type=output_type,
                    min_guidance_scale=1.0, max_guidance_scale=3.0).frames


def animatediff_pipeline(seed: int = 0):
    """AnimateDiffPipeline on a tiny ``UNet2DConditionModel`` + ``MotionAdapter`` (it builds a ``UNetMotionModel``)."""
    from diffusers import AnimateDiffPipeline, AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=ANIMATEDIFF_TEXT_DIM, norm_num_groups=4)
    adapter = MotionAdapter(block_out_channels=(8, 16), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=4, motion_max_seq_length=32)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4)
    pipe = AnimateDiffPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, motion_adapter=adapter,
                               scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_animatediff(pipe, prompt: int = 0, seed: int = 1, steps: int = 6, size: int = 32, frames: int = 4,
                    guidance: float = 5.0, output_type: str = "latent") -> torch.Tensor:
    g = torch.Generator().manual_seed(3000 + prompt)
    pe = torch.randn(1, 8, ANIMATEDIFF_TEXT_DIM, generator=g)
    ne = torch.randn(1, 8, ANIMATEDIFF_TEXT_DIM, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=pe, negative_prompt_embeds=ne, num_frames=frames, height=size, width=size,
                    num_inference_steps=steps, guidance_scale=guidance, generator=torch.Generator().manual_seed(seed),
                    output_type=output_type).frames


@contextlib.contextmanager
def count_calls(modules):
    """Counts forward calls of ``modules`` (e.g. every block's FFN or every UNet resnet): work a cache
    skips never reaches them, whatever the hooks above them return."""
    counts = {"calls": 0}

    def hook(module, args, output):
        counts["calls"] += 1

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def wan_block_units(transformer) -> list:
    """One module per transformer block that runs exactly when the block runs (its FFN)."""
    return [block.ffn for block in transformer.blocks]


def unet_block_units(unet) -> list:
    """Every resnet of the UNet's down / mid / up blocks (one call per resnet evaluation)."""
    units = []
    for part in list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks):
        if part is not None:
            units.extend(getattr(part, "resnets", []))
    return units
