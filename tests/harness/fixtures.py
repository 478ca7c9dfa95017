"""Tiny, seeded, random-weight checkpoints of real ComfyUI architectures.

Every model is an instance of ComfyUI's own class (``comfy.ldm...``), given a
deterministic weight init, and saved as safetensors under a models folder laid
out like ComfyUI's (``diffusion_models/``, ``vae/``). Tests then load them
through ComfyUI's real loaders:

* Wan 2.1 T2V/I2V and HunyuanVideo DiTs: ``UNETLoader``; model detection
  recognises them (WAN21_T2V, WAN21_I2V, HunyuanVideo) at any width.
* Wan 2.1 VAE: ``VAELoader``; detection reads ``dim`` from the weights.
* SD VAE: ``VAELoader``. Its detection has no width to read (``ch`` is fixed
  at 128), so this is the smallest real config: the full-size decoder,
  stored in fp16 (about 160 MB).
* SD1.5 UNet and SVD VideoUNet: detection matches these families only at
  ``model_channels`` 320, so they are written at width 32/64 and built by the
  test-only ``LightCacheTestUNetLoader`` through ``supported_models.SD15`` /
  ``SVD_img2vid`` from ComfyUI's own ``detect_unet_config`` of the weights.

Nothing is downloaded. Files are regenerated only when missing (same seed,
same bytes), so calling :func:`ensure_fixtures` is cheap and idempotent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

SHARED_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
TRAINED_WAN = SHARED_FIXTURES / "tiny-wan-trained" / "tiny_wan_t2v_trained.safetensors"
TRAINED_WAN_PROMPTS = SHARED_FIXTURES / "tiny-wan-trained" / "tiny_wan_t2v_trained.prompts.safetensors"
TRAINED_SD15 = SHARED_FIXTURES / "tiny-sd15-unet-trained" / "tiny_sd15_unet_trained.safetensors"
TRAINED_SD15_PROMPTS = SHARED_FIXTURES / "tiny-sd15-unet-trained" / "tiny_sd15_unet_trained.prompts.safetensors"
TRAINED_SD15_CONFIG = SHARED_FIXTURES / "tiny-sd15-unet-trained" / "tiny_sd15_unet_trained.unet_config.json"


@dataclass(frozen=True)
class Fixture:
    """One generated file: its loader folder, file name and the family it must detect as."""

    folder: str
    name: str
    family: str


WAN_T2V = Fixture("diffusion_models", "tiny_wan21_t2v.safetensors", "WAN21_T2V")
WAN_T2V_LARGE = Fixture("diffusion_models", "tiny_wan21_t2v_d256.safetensors", "WAN21_T2V")
WAN_I2V = Fixture("diffusion_models", "tiny_wan21_i2v.safetensors", "WAN21_I2V")
HUNYUAN = Fixture("diffusion_models", "tiny_hunyuan_video.safetensors", "HunyuanVideo")
SD15_UNET = Fixture("diffusion_models", "tiny_sd15_unet.safetensors", "SD15")
SVD_UNET = Fixture("diffusion_models", "tiny_svd_unet.safetensors", "SVD_img2vid")
WAN_VAE = Fixture("vae", "tiny_wan21_vae.safetensors", "WanVAE")
SD_VAE = Fixture("vae", "sd_vae_random_fp16.safetensors", "AutoencoderKL")
SVD_VAE = Fixture("vae", "svd_vae_random_fp16.safetensors", "VideoDecoder")  # on demand: not in DEFAULT_SET
TRAINED_WAN_LINK = Fixture("diffusion_models", "tiny_wan_t2v_trained.safetensors", "WAN21_T2V")
TRAINED_SD15_LINK = Fixture("diffusion_models", "tiny_sd15_unet_trained.safetensors", "SD15")

WAN_TEXT_DIM = 4096  # WanModel's text_embedding input width is fixed, not detected


def seeded_init_(module: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Give every parameter a deterministic value (ComfyUI's ops leave weights empty).

    Matrices and kernels ~ N(0, std); norm scales 1; biases and other vectors ~ N(0, std/4).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            leaf = name.rsplit(".", 1)[-1]
            is_norm = any(t in name for t in ("norm", "gamma", "scale")) and p.dim() <= 1 or leaf == "gamma"
            if is_norm:
                p.fill_(1.0)
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) * min(std * 4, 1.0 / math.sqrt(max(fan_in, 1))))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std / 4)
        for name, b in module.named_buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    return module


def _save(module: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}, str(tmp))
    tmp.rename(path)


def _ops():
    import comfy.ops

    return comfy.ops.disable_weight_init


def build_wan21(model_type: str = "t2v", dim: int = 128, num_layers: int = 2, ffn_dim: int = 256) -> torch.nn.Module:
    """ComfyUI's ``WanModel`` at a tiny width. ``dim`` must be a multiple of 128 (heads = dim // 128)."""
    from comfy.ldm.wan.model import WanModel

    in_dim = 36 if model_type == "i2v" else 16
    return WanModel(model_type=model_type, patch_size=(1, 2, 2), in_dim=in_dim, dim=dim, ffn_dim=ffn_dim, freq_dim=256,
                    text_dim=WAN_TEXT_DIM, out_dim=16, num_heads=dim // 128, num_layers=num_layers, operations=_ops())


def build_hunyuan_video(hidden_size: int = 128, context_dim: int = 64) -> torch.nn.Module:
    """ComfyUI's ``HunyuanVideo`` DiT: 1 double + 1 single block, one 128-wide head."""
    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams

    params = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=context_dim, hidden_size=hidden_size,
                  mlp_ratio=4.0, num_heads=hidden_size // 128, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
                  theta=256, patch_size=[1, 2, 2], qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False,
                  use_cond_type_embedding=False, vision_in_dim=None, meanflow_sum=False)
    # Host versions add parameters over time (newer hosts require meanflow_sum); pass the ones this
    # host's dataclass knows.
    known = getattr(HunyuanVideoParams, "__dataclass_fields__", params)
    return HunyuanVideo(image_model="hunyuan_video", operations=_ops(), **{k: v for k, v in params.items() if k in known})


SD15_TINY_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1], "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "num_heads": 4, "num_head_channels": -1, "transformer_depth_output": [0, 0, 1, 1, 1, 1],
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

# SVD_img2vid's unet_extra_config forces num_head_channels 64, so 64 is the
# smallest width whose attention has a head at every level.
SVD_TINY_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": 768, "num_classes": "sequential", "in_channels": 8, "out_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 0], "channel_mult": [1, 2, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
    "num_heads": -1, "num_head_channels": 64, "transformer_depth_output": [1, 1, 1, 1, 0, 0],
    "use_temporal_resblock": True, "use_temporal_attention": True,
    "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
    "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "disable_temporal_crossattention": False,
    "max_ddpm_temb_period": 10000,
}


def build_unet(family: str) -> torch.nn.Module:
    """A reduced SD1.5 ``UNetModel`` or SVD ``VideoUNet`` from ComfyUI's supported-model classes."""
    import comfy.supported_models as sm

    cls, config = {"SD15": (sm.SD15, SD15_TINY_CONFIG), "SVD_img2vid": (sm.SVD_img2vid, SVD_TINY_CONFIG)}[family]
    model_config = cls(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({}, "", device="cpu").diffusion_model


def build_wan_vae(dim: int = 16) -> torch.nn.Module:
    """ComfyUI's Wan 2.1 causal ``WanVAE`` with a small base width ``dim``."""
    from comfy.ldm.wan.vae import WanVAE

    return WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0)


def build_sd_vae() -> torch.nn.Module:
    """ComfyUI's SD ``AutoencoderKL`` at its only detectable size (ch 128, mult 1,2,4,4)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    return AutoencoderKL(ddconfig=ddconfig, embed_dim=4)


def build_svd_vae() -> torch.nn.Module:
    """ComfyUI's SVD VAE: the SD encoder and the temporal ``VideoDecoder``, as ``comfy.sd.VAE`` builds it when
    the weights hold ``decoder.mid.block_1.mix_factor`` (no width to detect either: full size, fp16)."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    config = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    decoder = {**config, "video_kernel_size": [3, 1, 1], "alpha": 0.0}
    return AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": config},
        decoder_config={"target": "comfy.ldm.modules.temporal_ae.VideoDecoder", "params": decoder})


_BUILDERS = {
    WAN_T2V: (lambda: build_wan21("t2v"), 101, torch.float32),
    WAN_T2V_LARGE: (lambda: build_wan21("t2v", dim=256, num_layers=2, ffn_dim=768), 102, torch.float32),
    WAN_I2V: (lambda: build_wan21("i2v"), 103, torch.float32),
    HUNYUAN: (build_hunyuan_video, 104, torch.float32),
    SD15_UNET: (lambda: build_unet("SD15"), 105, torch.float32),
    SVD_UNET: (lambda: build_unet("SVD_img2vid"), 106, torch.float32),
    WAN_VAE: (build_wan_vae, 107, torch.float32),
    SD_VAE: (build_sd_vae, 108, torch.float16),
    SVD_VAE: (build_svd_vae, 109, torch.float16),
}

DEFAULT_SET = (WAN_T2V, WAN_I2V, HUNYUAN, SD15_UNET, SVD_UNET, WAN_VAE, SD_VAE)


def path_of(models_dir: Path, fixture: Fixture) -> Path:
    return models_dir / fixture.folder / fixture.name


def ensure_fixtures(models_dir: Path, which=DEFAULT_SET) -> dict[Fixture, Path]:
    """Write each missing fixture under ``models_dir`` and link the trained ones in.

    Needs the host on ``sys.path`` (call after :func:`host.boot`).
    """
    out = {}
    for fixture in which:
        path = path_of(models_dir, fixture)
        if not path.exists():
            builder, seed, dtype = _BUILDERS[fixture]
            _save(seeded_init_(builder(), seed), path, dtype)
        out[fixture] = path
    for link, target in ((TRAINED_WAN_LINK, TRAINED_WAN), (TRAINED_SD15_LINK, TRAINED_SD15)):
        path = path_of(models_dir, link)
        if target.exists() and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(target)
        if path.exists():
            out[link] = path
    return out
