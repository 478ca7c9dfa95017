"""Per-family decode strategies for Sliced VAE Decode; the only code here that touches VAE internals.

* Wan 2.1 / 2.2 causal VAEs: the decoder is called unit by unit (its own time
  units: one latent frame on 0.3.x, ``1 + 2 + 2 ...`` on the newer chunked
  decoder) with ONE feature cache carried across every unit and slice, so the
  result equals ``WanVAE.decode``. Each slice's pixels go straight into a
  preallocated output. Inside each call the spatially local layers after the
  low-resolution middle attention (residual blocks, upsamplers, head) run in
  row chunks with an exact halo (``lightcache_core.decode_slicing``).
* Per-frame image VAEs (SD1.5 ``AutoencoderKL``): frame slices, exact.
* SVD's temporal decoder: frame chunks; ComfyUI's own ``VAE.decode`` also
  decodes a chunk of frames at a time with the time context limited to the
  chunk, so equal to VAEDecode only when the chunk equals its batch.
* Anything else: ``vae.decode`` (which uses the host's chunked-IO protocol
  where a VAE offers it), with a log line.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

import comfy.model_management as model_management

from ..lightcache_core import decode_slicing as ds
from . import compat

log = logging.getLogger("LightCache")

# A residual block's working set per byte of input. CPU: PyTorch's native 3-D convolution unfolds its input
# (im2col: 27x for a 3x3x3 kernel) before a matrix product (measured). CUDA: an estimate for the block's
# activations and cuDNN workspace (not measured: no GPU was available to us).
ROW_COST_FACTOR = {"cuda": 8, "cpu": 32}
# On CPU, a layer that PyTorch would convolve by unfolding is split (auto) into chunks of about this working
# set: the unfolded copy shrinks with the chunk and the small chunks ran faster (measured at 96x160: 0.67x
# VAEDecode's time). Layers big enough for oneDNN are left whole unless the budget needs a split: chunks
# would drop them back to the unfolding path (measured at 480x832: 1.5x slower than whole frames).
LEAN_CHUNK_BYTES = 2 * 2**20


@dataclass
class DecodeOptions:
    """frames_per_slice: 0 = auto. row_chunks: 0 = auto, 1 = whole frames, N = largest layers split N ways.
    bands: Wan: 0 = auto, 1 = whole frames, N = N row bands, each decoded through every frame with its own
    causal cache (``_BandStack``). budget_bytes: 0 = from free memory. tile_fallback: spatial tiles on
    out-of-memory. frame_split: Wan: run the layers after the last temporal upsample one frame at a time
    (exact)."""

    frames_per_slice: int = 0
    row_chunks: int = 0
    budget_bytes: int = 0
    tile_fallback: bool = True
    frame_split: bool = True  # Wan: run the tail one frame at a time (exact; off only to compare)
    bands: int = 0


@dataclass
class DecodeResult:
    images: torch.Tensor
    path: str
    slices: int
    frames_per_slice: int
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- family detection


def family_of(vae, samples: torch.Tensor) -> str:
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        return "invalid"
    decoder = getattr(model, "decoder", None)
    if samples.ndim == 5 and _is_wan(model):
        return "wan"
    if decoder is not None and type(decoder).__name__ == "VideoDecoder" and samples.ndim == 4:
        return "svd"
    if samples.ndim == 4 and hasattr(model, "decode") and vae.latent_dim == 2 and not compat.vae_has_chunked_io(model):
        return "image"
    return "other"


def _is_wan(model) -> bool:
    decoder = getattr(model, "decoder", None)
    module = sys.modules.get(type(model).__module__)
    return (decoder is not None and module is not None and hasattr(model, "conv2")
            and isinstance(getattr(decoder, "upsamples", None), nn.Sequential)
            and isinstance(getattr(decoder, "head", None), nn.Sequential)
            and hasattr(module, "CausalConv3d")
            and (hasattr(module, "count_conv3d") or hasattr(module, "count_cache_layers")))


# ---------------------------------------------------------------- row-chunked layers (Wan)


_LOCAL_LEAVES = ("CausalConv3d", "Conv2d", "Conv3d", "RMS_norm", "SiLU", "Dropout", "Identity", "Upsample", "DupUp3D")
_LOCAL_CONTAINERS = ("Sequential", "ResidualBlock", "Resample", "Up_ResidualBlock", "_HeadLayer")


def _spatially_local(layer: nn.Module) -> bool:
    """True if every sub-module is a per-pixel op, a same-padded conv, or nearest upsampling."""
    for sub in layer.modules():
        name = type(sub).__name__
        if name in _LOCAL_CONTAINERS:
            continue
        if name not in _LOCAL_LEAVES:
            return False
        if name == "RMS_norm" and not getattr(sub, "channel_first", True):
            return False
        if name == "Upsample" and getattr(sub, "mode", "") not in ("nearest", "nearest-exact"):
            return False
    return True


class _HeadLayer(nn.Module):
    """The decoder head as one layer ``(x, feat_cache, feat_idx)``.

    Re-expresses the host's head loop (the only loop written out here): plain
    layers are called as is; a causal conv gets the cache slot and leaves the
    last two frames of its input in it (with the previous last frame in front
    when only one frame came in), as ComfyUI's ``Decoder3d`` does.
    """

    def __init__(self, head: nn.Sequential, conv_type: type) -> None:
        super().__init__()
        self.head = head
        self._conv_type = conv_type

    def forward(self, x, feat_cache=None, feat_idx=[0], *args, **kwargs):  # noqa: B006 (host signature)
        for layer in self.head:
            if isinstance(layer, self._conv_type) and feat_cache is not None:
                idx = feat_idx[0]
                cache_x = x[:, :, -2:].clone()
                prev = feat_cache[idx]
                if cache_x.shape[2] < 2 and isinstance(prev, torch.Tensor):
                    cache_x = torch.cat([prev[:, :, -1:].to(cache_x.device), cache_x], dim=2)
                x = layer(x, prev)
                feat_cache[idx] = cache_x
                feat_idx[0] += 1
            else:
                x = layer(x)
        return x


class _RowChunked(nn.Module):
    """Runs a host layer ``(x, feat_cache, feat_idx, ...)`` in row chunks with an exact halo."""

    def __init__(self, layer: nn.Module, halo: int, slots: int, planner: "_RowPlanner") -> None:
        super().__init__()
        self.layer = layer
        self.halo = halo
        self.slots = slots
        self.planner = planner
        # The first 3-D kernel the input meets: what the planner asks the CPU backend about.
        self.weight = next((m.weight for m in layer.modules() if isinstance(m, nn.Conv3d)
                            and getattr(m, "weight", None) is not None and m.weight.dim() == 5), None)

    def forward(self, x, feat_cache=None, feat_idx=[0], *args, **kwargs):  # noqa: B006 (host signature)
        chunks = self.planner.chunks(x, self.halo, self.weight)
        if feat_cache is None:
            def run(xr, local):
                return self.layer(xr, *args, **kwargs), 0
            y, _ = ds.row_chunked_call(run, x, [], self.halo, chunks)
            return y
        base = feat_idx[0]
        sub = list(feat_cache[base:base + self.slots])

        def run(xr, local):
            idx = [0]
            out = self.layer(xr, local, idx, *args, **kwargs)
            return out, idx[0]

        y, used = ds.row_chunked_call(run, x, sub, self.halo, chunks)
        feat_cache[base:base + used] = sub[:used]
        feat_idx[0] = base + used
        self.planner.record(chunks)
        return y


def _cache_slots(layer: nn.Module, conv_type: type) -> int:
    """Causal-cache slots a host layer uses: one per causal conv with a temporal kernel (a 1x1x1 shortcut conv
    has no cache; callers still read the count a call used from how far it advanced ``feat_idx``)."""
    return sum(1 for m in layer.modules() if isinstance(m, conv_type) and m.kernel_size[0] > 1)


def _frame_local(layer: nn.Module) -> bool:
    """True for layers that keep the frame count and mix frames only through causal convolutions
    with a ``CACHE_T``-frame cache: the Wan residual blocks, spatial-only resamplers, and Wan 2.2
    stages made of those."""
    name = type(layer).__name__
    if name == "ResidualBlock":
        return True
    if name == "Up_ResidualBlock":  # Wan 2.2: frame-local unless its shortcut or resampler adds frames
        shortcut = getattr(layer, "avg_shortcut", None)
        return ((shortcut is None or getattr(shortcut, "factor_t", 2) == 1)
                and all(_frame_local(m) for m in getattr(layer, "upsamples", [None])))
    return name == "Resample" and getattr(layer, "mode", "") in ("upsample2d", "none")


class _FrameByFrame(nn.Module):
    """Runs the decoder tail ``(x, feat_cache, feat_idx)`` one frame at a time, each frame through every
    layer, with the causal cache carried between frames (``decode_slicing.frame_chunked_call``)."""

    def __init__(self, layers: list, conv_type: type) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.slots = [_cache_slots(layer, conv_type) for layer in layers]

    def forward(self, x, feat_cache=None, feat_idx=[0], *args, **kwargs):  # noqa: B006 (host signature)
        if feat_cache is None:
            for layer in self.layers:
                x = layer(x)
            return x
        base = feat_idx[0]
        end = [base]

        def run(frames):
            idx = [base]
            for layer, slots in zip(self.layers, self.slots):
                start = idx[0]
                replaced = feat_cache[start:start + slots]  # one layer's slots: bounded extra memory
                frames = layer(frames, feat_cache, idx, *args, **kwargs)
                ds.keep_cache_frames(replaced, feat_cache, start)
                del replaced
            end[0] = idx[0]
            return frames

        y = ds.frame_chunked_call(run, x)
        feat_idx[0] = end[0]
        return y


class _RowPlanner:
    """Chooses row chunks per layer from a byte budget (or a fixed count for the largest layers)."""

    def __init__(self, budget_bytes: int, fixed_chunks: int = 0) -> None:
        self.budget = budget_bytes
        self.fixed = fixed_chunks
        self.largest = 0
        self.max_chunks = 1

    def chunks(self, x: torch.Tensor, halo: int, weight: torch.Tensor | None = None) -> int:
        """Row chunks for one call of a layer on ``x`` ``[b, c, t, rows, w]`` with a ``halo``-row halo;
        ``weight``: the layer's first 3-D kernel (lets the CPU policy ask how torch would convolve ``x``)."""
        rows = x.shape[-2]
        cost = x.numel() * x.element_size() * ROW_COST_FACTOR.get(x.device.type, ROW_COST_FACTOR["cuda"])
        self.largest = max(self.largest, cost)
        if self.fixed:
            if self.fixed <= 1:
                return 1
            budget = self.largest / self.fixed
        else:
            # auto: split a layer when its working set does not fit the free-memory budget, and on CPU
            # when torch would unfold it on CPU and it exceeds LEAN_CHUNK_BYTES.
            budget = self.budget
            if compat.cpu_conv_unfolds(x, weight):
                budget = min(budget, LEAN_CHUNK_BYTES) if budget > 0 else LEAN_CHUNK_BYTES
            if budget <= 0 or cost <= budget:
                return 1
        return ds.chunks_for_budget(cost, budget, rows, halo, min_rows=max(8, 4 * halo))

    def record(self, chunks: int) -> None:
        self.max_chunks = max(self.max_chunks, chunks)


class WanCausalDecoder:
    """Decodes a Wan latent video unit by unit with one feature cache carried throughout."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.decoder = model.decoder
        module = sys.modules[type(model).__module__]
        self.conv_type = module.CausalConv3d
        self.count = getattr(module, "count_cache_layers", None) or module.count_conv3d
        self.scheme = compat.wan_decode_unit_scheme(self.decoder)
        self.first_chunk = "first_chunk" in inspect.signature(self.decoder.forward).parameters
        self.unpatchify = getattr(module, "unpatchify", None) if self.first_chunk else None
        head_out = next((m.out_channels for m in reversed(list(self.decoder.head.modules())) if isinstance(m, self.conv_type)), 3)
        self.patch = int(round(math.sqrt(head_out / 3))) if self.unpatchify is not None else 1
        self.notes: list[str] = []

    def new_cache(self) -> list:
        return [None] * self.count(self.decoder)

    @contextlib.contextmanager
    def lean_layers(self, planner: "_RowPlanner | None", frame_split: bool = True):
        """Swap the decoder's upsample stack and head for lean wrappers for the duration.

        * The tail (every layer after the last temporal upsample, and the head)
          runs one output frame at a time with its causal cache carried
          (``frame_split``): 1/4 of the working set at the largest layers, exact.
        * With a ``planner``, each spatially local layer also runs in row chunks
          with an exact halo.
        Yields what was changed: ``{"frame_split": bool, "row_chunks": bool}``.
        """
        layers = list(self.decoder.upsamples)
        head = _HeadLayer(self.decoder.head, self.conv_type)
        if ds.conv_halo(head) is None or not _spatially_local(head):
            yield {"frame_split": False, "row_chunks": False}
            return
        tail_start = len(layers)
        while frame_split and tail_start > 0 and _frame_local(layers[tail_start - 1]):
            tail_start -= 1
        wrapped = [self._row_chunked(layer, planner) for layer in layers]
        head_wrapped = self._row_chunked(head, planner)
        if frame_split:
            stack = wrapped[:tail_start] + [_FrameByFrame(wrapped[tail_start:] + [head_wrapped], self.conv_type)]
        else:
            stack = wrapped + [head_wrapped]
        original = (self.decoder._modules["upsamples"], self.decoder._modules["head"])
        self.decoder._modules["upsamples"] = nn.Sequential(*stack)
        self.decoder._modules["head"] = nn.Sequential()
        try:
            yield {"frame_split": frame_split, "row_chunks": planner is not None and any(
                isinstance(m, _RowChunked) for m in self.decoder.upsamples.modules())}
        finally:
            self.decoder._modules["upsamples"], self.decoder._modules["head"] = original

    def _row_chunked(self, layer: nn.Module, planner: "_RowPlanner | None", keep_temporal: bool = True) -> nn.Module:
        """``layer`` wrapped to run in row chunks, or ``layer`` itself where that is not shown exact.

        ``keep_temporal``: leave temporal upsamplers unwrapped on hosts whose decoder splits frames after them
        by their type (the decoder's own loop runs them); row bands call every layer themselves."""
        if planner is None:
            return layer
        if keep_temporal and self.scheme == "pairs" and getattr(layer, "mode", None) == "upsample3d":
            return layer
        halo = ds.conv_halo(layer)
        if halo is None or not _spatially_local(layer):
            return layer
        slots = _cache_slots(layer, self.conv_type)
        return _RowChunked(layer, halo, slots, planner)

    def decode_unit(self, z_unit: torch.Tensor, feat_map: list, first: bool, unpatchify: bool = True) -> torch.Tensor:
        """One decoder call: ``[b, z, t, h, w]`` latent unit -> ``[b, 3, frames, H, W]`` pixels."""
        x = self.model.conv2(z_unit)  # 1x1x1 conv: per frame, so per unit is exact
        kwargs = {"first_chunk": True} if (first and self.first_chunk) else {}
        out = self.decoder(x, feat_cache=feat_map, feat_idx=[0], **kwargs)
        if isinstance(out, (list, tuple)):  # newer chunked decoder returns its chunks
            out = out[0] if len(out) == 1 else torch.cat(list(out), 2)
        if unpatchify and self.unpatchify is not None and self.patch > 1:
            out = self.unpatchify(out, patch_size=self.patch)
        return out

    @contextlib.contextmanager
    def capture_middle(self):
        """The decoder with its upsample stack swapped for a :class:`_Capture` and its head emptied, so a
        decoder call returns the middle blocks' output (its causal cache carried as usual); yields the capture."""
        capture = _Capture()
        original = (self.decoder._modules["upsamples"], self.decoder._modules["head"])
        self.decoder._modules["upsamples"] = nn.Sequential(capture)
        self.decoder._modules["head"] = nn.Sequential()
        try:
            yield capture
        finally:
            self.decoder._modules["upsamples"], self.decoder._modules["head"] = original


# ---------------------------------------------------------------- row bands through every frame (Wan)

# Auto: one row band's causal cache stays under this (and under half the memory budget). A Wan 2.1 VAE's
# cache at 1280x720 is about 4 GiB (bf16; two frames per causal conv, most of it at full resolution), the
# bulk of VAE Decode's peak, and a whole-frame decode must hold all of it. Bands hold one band's share.
BAND_CACHE_BYTES = 2**30
# Auto: bands are at least this many latent rows. The decoder reads about 13 latent rows of context per side
# (most of it in its low-resolution layers, which cost little), so thinner bands would recompute more than
# they save.
MIN_BAND_ROWS = 16


class _Capture(nn.Module):
    """Stands in for the decoder's upsample stack: returns its input (the output of conv1 and the middle
    blocks) and records the extra arguments the host's decoder passes the stack's layers."""

    def __init__(self) -> None:
        super().__init__()
        self.extras: tuple = ((), {})

    def forward(self, x, feat_cache=None, feat_idx=[0], *args, **kwargs):  # noqa: B006 (host signature)
        self.extras = (args, kwargs)
        return x


class _BandStack:
    """The decoder's upsample stack and head, run on row bands of the middle blocks' output.

    Each band goes through every frame with its own causal cache: its rows at every layer are the rows
    ``decode_slicing.band_plan`` gives (its output rows and the context they need), and the rows a layer
    computes beyond those are cropped before the next layer. Layers that keep the frame count, and the
    Wan 2.1 temporal upsamplers (one frame in, two out), run one frame at a time, depth first, with the
    causal cache carried (``keep_cache_frames``), so only a frame or two of each layer is alive at once.
    Only the host's own layers run; the head runs through :class:`_HeadLayer`.
    """

    def __init__(self, runner: "WanCausalDecoder", planner: "_RowPlanner | None", frame_split: bool) -> None:
        self.runner = runner
        layers = list(runner.decoder.upsamples) + [_HeadLayer(runner.decoder.head, runner.conv_type)]
        self.ok = all(ds.conv_halo(layer) is not None and _spatially_local(layer) for layer in layers)
        self.host_layers = layers
        self.halos = [ds.conv_halo(layer) or 0 for layer in layers]
        self.slots = [_cache_slots(layer, runner.conv_type) for layer in layers]
        self.offsets = [sum(self.slots[:i]) for i in range(len(layers))]
        self.split = [frame_split and (_frame_local(layer) or _temporal_upsample(layer, runner.conv_type)
                                       or i == len(layers) - 1) for i, layer in enumerate(layers)]
        self.layers = [runner._row_chunked(layer, planner, keep_temporal=False) for layer in layers]
        self.scales: list[int] | None = None

    def cache(self) -> list:
        return [None] * sum(self.slots)

    def measure(self, x: torch.Tensor, extras: tuple) -> bool:
        """Each layer's row scale, from a 4 x 4 probe with ``x``'s channels run as a first unit (a cache of
        its own); False when a layer does not scale rows and columns alike by a whole factor."""
        args, kwargs = extras
        probe = x.new_zeros(x.shape[:2] + (1, 4, 4))
        cache, idx = self.cache(), [0]
        scales = []
        for layer in self.host_layers:
            y = layer(probe, cache, idx, *args, **kwargs)
            if isinstance(y, (list, tuple)) or y.dim() != 5:
                return False
            s, r = divmod(y.shape[-2], probe.shape[-2])
            if r or s < 1 or y.shape[-1] != s * probe.shape[-1]:
                return False
            scales.append(s)
            probe = y
        self.scales = scales
        return True

    def plan(self, rows: int, lo: int, hi: int) -> list:
        """``band_plan`` for output rows ``[lo, hi)`` (head-output rows) of a stack input of ``rows`` rows."""
        return ds.band_plan(rows, self.scales, self.halos, lo, hi)

    def cache_bytes(self, batch: int, elem: int, width: int, steps: list) -> int:
        """The causal cache one band holds: two frames of each temporal conv's input rows, at every layer
        (``width``: the stack input's columns)."""
        total, scale = 0, 1
        for layer, step, s in zip(self.host_layers, steps, self.scales):
            per_row = sum(2 * m.in_channels for m in layer.modules()
                          if isinstance(m, self.runner.conv_type) and m.kernel_size[0] > 1)
            total += per_row * width * scale * (step.hi - step.lo)
            scale *= s
        return total * batch * elem

    def run(self, x: torch.Tensor, steps: list, cache: list, extras: tuple, emit) -> None:
        """One unit of one band: ``x`` holds the band's input rows (``steps[0].lo:steps[0].hi``); ``emit(y)``
        gets the head's output rows of the band, frame group by frame group, in time order."""
        self._layer(0, x, steps, cache, extras, emit)

    def _layer(self, i: int, x: torch.Tensor, steps: list, cache: list, extras: tuple, emit) -> None:
        """Layer ``i`` on ``x`` (one frame at a time where it may), then the layers after it, depth first."""
        if i == len(self.layers):
            emit(x)
            return
        args, kwargs = extras
        frames = x.shape[2]
        pieces = [x[:, :, j:j + 1] for j in range(frames)] if self.split[i] and frames > 1 else [x]
        del x
        while pieces:
            piece = pieces.pop(0)
            start = self.offsets[i]
            replaced = cache[start:start + self.slots[i]]
            idx = [start]
            y = self.layers[i](piece, cache, idx, *args, **kwargs)
            if idx[0] != start + self.slots[i]:
                raise ValueError(f"decoder layer {i} used {idx[0] - start} cache slots, expected {self.slots[i]}")
            ds.keep_cache_frames(replaced, cache, start)
            ds.compact_cache(cache, start, idx[0])
            del replaced, piece
            y = _crop_rows(y, steps[i])
            self._layer(i + 1, y, steps, cache, extras, emit)
            del y


def _temporal_upsample(layer: nn.Module, conv_type: type) -> bool:
    """A Wan 2.1-style temporal upsampler (``Resample`` in ``upsample3d`` mode): a causal (3, 1, 1) conv with
    a two-frame cache doubling channels, then frames interleaved and a per-frame spatial upsample. Fed one
    frame at a time with its cache carried, it gives the frames it gives for several at once."""
    return (type(layer).__name__ == "Resample" and getattr(layer, "mode", "") == "upsample3d"
            and isinstance(getattr(layer, "time_conv", None), conv_type))


def _crop_rows(x: torch.Tensor, step) -> torch.Tensor:
    rows = x.shape[-2]
    if step.keep_lo == 0 and step.keep_hi == rows:
        return x
    return x.narrow(-2, step.keep_lo, step.keep_hi - step.keep_lo).contiguous()


# ---------------------------------------------------------------- the decode entry


def device_of(vae) -> torch.device:
    return torch.device(vae.device)


def _budget(vae, options: DecodeOptions) -> int:
    if options.budget_bytes > 0:
        return int(options.budget_bytes)
    free = compat.free_memory_bytes(vae.device, vae.patcher)
    return max(int(free * 0.5), 64 * 2**20)


def _output_frames(vae, latent_frames: int) -> int:
    ratio = vae.upscale_ratio[0] if isinstance(vae.upscale_ratio, tuple) else None
    if callable(ratio):
        return int(ratio(latent_frames))
    return latent_frames


def _spatial(vae) -> tuple[int, int]:
    r = vae.upscale_ratio
    if isinstance(r, tuple):
        return int(r[1]), int(r[2])
    return int(r), int(r)


def _load(vae, samples: torch.Tensor, per_call_shape: tuple) -> None:
    memory = vae.memory_used_decode(per_call_shape, vae.vae_dtype)
    model_management.load_models_gpu([vae.patcher], memory_required=memory, force_full_load=getattr(vae, "disable_offload", False))


def decode(vae, samples: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    """Decode ``samples`` like ``VAEDecode`` (IMAGE ``[frames, H, W, C]``), slice by slice."""
    vae.throw_exception_if_invalid()
    with torch.inference_mode():
        return _decode(vae, samples, options)


def _decode(vae, samples: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    family = family_of(vae, samples)
    try:
        if family == "wan":
            return _decode_wan(vae, samples, options)
        if family in ("image", "svd"):
            return _decode_frames(vae, samples, options, family)
    except model_management.OOM_EXCEPTION:
        if not options.tile_fallback:
            raise
        oom = True
    else:
        oom = False
    if oom:
        return _decode_tiled(vae, samples)
    log.info("[LightCache] Sliced VAE Decode: no slicing strategy for this VAE (%s); using ComfyUI's VAE.decode",
             type(vae.first_stage_model).__name__)
    images = vae.decode(samples)
    if images.ndim == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return DecodeResult(images, "vae.decode (fallback)", 1, int(samples.shape[2] if samples.ndim == 5 else samples.shape[0]),
                        [f"no slicing strategy for {type(vae.first_stage_model).__name__}; ComfyUI's decode was used"])


def _decode_tiled(vae, samples: torch.Tensor) -> DecodeResult:
    log.warning("[LightCache] Sliced VAE Decode ran out of memory; retrying with spatial tiles (no temporal split)")
    model_management.soft_empty_cache()
    sx, sy = _spatial(vae)
    tile = max(8, 256 // max(sx, 1))
    if samples.ndim == 5:
        images = vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 4, tile_t=10**6, overlap_t=1)
    else:
        images = vae.decode_tiled(samples, tile_x=tile, tile_y=tile, overlap=tile // 4)
    if images.ndim == 5:
        images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return DecodeResult(images, "spatial tiles (out-of-memory fallback)", 1, 0,
                        ["out of memory: fell back to spatial tiles blended over overlaps (not exact)"])


def _decode_wan(vae, samples: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    model = vae.first_stage_model
    runner = WanCausalDecoder(model)
    b, _, t, h, w = samples.shape
    budget = _budget(vae, options)
    _load(vae, samples, (1,) + tuple(samples.shape[1:2]) + (1, h, w))
    sx, sy = _spatial(vae)
    frames_out = _output_frames(vae, t)
    out_dtype = compat.vae_output_dtype()
    # Per latent frame on the device: its pixels (4 frames) before they are copied out.
    per_frame_out = 4 * 3 * (h * sy) * (w * sx) * max(torch.finfo(vae.vae_dtype).bits // 8, 4)
    if options.frames_per_slice > 0:
        per_slice = int(options.frames_per_slice)
    else:
        per_slice = ds.frames_per_slice_for_budget(t, per_frame_out, budget // 4)
    planner = None
    if options.row_chunks != 1:
        planner = _RowPlanner(budget if options.row_chunks == 0 else 0, options.row_chunks)
    # Videos per decoder call: ComfyUI's own rule (free memory // its estimate), so a batch is decoded in the
    # same groups as VAEDecode decodes it.
    est = vae.memory_used_decode(samples.shape, vae.vae_dtype)
    videos = max(1, min(b, int(compat.free_memory_bytes(device_of(vae), vae.patcher) // max(est, 1))))
    if options.bands != 1:
        banded = _decode_wan_bands(vae, samples, options, runner, budget, planner, videos, frames_out, out_dtype)
        if banded is not None:
            return banded
    units = ds.unit_ranges(t, runner.scheme)
    slices = ds.group_units(units, per_slice)
    writer = None
    notes = [f"units: {runner.scheme} ({len(units)} decoder calls per video)"]
    pbar = compat.progress_bar(math.ceil(b / videos) * len(units))
    device = vae.device
    same_device = torch.device(device) == torch.device(vae.output_device)
    with runner.lean_layers(planner, options.frame_split) as lean:
        chunked = lean["row_chunks"]
        if lean["frame_split"]:
            notes.append("tail layers one frame at a time (causal cache carried)")
        if planner is not None and not chunked:
            notes.append("decoder structure not recognised: whole-frame layers (no row chunks)")
            log.info("[LightCache] Sliced VAE Decode: Wan decoder structure differs; decoding whole frames per unit")
        for bi in range(0, b, videos):
            feat_map = runner.new_cache()
            frame = 0
            for group in slices:
                pieces = []
                for (u0, u1) in group:
                    compat.throw_if_interrupted()
                    z = samples[bi:bi + videos, :, u0:u1].to(vae.vae_dtype).to(device)
                    pieces.append(runner.decode_unit(z, feat_map, first=(u0 == 0)))
                    del z
                    pbar.update(1)
                    if same_device:  # nothing to batch up for a copy: write each unit at once
                        frame, writer = _flush(pieces, writer, frame, bi, b, frames_out, vae, out_dtype)
                frame, writer = _flush(pieces, writer, frame, bi, b, frames_out, vae, out_dtype)
            del feat_map
    if planner is not None and chunked:
        notes.append(f"row chunks: up to {planner.max_chunks} per layer (exact halo)")
    images = writer.result()
    images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return DecodeResult(images, "wan causal slices", len(slices) * math.ceil(b / videos), per_slice, notes)


def _choose_bands(stack: "_BandStack", rows: int, width: int, batch: int, elem: int, options: DecodeOptions,
                  budget: int) -> int:
    """Row bands: the node's number, or (auto) the fewest whose largest band cache fits
    ``min(BAND_CACHE_BYTES, budget / 2)``, at most one band per ``MIN_BAND_ROWS`` latent rows."""
    if options.bands > 0:
        return max(1, min(int(options.bands), rows))
    most = max(1, rows // MIN_BAND_ROWS)
    target = min(BAND_CACHE_BYTES, budget // 2)
    scale = math.prod(stack.scales)
    for n in range(1, most + 1):
        worst = max(stack.cache_bytes(batch, elem, width, stack.plan(rows, lo * scale, hi * scale))
                    for lo, hi in ds.split_rows(rows, n))
        if worst <= target:
            return n
    return most


def _decode_wan_bands(vae, samples: torch.Tensor, options: DecodeOptions, runner: "WanCausalDecoder", budget: int,
                      planner: "_RowPlanner | None", videos: int, frames_out: int, out_dtype) -> DecodeResult | None:
    """Decode in row bands, each through every frame with its own causal cache (None: not for this decode).

    Pass 1 runs conv1 and the middle blocks (whose attention mixes a whole frame) unit by unit with the
    decoder's own cache and keeps their low-resolution output (on the output device when it is not the
    VAE's). Pass 2 runs the upsample stack and the head band by band (``_BandStack``) and writes each
    band's rows of each unit's frames into the output. The device holds one band's cache instead of the
    whole frame's; the context rows each band recomputes cost time (mostly in the cheap low-resolution
    layers).
    """
    b, _, t, h, w = samples.shape
    if options.bands == 0 and h < 2 * MIN_BAND_ROWS:
        return None
    stack = _BandStack(runner, planner, options.frame_split)
    conv1 = getattr(runner.decoder, "conv1", None)
    if not stack.ok or not isinstance(conv1, runner.conv_type):
        return None
    device = vae.device
    first = ((), {"first_chunk": True} if runner.first_chunk else {})
    probe = torch.zeros((videos, conv1.out_channels, 1, 1, 1), dtype=vae.vae_dtype, device=device)
    if not stack.measure(probe, first):
        return None
    del probe
    elem = torch.empty((), dtype=vae.vae_dtype).element_size()
    bands = ds.split_rows(h, _choose_bands(stack, h, w, videos, elem, options, budget))
    if len(bands) <= 1:
        return None
    scale = math.prod(stack.scales)
    patch = runner.patch if runner.unpatchify is not None else 1
    units = ds.unit_ranges(t, runner.scheme)
    store = torch.device(vae.output_device)
    if store == torch.device(device):
        store = None
    pbar = compat.progress_bar(math.ceil(b / videos) * len(units) * (1 + len(bands)))
    writer = None
    for bi in range(0, b, videos):
        mids, extras = [], []
        feat_map = runner.new_cache()
        with runner.capture_middle() as capture:
            for (u0, u1) in units:
                compat.throw_if_interrupted()
                z = samples[bi:bi + videos, :, u0:u1].to(vae.vae_dtype).to(device)
                mid = runner.decode_unit(z, feat_map, first=(u0 == 0), unpatchify=False)
                del z
                mids.append(mid.to(store) if store is not None else mid)
                extras.append(capture.extras)
                del mid
                pbar.update(1)
        del feat_map
        for lo, hi in bands:
            steps = stack.plan(h, lo * scale, hi * scale)
            cache = stack.cache()
            frame = [0]

            def emit(y, lo=lo):
                nonlocal writer
                if patch > 1:
                    y = runner.unpatchify(y, patch_size=patch)
                if writer is None:
                    writer = ds.SliceWriter(b, frames_out, h * scale * patch, y.shape[-1], y.shape[1], vae.output_device,
                                            out_dtype)
                frame[0] += writer.write(frame[0], y, vae.process_output, batch_index=bi, row_start=lo * scale * patch)

            for mid, extra in zip(mids, extras):
                compat.throw_if_interrupted()
                x = mid.narrow(-2, steps[0].lo, steps[0].hi - steps[0].lo).to(device).contiguous()
                stack.run(x, steps, cache, extra, emit)
                del x
                pbar.update(1)
            del cache
        del mids
    notes = [f"units: {runner.scheme} ({len(units)} decoder calls per video)",
             f"row bands: {len(bands)} of <= {max(hi - lo for lo, hi in bands)} latent rows, each through every frame "
             "with its own causal cache (exact halo)"]
    if any(stack.split):
        notes.append("layers one frame at a time where they keep or double the frames (causal cache carried)")
    if planner is not None and planner.max_chunks > 1:
        notes.append(f"row chunks: up to {planner.max_chunks} per layer (exact halo)")
    images = writer.result()
    images = images.reshape(-1, images.shape[-3], images.shape[-2], images.shape[-1])
    return DecodeResult(images, "wan causal row bands", len(units) * math.ceil(b / videos), 1, notes)


def _flush(pieces: list, writer, frame: int, bi: int, b: int, frames_out: int, vae, out_dtype):
    """Copy the decoded units in ``pieces`` into the output (allocating it on first use); empties ``pieces``."""
    if not pieces:
        return frame, writer
    y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 2)
    pieces.clear()
    if writer is None:
        writer = ds.SliceWriter(b, frames_out, y.shape[-2], y.shape[-1], y.shape[1], vae.output_device, out_dtype)
    frame += writer.write(frame, y, vae.process_output, batch_index=bi)
    return frame, writer


def _decode_frames(vae, samples: torch.Tensor, options: DecodeOptions, family: str) -> DecodeResult:
    """Image VAEs (and SVD's temporal decoder): decode ``frames_per_slice`` images per call."""
    model = vae.first_stage_model
    n = samples.shape[0]
    budget = _budget(vae, options)
    per_frame = vae.memory_used_decode((1,) + tuple(samples.shape[1:]), vae.vae_dtype)
    if options.frames_per_slice > 0:
        per_slice = min(n, int(options.frames_per_slice))
    elif family == "svd" and options.budget_bytes <= 0:
        # SVD's time context is the chunk: auto takes the chunk VAE.decode would take (free memory // its
        # per-frame estimate), so the frames stay VAE Decode's; only an explicit setting trades quality.
        free = compat.free_memory_bytes(vae.device, vae.patcher)
        per_slice = max(1, min(n, int(free // max(per_frame, 1))))
    else:
        per_slice = ds.frames_per_slice_for_budget(n, per_frame, budget)
    _load(vae, samples, (per_slice,) + tuple(samples.shape[1:]))
    out_dtype = compat.vae_output_dtype()
    writer = None
    slices = 0
    pbar = compat.progress_bar(math.ceil(n / per_slice))
    for start in range(0, n, per_slice):
        compat.throw_if_interrupted()
        z = samples[start:start + per_slice].to(vae.vae_dtype).to(vae.device)
        y = model.decode(z)
        del z
        if writer is None:
            writer = ds.SliceWriter(1, n, y.shape[-2], y.shape[-1], y.shape[1], vae.output_device, out_dtype)
        writer.write(start, y, vae.process_output)
        del y
        slices += 1
        pbar.update(1)
    notes = []
    if family == "svd" and per_slice < n:
        notes.append(f"SVD temporal decoder: time context limited to {per_slice}-frame chunks (as ComfyUI's own "
                     "batched decode does); equals VAEDecode only when it decodes the same chunks")
    images = writer.result()[0]
    return DecodeResult(images, "svd frame chunks" if family == "svd" else "image frame slices", slices, per_slice, notes)
