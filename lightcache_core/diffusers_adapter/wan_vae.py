"""``AutoencoderKLWan``: the sliced decode (latent frame by latent frame, into a preallocated output)."""
from __future__ import annotations

import weakref
from typing import Any

import torch

from .config import LightCacheDiffusersError


# ----------------------------------------------------------------------------- sliced Wan decode


def _is_wan_vae(vae: Any) -> bool:
    return hasattr(vae, "_feat_map") or (hasattr(vae, "clear_cache") and hasattr(vae, "decoder") and
                                         hasattr(vae, "post_quant_conv") and type(vae).__name__.startswith("AutoencoderKLWan"))


def sliced_wan_decode(vae: torch.nn.Module, z: torch.Tensor, frames_per_slice: int = 1,
                      output_device: torch.device | str | None = None) -> torch.Tensor:
    """``AutoencoderKLWan.decode(z).sample``, decoded a few latent frames at a time into a preallocated output.

    The decoder runs one latent frame per call, as ``AutoencoderKLWan._decode`` does,
    with the VAE's causal cache (``_feat_map``) carried from call to call, so the
    frames are the ones ``decode`` makes; each slice of ``frames_per_slice`` latent
    frames is clamped and copied at once into the output (on ``output_device``; the
    latent's device by default; a CPU output is pinned when CUDA is present), instead
    of growing one video on the device by ``torch.cat`` per frame and clamping a
    second copy of it.
    """
    if z.dim() != 5:
        raise ValueError(f"sliced_wan_decode expects a [batch, channels, frames, height, width] latent, got {tuple(z.shape)}")
    frames_per_slice = max(1, int(frames_per_slice))
    device = torch.device(output_device) if output_device is not None else z.device
    patch = getattr(getattr(vae, "config", None), "patch_size", None)
    unpatchify = None
    if patch is not None:
        unpatchify = _wan_unpatchify()
    vae.clear_cache()
    out = None
    written = 0
    try:
        num_frames = z.shape[2]
        for start in range(0, num_frames, frames_per_slice):
            stop = min(num_frames, start + frames_per_slice)
            x = vae.post_quant_conv(z[:, :, start:stop])  # a 1x1x1 causal conv: per frame
            pieces = []
            for i in range(stop - start):
                vae._conv_idx = [0]
                frame = x[:, :, i:i + 1]
                if start + i == 0:
                    pieces.append(vae.decoder(frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=True))
                else:
                    pieces.append(vae.decoder(frame, feat_cache=vae._feat_map, feat_idx=vae._conv_idx))
            piece = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
            del pieces, x
            if unpatchify is not None:
                piece = unpatchify(piece, patch_size=patch)
            piece = torch.clamp(piece, min=-1.0, max=1.0)
            if out is None:
                total = piece.shape[2] + _temporal_ratio(vae) * (num_frames - (stop - start))
                pin = device.type == "cpu" and piece.device.type == "cuda" and torch.cuda.is_available()
                out = torch.empty(piece.shape[:2] + (total,) + piece.shape[3:], dtype=piece.dtype, device=device,
                                  pin_memory=pin)
            t = piece.shape[2]
            if written + t > out.shape[2]:
                raise RuntimeError(f"sliced decode: the decoder made {written + t} frames, more than the "
                                   f"{out.shape[2]} this VAE's temporal ratio predicts")
            out[:, :, written:written + t].copy_(piece, non_blocking=out.is_pinned())
            written += t
            del piece
    finally:
        vae.clear_cache()
    if out.is_pinned():
        torch.cuda.synchronize()
    if written != out.shape[2]:
        out = out[:, :, :written]
    return out


def _temporal_ratio(vae: torch.nn.Module) -> int:
    """Video frames per latent frame after the first (4 for Wan 2.1 / 2.2 VAEs)."""
    ratio = getattr(vae, "temporal_compression_ratio", None)
    if isinstance(ratio, int) and ratio > 0:
        return ratio
    downs = getattr(getattr(vae, "config", None), "temperal_downsample", None) or [False, True, True]
    return 2 ** sum(bool(d) for d in downs)


def _wan_unpatchify():
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
    return unpatchify


class _SlicedDecode:
    """``vae.decode`` replaced on one instance: the sliced decode, with ``decode``'s signature and outputs."""

    def __init__(self, vae: torch.nn.Module, frames_per_slice: int, output_device) -> None:
        self._vae = weakref.ref(vae)
        self.frames_per_slice = frames_per_slice
        self.output_device = output_device
        self.lightcache_sliced_decode = True

    def __call__(self, z: torch.Tensor, return_dict: bool = True):
        vae = self._vae()
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)  # what diffusers' apply_forward_hook does (accelerate offloading)
        ratio = getattr(vae, "spatial_compression_ratio", 8)
        tile = (getattr(vae, "tile_sample_min_height", 256) // ratio, getattr(vae, "tile_sample_min_width", 256) // ratio)
        if getattr(vae, "use_tiling", False) and (z.shape[-1] > tile[1] or z.shape[-2] > tile[0]):
            return type(vae).decode(vae, z, return_dict=return_dict)  # tiled decoding stays diffusers'
        video = sliced_wan_decode(vae, z, self.frames_per_slice, self.output_device)
        if not return_dict:
            return (video,)
        from diffusers.models.autoencoders.vae import DecoderOutput
        return DecoderOutput(sample=video)


def enable_sliced_decode(vae: torch.nn.Module, frames_per_slice: int = 1, output_device=None) -> None:
    """Make ``vae.decode`` (an ``AutoencoderKLWan``) the sliced decode; ``disable_sliced_decode`` undoes it."""
    if not _is_wan_vae(vae):
        raise LightCacheDiffusersError(f"sliced decode is for AutoencoderKLWan, not {type(vae).__name__}.")
    vae.decode = _SlicedDecode(vae, frames_per_slice, output_device)


def disable_sliced_decode(vae: torch.nn.Module) -> None:
    if getattr(vae.__dict__.get("decode"), "lightcache_sliced_decode", False):
        del vae.decode
