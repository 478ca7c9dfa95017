"""Tiny seeded AnimateDiff motion modules for the tiny SD1.5 UNets, in the AnimateDiff key layout.

A motion-module file holds, per UNet level, the temporal transformers AnimateDiff
puts after each resnet (+ spatial transformer) of that level:

* ``down_blocks.{level}.motion_modules.{j}``: one per input resblock of the level
  (SD1.5: 2 per level, 4 levels, widths 320/640/1280/1280);
* ``up_blocks.{i}.motion_modules.{j}``: one per output block, deepest level first
  (SD1.5: 3 per level);
* ``mid_block.motion_modules.0`` (AnimateDiff v2, which AnimateDiff-Lightning is
  distilled from), at the deepest width;

each ``...temporal_transformer.{norm, proj_in, transformer_blocks.0.{attention_blocks.{0,1}.
{to_q,to_k,to_v,to_out.0,pos_encoder.pe}, norms.{0,1}, ff.net.{0.proj,2}, ff_norm}, proj_out}``
with 8 heads and a sinusoidal position table of 32 frames (v2). :func:`layout`
derives all of it from a UNet config, so for SD1.5's own config it is exactly the
layout of ``mm_sd_v15_v2`` (a test checks that against AnimateDiff-Evolved's
``AnimateDiffModel``); for the tiny UNets (3 levels, one resblock each) it is the
same layout at their widths and block counts.

Weights are seeded: attention and feed-forward like a freshly initialised
transformer, norms at identity, and ``proj_out`` (the residual branch that adds the
temporal mixing to the UNet's features) scaled by ``OUT_GAIN``, so the trained
fixture keeps denoising like the trained model while the frames are mixed. Files
are regenerated only when missing (same seed, same bytes).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from . import fixtures

FOLDER = "animatediff_models"  # AnimateDiff-Evolved's model folder name
HEADS = 8  # AnimateDiff's temporal transformers: 8 heads of width // 8
PE_LEN = 32  # AnimateDiff v2's position table (frames)
FF_MULT = 4  # geglu feed-forward: width -> 2 * 4 * width -> width
OUT_GAIN = 0.003  # proj_out std = OUT_GAIN / sqrt(width): see the module docstring

MOTION = fixtures.Fixture(FOLDER, "tiny_animatediff_sd15_mm.safetensors", "AnimateDiff")
MOTION_TRAINED = fixtures.Fixture(FOLDER, "tiny_animatediff_sd15_trained_mm.safetensors", "AnimateDiff")


def _as_list(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def unet_levels(unet_config: dict) -> list[tuple[int, int]]:
    """``(width, resblocks)`` per UNet level, highest resolution first."""
    mult = list(unet_config["channel_mult"])
    res = _as_list(unet_config["num_res_blocks"], len(mult))
    return [(unet_config["model_channels"] * m, n) for m, n in zip(mult, res)]


def blocks(unet_config: dict) -> dict[str, tuple[int, int]]:
    """``{"down_blocks.i" | "up_blocks.i" | "mid_block": (width, modules)}`` for a UNet config."""
    levels = unet_levels(unet_config)
    out = {f"down_blocks.{i}": (w, n) for i, (w, n) in enumerate(levels)}
    out.update({f"up_blocks.{i}": (w, n + 1) for i, (w, n) in enumerate(reversed(levels))})
    out["mid_block"] = (levels[-1][0], 1)
    return out


def _module_layout(prefix: str, width: int, pe_len: int) -> dict[str, tuple[int, ...]]:
    t = f"{prefix}.temporal_transformer"
    b = f"{t}.transformer_blocks.0"
    ff = FF_MULT * width
    shapes = {f"{t}.norm.weight": (width,), f"{t}.norm.bias": (width,),
              f"{t}.proj_in.weight": (width, width), f"{t}.proj_in.bias": (width,),
              f"{t}.proj_out.weight": (width, width), f"{t}.proj_out.bias": (width,),
              f"{b}.ff.net.0.proj.weight": (2 * ff, width), f"{b}.ff.net.0.proj.bias": (2 * ff,),
              f"{b}.ff.net.2.weight": (width, ff), f"{b}.ff.net.2.bias": (width,),
              f"{b}.ff_norm.weight": (width,), f"{b}.ff_norm.bias": (width,)}
    for a in range(2):
        att = f"{b}.attention_blocks.{a}"
        shapes.update({f"{att}.to_q.weight": (width, width), f"{att}.to_k.weight": (width, width),
                       f"{att}.to_v.weight": (width, width), f"{att}.to_out.0.weight": (width, width),
                       f"{att}.to_out.0.bias": (width,), f"{att}.pos_encoder.pe": (1, pe_len, width),
                       f"{b}.norms.{a}.weight": (width,), f"{b}.norms.{a}.bias": (width,)})
    return shapes


def layout(unet_config: dict, pe_len: int = PE_LEN) -> dict[str, tuple[int, ...]]:
    """Every key of the motion module for ``unet_config`` with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    for block, (width, count) in blocks(unet_config).items():
        if width % HEADS or width % 32:
            raise ValueError(f"{block}: width {width} must be a multiple of 32 (GroupNorm groups) and of {HEADS} heads")
        for j in range(count):
            shapes.update(_module_layout(f"{block}.motion_modules.{j}", width, pe_len))
    return shapes


def sinusoidal_pe(length: int, width: int) -> torch.Tensor:
    """The position table AnimateDiff's ``PositionalEncoding`` builds (and checkpoints store)."""
    position = torch.arange(length).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
    pe = torch.zeros(1, length, width)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe


def state_dict(unet_config: dict, seed: int, pe_len: int = PE_LEN, out_gain: float = OUT_GAIN) -> dict[str, torch.Tensor]:
    """A seeded motion module for ``unet_config`` (see the module docstring for the init)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(layout(unet_config, pe_len).items()):
        parts = key.split(".")
        is_norm = parts[-2] in ("norm", "ff_norm") or parts[-3] == "norms"  # GroupNorm / LayerNorms
        if key.endswith("pos_encoder.pe"):
            sd[key] = sinusoidal_pe(shape[1], shape[2])
        elif is_norm:
            sd[key] = torch.ones(shape) if parts[-1] == "weight" else torch.zeros(shape)
        else:
            gain = out_gain if ".proj_out." in key else 1.0
            if key.endswith(".weight"):
                sd[key] = torch.randn(shape, generator=gen) * (gain / math.sqrt(shape[1]))
            else:  # biases
                sd[key] = torch.randn(shape, generator=gen) * (0.01 * gain)
    return sd


def trained_unet_config() -> dict:
    return json.loads(fixtures.TRAINED_SD15_CONFIG.read_text())


SPECS = {  # fixture -> (UNet config it matches, seed)
    MOTION: (lambda: dict(fixtures.SD15_TINY_CONFIG), 201),
    MOTION_TRAINED: (trained_unet_config, 202),
}


def ensure(models_dir: Path, which=(MOTION, MOTION_TRAINED)) -> dict:
    """Write each missing motion module under ``models_dir/animatediff_models`` and register that folder
    with ComfyUI's ``folder_paths`` (when the host is booted) under AnimateDiff-Evolved's folder name."""
    from safetensors.torch import save_file

    out = {}
    for fixture in which:
        if fixture is MOTION_TRAINED and not fixtures.TRAINED_SD15_CONFIG.is_file():
            continue
        path = fixtures.path_of(models_dir, fixture)
        if not path.exists():
            config, seed = SPECS[fixture]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.contiguous() for k, v in state_dict(config(), seed).items()}, str(tmp))
            tmp.rename(path)
        out[fixture] = path
    register_folder(models_dir)
    return out


def register_folder(models_dir: Path) -> None:
    import sys

    folder_paths = sys.modules.get("folder_paths")
    if folder_paths is None:
        return
    folder = str(models_dir / FOLDER)
    known = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]
    if folder not in known:
        folder_paths.add_model_folder_path(FOLDER, folder, is_default=True)
    folder_paths.folder_names_and_paths[FOLDER][1].update(folder_paths.supported_pt_extensions)
