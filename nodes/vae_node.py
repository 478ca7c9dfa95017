"""Sliced VAE Decode: VAEDecode's output, with memory bounded whatever the clip length.

LATENT + VAE -> IMAGE (as VAEDecode returns it: ``[frames, H, W, C]``) and a
STRING report. The per-family work lives in ``vae_slicing``.
"""
from __future__ import annotations

import logging
import time

from comfy_api.latest import io

from ..lightcache_core.memory_probe import PeakMemory
from ..lightcache_core.report import DecodeReport
from . import compat, vae_slicing

log = logging.getLogger("LightCache")

# Extra words the node search matches (hosts whose V3 schema has search_aliases).
SEARCH_ALIASES = ["tiled vae decode", "vae decode", "decode", "video decode", "wan vae decode", "low vram decode",
                  "sliced decode"]

DESCRIPTION = (
    "Decodes latents like VAE Decode, in time slices, so memory no longer grows with the clip length. "
    "Wan 2.1/2.2 video VAEs: the causal feature cache is carried from slice to slice, so the frames equal VAE "
    "Decode's (no seams, no blending, unlike VAE Decode (Tiled)); each slice is moved into the output at once. "
    "Large frames are decoded in row bands: each band goes through every frame with its own causal cache and the "
    "rows of context its pixels need, so the device holds one band's cache instead of the whole frame's (about 4 "
    "GiB at 1280x720), at the cost of recomputing those context rows; layers run one frame at a time, and in row "
    "chunks with an exact halo where a layer would not fit. SD-style image VAEs: frame slices, exact. SVD's temporal decoder: its time context is the "
    "chunk it decodes, so auto takes the chunks VAE Decode takes (same frames); a smaller frames_per_slice saves "
    "memory but changes the frames. Other VAEs: ComfyUI's VAE.decode, with a log line."
)


class SlicedVAEDecode(io.ComfyNode):
    """Exact, memory-bounded VAE decode."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SlicedVAEDecode",
            display_name="Sliced VAE Decode",
            category=compat.NODE_CATEGORY,
            description=DESCRIPTION,
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode (image batch or video), as for VAE Decode."),
                io.Vae.Input("vae", tooltip="The VAE that decodes it (Wan 2.1/2.2, SD-style, SVD, or any other VAE)."),
                io.Int.Input("frames_per_slice", default=0, min=0, max=4096, step=1,
                             tooltip="Latent frames (video) or images decoded per slice. 0 = auto: as many as fit "
                                     "the memory budget (free memory, or budget_mb). The Wan causal cache is carried "
                                     "across slices, so any value gives the same frames. SVD: auto takes the chunk "
                                     "VAE Decode takes (same frames); a smaller value limits the decoder's time "
                                     "context and changes the frames (measured: 7 of 14 frames per slice, PSNR "
                                     "29.5 dB against VAE Decode; see the README)."),
                io.Int.Input("row_chunks", default=0, min=0, max=256, step=1,
                             tooltip="Wan only: decode each frame in this many row bands, each through every frame "
                                     "with its own causal cache and an exact halo (same result; the context rows are "
                                     "recomputed). 0 = auto: bands when the frame's cache would take more than 1 GiB "
                                     "or half the memory budget, at least 16 latent rows each; layers that still "
                                     "would not fit, and on CPU every layer PyTorch convolves by unfolding it, run "
                                     "in row chunks. 1 = whole frames.",
                             **compat.input_flags(advanced=True)),
                io.Int.Input("budget_mb", default=0, min=0, max=1 << 20, step=64,
                             tooltip="Working memory (MiB) one slice or row chunk may use. 0 = auto: half of the "
                                     "free memory of the VAE's device.",
                             **compat.input_flags(advanced=True)),
                io.Boolean.Input("tile_fallback", default=True,
                                 tooltip="If the device still runs out of memory, decode with spatial tiles "
                                         "(ComfyUI's decode_tiled, whole clip in time; blended overlaps, not exact) "
                                         "instead of failing."),
            ],
            outputs=[
                io.Image.Output(tooltip="The decoded frames, exactly as VAE Decode returns them ([frames, H, W, C])."),
                io.String.Output(display_name="report",
                                 tooltip="What the decode did: slices, frames per slice, peak memory, time, path."),
            ],
            **compat.schema_extras(search_aliases=SEARCH_ALIASES),
        )

    @classmethod
    def execute(cls, samples, vae, frames_per_slice: int = 0, row_chunks: int = 0, budget_mb: int = 0,
                tile_fallback: bool = True) -> io.NodeOutput:
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("Sliced VAE Decode: input 'vae' is empty or invalid; connect a VAE from Load VAE or a "
                             "checkpoint that contains one.")
        if not isinstance(samples, dict) or "samples" not in samples:
            raise ValueError("Sliced VAE Decode: input 'samples' is not a LATENT; connect a sampler's or an "
                             "Empty Latent node's output.")
        latent = samples["samples"]
        if getattr(latent, "is_nested", False):
            raise ValueError("Sliced VAE Decode: nested latents (audio+video) are not supported; use VAE Decode.")
        if frames_per_slice < 0 or row_chunks < 0 or budget_mb < 0:
            raise ValueError("Sliced VAE Decode: frames_per_slice, row_chunks and budget_mb must be 0 (auto) or more.")
        # row_chunks: 0 = auto bands and row chunks; 1 = whole frames; N = N row bands (row chunks inside them auto)
        options = vae_slicing.DecodeOptions(frames_per_slice=int(frames_per_slice),
                                            row_chunks=1 if row_chunks == 1 else 0, bands=int(row_chunks),
                                            budget_bytes=int(budget_mb) * 2**20, tile_fallback=bool(tile_fallback))
        start = time.perf_counter()
        with PeakMemory(vae.device, compat.process_rss_reader()) as peak:
            result = vae_slicing.decode(vae, latent, options)
        seconds = time.perf_counter() - start
        report = DecodeReport(slices=result.slices, frames_per_slice=result.frames_per_slice, peak_bytes=int(peak.peak),
                              seconds=seconds, path=result.path, notes=list(result.notes))
        text = report.to_text()
        log.info("[LightCache] %s", text.replace("\n", " |"))
        compat.send_progress_text(text)
        # The web extension draws the slices used and the peak memory from this UI output.
        return io.NodeOutput(result.images, text, ui={"lightcache_decode": [report.to_dict()]})
