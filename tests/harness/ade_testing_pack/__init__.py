"""Test-only companion of ComfyUI-AnimateDiff-Evolved (linked beside it by harness/third_party.py).

``LightCacheTestMotionModelLoader`` is AnimateDiff-Evolved's ``ADE_LoadAnimateDiffModel``
for the tiny test UNets, the way ``LightCacheTestUNetLoader`` is ``UNETLoader`` for them.
AnimateDiff-Evolved builds an SD1.5 motion model at SD1.5's sizes whatever the file holds
(``AnimateDiffModel.__init__``: widths 320/640/1280/1280, two modules per down block and
three per up block, and it calls a file with three down blocks SDXL), so no small file can
load through its loader, and the tiny SD1.5 UNets (3 levels of one resblock) have fewer
injection points than SD1.5. This node runs the same steps as its ``load_motion_module_gen2``
with AnimateDiff-Evolved's own functions and classes:

* ``normalize_ad_state_dict`` (its format/version detection: AnimateDiff, v2 with a mid block),
  with ``sd_type`` set to SD1.5 (the tiny UNets are ``supported_models.SD15``);
* an ``AnimateDiffModel`` whose blocks are its own ``MotionModule``/``VanillaTemporalModule``
  at the widths and counts the file holds (the only change: sizes read, not fixed);
* ``load_state_dict`` + its strict ``verify_load_result``, and ``create_MotionModelPatcher``.

Everything after the loader (``ADE_ApplyAnimateDiffModelSimple``, ``ADE_UseEvolvedSampling``,
injection into the UNet, its sampling wrappers and ``forward_timestep_embed_patch``) is the
unmodified pack. AnimateDiff-Evolved is found through DinkLink (the table it publishes on
``comfy.hooks`` for other packs), so the load order of the two packs does not matter.
"""
from __future__ import annotations

import re
import sys

import comfy.hooks
import comfy.model_management
import comfy.utils
import folder_paths

FOLDER = "animatediff_models"
_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.motion_modules\.(\d+)\.")
_CLASSES: dict = {}


def ade_modules():
    """AnimateDiff-Evolved's ``motion_module_ad`` and ``model_injection`` modules, via its DinkLink table."""
    link = getattr(comfy.hooks, "__DINKLINK", {}).get("ADE", {})
    model_cls, create = link.get("AnimateDiffModel"), link.get("create_MotionModelPatcher")
    if model_cls is None or create is None:
        raise RuntimeError("ComfyUI-AnimateDiff-Evolved is not loaded (its DinkLink entries are missing)")
    return sys.modules[model_cls.__module__], sys.modules[create.__module__]


def block_sizes(mm_state_dict: dict) -> dict[str, tuple[int, int]]:
    """``{"down_blocks.i" | "up_blocks.i" | "mid_block": (width, modules)}`` as the file holds them."""
    counts: dict[str, set[int]] = {}
    widths: dict[str, int] = {}
    for key, value in mm_state_dict.items():
        found = _BLOCK.match(key)
        if found:
            counts.setdefault(found.group(1), set()).add(int(found.group(2)))
            if key.endswith("temporal_transformer.proj_in.weight"):
                widths[found.group(1)] = int(value.shape[1])
    return {name: (widths[name], len(idx)) for name, idx in counts.items()}


def sized_model_class(mm):
    """AnimateDiff-Evolved's ``AnimateDiffModel`` with block sizes read from the state dict."""
    if mm in _CLASSES:
        return _CLASSES[mm]
    import torch.nn as nn

    class SizedAnimateDiffModel(mm.AnimateDiffModel):
        def __init__(self, mm_state_dict, mm_info, init_kwargs={}):
            sizes = block_sizes(mm_state_dict)
            # AnimateDiffModel's own __init__ for everything but the blocks: given only the position
            # tables (renamed so no block is recognised) it sets ops, PE length, attention types, effects.
            pes = sorted(k for k in mm_state_dict if k.endswith("pos_encoder.pe"))
            attn = sorted({int(m.group(1)) for k in pes if (m := re.search(r"\.attention_blocks\.(\d+)\.", k))})
            probe = {f"probe.attention_blocks.{a}.pos_encoder.pe": mm_state_dict[pes[0]] for a in attn}
            super().__init__(probe, mm_info, init_kwargs)

            def build(kind, name, idx):
                width, count = sizes[name]
                block = mm.MotionModule(width, temporal_pe=self.has_position_encoding, temporal_pe_max_len=self.encoding_max_len,
                                        block_type=kind, block_idx=idx, attention_block_types=self.attn_block_types, ops=self.ops)
                if count > len(block.motion_modules):
                    raise ValueError(f"{name}: {count} motion modules, AnimateDiff builds at most {len(block.motion_modules)}")
                block.motion_modules = block.motion_modules[:count]
                return block

            downs = sorted((int(n.split(".")[1]) for n in sizes if n.startswith("down_blocks.")))
            ups = sorted((int(n.split(".")[1]) for n in sizes if n.startswith("up_blocks.")))
            if downs:
                self.down_blocks = nn.ModuleList([build(mm.BlockType.DOWN, f"down_blocks.{i}", i) for i in downs])
                self.layer_channels = tuple(sizes[f"down_blocks.{i}"][0] for i in downs)
            if ups:
                self.up_blocks = nn.ModuleList([build(mm.BlockType.UP, f"up_blocks.{i}", i) for i in ups])
            if "mid_block" in sizes:
                self.mid_block = build(mm.BlockType.MID, "mid_block", 0)
                self.middle_channel = sizes["mid_block"][0]

    _CLASSES[mm] = SizedAnimateDiffModel
    return SizedAnimateDiffModel


class LightCacheTestMotionModelLoader:
    """AnimateDiff-Evolved's Load AnimateDiff Model, for motion modules sized to the tiny SD1.5 UNets."""

    CATEGORY = "_for_testing/lightcache"
    FUNCTION = "load"
    RETURN_TYPES = ("MOTION_MODEL_ADE",)
    RETURN_NAMES = ("MOTION_MODEL",)

    @classmethod
    def INPUT_TYPES(cls):
        names = folder_paths.get_filename_list(FOLDER) if FOLDER in folder_paths.folder_names_and_paths else []
        return {"required": {"model_name": (names, {"tooltip": "A motion module in animatediff_models/."})}}

    def load(self, model_name):
        mm, mi = ade_modules()
        path = folder_paths.get_full_path_or_raise(FOLDER, model_name)
        mm_state_dict = comfy.utils.load_torch_file(path, safe_load=True)
        mm_state_dict, mm_info = mm.normalize_ad_state_dict(mm_state_dict=mm_state_dict, mm_name=model_name)
        mm_info.sd_type = mm.ModelTypeSD.SD1_5  # counted by down blocks (4 = SD1.5); the tiny SD1.5 UNets have 3 levels
        mm_state_dict = mi.apply_mm_settings(model_dict=mm_state_dict, mm_settings=None)
        ad_wrapper = sized_model_class(mm)(mm_state_dict=mm_state_dict, mm_info=mm_info)
        ad_wrapper.to(comfy.model_management.unet_offload_device())
        load_result = ad_wrapper.load_state_dict(mm_state_dict, strict=False)
        ad_wrapper.to(comfy.model_management.unet_dtype())
        mi.verify_load_result(load_result=load_result, mm_info=mm_info)
        return (mi.create_MotionModelPatcher(model=ad_wrapper, load_device=comfy.model_management.get_torch_device(),
                                             offload_device=comfy.model_management.unet_offload_device()),)


NODE_CLASS_MAPPINGS = {"LightCacheTestMotionModelLoader": LightCacheTestMotionModelLoader}
