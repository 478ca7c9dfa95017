"""Chunked Model Patch: exact feature chunking that lowers the activation peak of computed steps.

MODEL -> MODEL. Clones the model and installs object patches plus an attention
override (see ``chunk_patches``); no global state is changed, and the patches
live and die with the returned model.
"""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..lightcache_core.chunking import ChunkPolicy
from . import chunk_patches, compat

log = logging.getLogger("LightCache")

MODES = ["auto", "count", "off"]
# Extra words the node search matches (hosts whose V3 schema has search_aliases).
SEARCH_ALIASES = ["chunk", "ffn chunk", "attention chunk", "chunked attention", "chunk feed forward",
                  "low vram", "memory", "oom"]

DESCRIPTION = (
    "Runs the largest activations of each computed step in pieces so their peak memory drops, with the same "
    "result as the unpatched model (up to floating-point rounding; no approximation). "
    "Wan and HunyuanVideo: whole transformer blocks along tokens (norms, modulation, residual adds, feed-forward "
    "networks, HunyuanVideo's fused single-stream layers); attention by query chunks against all keys and values "
    "(Wan self-attention computes its q/k/v projections, RMSNorm and RoPE per chunk, each once per token, and "
    "releases its keys and values before the block's feed-forward runs); cross-attention by query chunks. UNets (SD1.5/AnimateDiff, SVD): resnets and upsamplers along batch x frames, "
    "transformer feed-forwards along tokens, spatial attention by query chunks, temporal attention along spatial "
    "positions; GroupNorms are never split across the dimension they normalise. "
    "Works before or after LightCache Sampler / LightCache Model Patch, and with LoRAs. "
    f"Supported models: {chunk_patches.SUPPORTED}; any other model raises an error naming this node."
)


class ChunkedModelPatch(io.ComfyNode):
    """Clone the model and add exact chunking patches."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ChunkedModelPatch",
            display_name="Chunked Model Patch",
            category=compat.NODE_CATEGORY,
            description=DESCRIPTION,
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to patch (Wan, HunyuanVideo, SD1.5 UNet or SVD). "
                               "It is cloned; the input model is left unchanged."),
                io.Combo.Input("mode", options=MODES, default="auto",
                               tooltip="auto: pick chunk sizes from free memory (or from budget_mb) and the estimated "
                                       "working memory of each op; an op is chunked when it would take more than a "
                                       "quarter of the free memory. count: always split each chunked op into "
                                       "'chunks' pieces. off: no chunking (the model passes through)."),
                io.Int.Input("chunks", default=4, min=1, max=256, step=1,
                             tooltip="Pieces per chunked op in 'count' mode. More pieces lower the peak further and "
                                     "cost a little speed. Ignored in 'auto' mode."),
                io.Int.Input("budget_mb", default=0, min=0, max=1 << 20, step=64,
                             tooltip="'auto' mode: working memory (MiB) one chunked op may use. 0 = a quarter of "
                                     "the memory free on the compute device at each call (ComfyUI's own free-memory "
                                     "figure).",
                             **compat.input_flags(advanced=True)),
                io.Boolean.Input("chunk_ffn", default=True,
                                 tooltip="Chunk feed-forward networks along tokens (DiT MLPs, UNet transformer FFs)."),
                io.Boolean.Input("chunk_attention", default=True,
                                 tooltip="Chunk attention by queries against all keys and values (exact). For Wan "
                                         "also the self-attention q/k/v projections and RoPE."),
                io.Boolean.Input("chunk_resblocks", default=True,
                                 tooltip="UNets only: run resnets and upsamplers along batch x frames."),
            ],
            outputs=[io.Model.Output(tooltip="The model with chunking patches (a clone).")],
            **compat.schema_extras(search_aliases=SEARCH_ALIASES),
        )

    @classmethod
    def execute(cls, model, mode: str, chunks: int, budget_mb: int, chunk_ffn: bool, chunk_attention: bool,
                chunk_resblocks: bool) -> io.NodeOutput:
        if mode not in MODES:
            raise ValueError(f"Chunked Model Patch: input 'mode' is {mode!r}; choose one of {MODES}.")
        if chunks < 1:
            raise ValueError("Chunked Model Patch: input 'chunks' must be at least 1 (1 = no chunking).")
        policy = ChunkPolicy(mode=mode, count=max(int(chunks), 1), budget_bytes=int(budget_mb) * 2**20)
        settings = chunk_patches.ChunkSettings(policy=policy, ffn=chunk_ffn, attention=chunk_attention,
                                               resblocks=chunk_resblocks)
        patched = model.clone()
        report = chunk_patches.install(patched, settings)
        text = f"Chunked Model Patch ({mode}{', ' + str(chunks) + ' chunks' if mode == 'count' else ''}): {report.summary()}"
        log.info("[LightCache] %s", text)
        compat.send_progress_text(text)
        return io.NodeOutput(patched)
