"""Per-family installers for exact feature chunking (the Chunked Model Patch node).

Everything here is installed on a *cloned* ModelPatcher, through public hooks only:

* ``add_object_patch("diffusion_model.<path>.forward", fn)`` for row-wise
  sub-modules (feed-forward networks, UNet resnets, upsamplers, Wan attention
  modules). ComfyUI sets these attributes when it loads the model and restores
  them on unload; the module's ``__call__`` looks ``forward`` up at call time, so a
  caching wrapper or block replacement added later (in any order) still reaches
  the chunked forward: nothing captures a pre-patch bound method.
* ``transformer_options["optimized_attention_override"]`` for attention: every
  ``optimized_attention`` call in the model is split into query chunks against the
  full keys and values (exact: each query row's softmax runs over all keys). A
  previously installed override (SageAttention nodes and the like) is chained:
  each chunk goes through it.

Exactness rules (see docs/ and the node description):

* a feed-forward network is row-wise: any row split of its input is exact;
* attention rows are independent per *query*: split queries, never keys;
* UNet resnets normalise per sample (GroupNorm over C x H x W of one frame, or
  over C x T x H x W of one video for SVD's temporal resnet), so they are split
  along dim 0 only, which never splits a GroupNorm's statistics;
* Wan self-attention is re-expressed minimally (its own ``q/k/v/o``, ``norm_q``,
  ``norm_k`` and the host's ``apply_rope1``/``optimized_attention``): keys and
  values are computed chunk by chunk into full buffers (RoPE applied with the
  matching rows of ``freqs``), then queries chunk by chunk attend to them. The
  module is only patched when ``compat.wan_self_attention_parts`` recognises the
  host's layout; otherwise it stays unpatched (logged) and attention is still
  query-chunked through the override.
"""
from __future__ import annotations

import logging
import math
import threading
import types
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..lightcache_core.chunking import ChunkPolicy, balanced_pieces, plan_chunk_rows, run_chunked
from . import compat

log = logging.getLogger("LightCache")

NODE = "Chunked Model Patch"


# ---------------------------------------------------------------- bookkeeping

class ChunkStats:
    """Counts of chunked executions per op kind (process-wide; tests and logs read it).

    ``chunks[kind]`` adds the number of pieces each time an op really ran in more
    than one piece; ``calls[kind]`` counts every call that went through a patch.
    """

    def __init__(self) -> None:
        self.chunks: Counter = Counter()
        self.calls: Counter = Counter()
        self._lock = threading.Lock()

    def record(self, kind: str, n_chunks: int) -> None:
        with self._lock:
            self.calls[kind] += 1
            if n_chunks > 1:
                self.chunks[kind] += n_chunks

    def reset(self) -> None:
        with self._lock:
            self.chunks.clear()
            self.calls.clear()

    def total_chunks(self) -> int:
        return sum(self.chunks.values())


STATS = ChunkStats()

_LOCAL = threading.local()  # .depth > 0 while a chunked module runs its pieces


class _Inside:
    """Marks 'already chunked': the attention override then passes calls through."""

    def __enter__(self):
        _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1

    def __exit__(self, *exc):
        _LOCAL.depth -= 1


def _inside() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


@dataclass(frozen=True)
class ChunkSettings:
    """What the node asked for."""

    policy: ChunkPolicy
    ffn: bool = True
    attention: bool = True
    resblocks: bool = True
    safety: float = 0.5


@dataclass
class Planner:
    """Turns (op, rows, bytes per row) into rows per chunk and logs each new choice once."""

    settings: ChunkSettings
    patcher_ref: object = None  # weakref to the ModelPatcher (free-memory source)
    _logged: set = field(default_factory=set)

    def __deepcopy__(self, memo):  # model_options are deep-copied on clone in 0.3.x
        return self

    def rows(self, kind: str, total: int, bytes_per_row: int, device: torch.device) -> int:
        policy = self.settings.policy
        if policy.mode == "off" or total <= 1:
            return max(total, 1)
        free = None
        if policy.mode == "auto" and policy.budget_bytes == 0:
            patcher = self.patcher_ref() if self.patcher_ref is not None else None
            free = compat.free_memory_bytes(device, patcher)
        rows = plan_chunk_rows(total, max(int(bytes_per_row), 1), policy, free_bytes=free, safety=self.settings.safety)
        key = (kind, total, rows)
        if key not in self._logged and len(self._logged) < 256:
            self._logged.add(key)
            n = math.ceil(total / rows)
            if policy.mode == "auto":
                budget = policy.budget_bytes or int(max(free or 0, 0) * self.settings.safety)
                why = f"auto: budget {budget / 2**20:.0f} MiB, ~{bytes_per_row / 2**10:.1f} KiB per row"
            else:
                why = f"{policy.mode}: {policy.count if policy.mode == 'count' else policy.size}"
            log.info("[LightCache] %s: %s %d rows -> %d chunk(s) of <= %d rows (%s)", NODE, kind, total, n, rows, why)
        return rows


def _elem(t: torch.Tensor) -> int:
    return t.element_size()


class _Patch:
    """Base of every installed callable: survives deepcopy (0.3.x clones deep-copy options)."""

    kind = "op"

    def __deepcopy__(self, memo):
        return self


# ---------------------------------------------------------------- feed-forward (row-wise)

class ChunkedRowwise(_Patch):
    """``forward(x)`` of a row-wise module (FFN/MLP), run on row chunks of the flattened leading dims."""

    def __init__(self, original, planner: Planner, kind: str, hidden: int) -> None:
        self.original = original
        self.planner = planner
        self.kind = kind
        self.hidden = max(int(hidden), 1)  # widest intermediate width

    def __call__(self, x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return self.original(x, *args, **kwargs)
        width = x.shape[-1]
        total = x.numel() // max(width, 1)
        # input row + widest intermediate twice (linear output and activation) + output row
        bpr = (2 * width + 2 * self.hidden) * _elem(x)
        rows = self.planner.rows(self.kind, total, bpr, x.device)
        if rows >= total:
            STATS.record(self.kind, 1)
            return self.original(x)
        flat = x.reshape(total, width)
        out = run_chunked(self.original, flat, 0, rows)
        STATS.record(self.kind, math.ceil(total / rows))
        return out.view(*x.shape[:-1], out.shape[-1])


def _ffn_hidden(module: torch.nn.Module) -> int:
    widths = [getattr(m, "out_features", 0) for m in module.modules()]
    return max([w for w in widths if isinstance(w, int)] + [1])


# ---------------------------------------------------------------- tokens along dim 1 (cross-attention)

class ChunkedTokens(_Patch):
    """``forward(x, *rest)`` whose rows along dim 1 of ``x`` are independent (cross-attention)."""

    def __init__(self, original, planner: Planner, kind: str, bytes_per_row) -> None:
        self.original = original
        self.planner = planner
        self.kind = kind
        self.bytes_per_row = bytes_per_row  # callable(x, args, kwargs) -> int

    def __call__(self, x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            return self.original(x, *args, **kwargs)
        total = x.shape[1]
        rows = self.planner.rows(self.kind, total, self.bytes_per_row(x, args, kwargs), x.device)
        if rows >= total:
            STATS.record(self.kind, 1)
            return self.original(x, *args, **kwargs)
        with _Inside():
            out = run_chunked(lambda xc: self.original(xc, *args, **kwargs), x, 1, rows)
        STATS.record(self.kind, math.ceil(total / rows))
        return out


# ---------------------------------------------------------------- samples along dim 0 (UNet resnets, upsamplers)

class ChunkedSamples(_Patch):
    """``fn(x, *rest)`` of a per-sample module, run on chunks of dim 0 (frames x batch).

    Tensor arguments with the same dim-0 size (the timestep embedding) are split
    alongside; anything else is passed whole.
    """

    def __init__(self, original, planner: Planner, kind: str, width_factor: float, shape_kwargs: tuple = ()) -> None:
        self.original = original
        self.planner = planner
        self.kind = kind
        self.width_factor = width_factor
        self.shape_kwargs = shape_kwargs  # keyword arguments that never depend on dim 0 (Upsample's output_shape[2:])

    def __call__(self, x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or any(k not in self.shape_kwargs for k in kwargs):
            return self.original(x, *args, **kwargs)
        total = x.shape[0]
        bpr = int(x[0].numel() * _elem(x) * self.width_factor)
        rows = self.planner.rows(self.kind, total, bpr, x.device)
        if rows >= total:
            STATS.record(self.kind, 1)
            return self.original(x, *args, **kwargs)
        split = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == total for a in args]
        out = None
        for start, length in balanced_pieces(total, rows):
            chunk_args = [a.narrow(0, start, length) if s else a for a, s in zip(args, split)]
            result = self.original(x.narrow(0, start, length), *chunk_args, **kwargs)
            if out is None:
                out = torch.empty((total, *result.shape[1:]), dtype=result.dtype, device=result.device)
            out.narrow(0, start, length).copy_(result)
            del result, chunk_args
        STATS.record(self.kind, math.ceil(total / rows))
        return out


# ---------------------------------------------------------------- attention override (query chunks)

class ChunkedAttention(_Patch):
    """``optimized_attention_override``: query chunks against the full keys and values.

    Called as ``override(func, q, k, v, heads, *args, **kwargs)`` by ComfyUI's
    ``wrap_attn``. Layouts: ``skip_reshape`` -> q ``[b, heads, Lq, d]``, else
    ``[b, Lq, heads*d]``; the output has its query dim at 2 with
    ``skip_output_reshape``, else at 1. When queries are few and the batch is large
    (temporal attention: batch = spatial positions) the batch is split instead;
    both are exact. Masks are split with the queries when they carry a query dim,
    passed whole when they broadcast over it; any other mask runs unchunked.
    """

    kind = "attention"

    def __init__(self, planner: Planner, previous=None) -> None:
        self.planner = planner
        self.previous = previous

    def _call(self, func, q, k, v, heads, args, kwargs):
        if self.previous is not None:
            return self.previous(func, q, k, v, heads, *args, **kwargs)
        return func(q, k, v, heads, *args, **kwargs)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if _inside() or len(args) > 1 or not isinstance(q, torch.Tensor):
            return self._call(func, q, k, v, heads, args, kwargs)
        mask_positional = len(args) == 1
        mask = args[0] if mask_positional else kwargs.get("mask")
        skip_reshape = bool(kwargs.get("skip_reshape", False))
        q_dim = 2 if skip_reshape else 1
        out_dim = 2 if kwargs.get("skip_output_reshape", False) else 1
        b, lq, lk = q.shape[0], q.shape[q_dim], k.shape[q_dim]
        if skip_reshape:
            hd = q.shape[1] * q.shape[3]
        else:
            hd = q.shape[2]
        score = 4 * 2 if compat.attention_materializes_scores(func, mask is not None) else 0
        per_query = b * (heads * lk * score + 3 * hd * _elem(q))
        if lq >= b or mask is not None:
            dim, total, bpr = q_dim, lq, per_query
        else:  # few queries, many sequences: split the batch (dim 0 for every layout)
            dim, total, bpr = 0, b, per_query * lq // max(b, 1)
        if total <= 1:
            return self._call(func, q, k, v, heads, args, kwargs)
        label = f"attention[{'queries' if dim else 'batch'}]"
        rows = self.planner.rows(label, total, bpr, q.device)
        if rows >= total:
            STATS.record(label, 1)
            return self._call(func, q, k, v, heads, args, kwargs)
        mask_dim = None
        if mask is not None:
            if mask.dtype == torch.bool and mask.dim() == 2 or mask.dim() < 2:
                return self._call(func, q, k, v, heads, args, kwargs)
            if mask.shape[-2] == lq and lq > 1:
                mask_dim = mask.dim() - 2
            elif mask.shape[-2] != 1:
                return self._call(func, q, k, v, heads, args, kwargs)
        if dim == 0 and any(t.shape[0] != b for t in (k, v)):
            return self._call(func, q, k, v, heads, args, kwargs)
        if dim and score and not skip_reshape and q.dim() == 3 and k.dim() == 3 and v.dim() == 3:
            # Score-materialising backends permute k and v to [b*heads, ...] copies on every
            # call; hand them the [b, heads, L, d] layout once (skip_reshape) instead of
            # letting each query chunk redo the full-size copies.
            d = hd // heads
            k = k.reshape(b, k.shape[1], heads, d).transpose(1, 2).contiguous()
            v = v.reshape(b, v.shape[1], heads, -1).transpose(1, 2).contiguous()
            q = q.reshape(b, lq, heads, d).transpose(1, 2)
            kwargs = dict(kwargs, skip_reshape=True)
            dim = 2
        elif dim and score and skip_reshape:
            k, v = k.contiguous(), v.contiguous()
        out = None
        o_dim = out_dim if dim else 0
        for start, length in balanced_pieces(total, rows):
            qc = q.narrow(dim, start, length)
            if score:
                qc = qc.contiguous()
            kc, vc = (k.narrow(0, start, length), v.narrow(0, start, length)) if dim == 0 else (k, v)
            c_args, c_kwargs = args, kwargs
            if mask_dim is not None:
                mc = mask.narrow(mask_dim, start, length)
                if mask_positional:
                    c_args = (mc,)
                else:
                    c_kwargs = dict(kwargs, mask=mc)
            result = self._call(func, qc, kc, vc, heads, c_args, c_kwargs)
            if out is None:
                shape = list(result.shape)
                shape[o_dim] = total
                out = torch.empty(shape, dtype=result.dtype, device=result.device)
            out.narrow(o_dim, start, length).copy_(result)
            del result, qc
        STATS.record(label, math.ceil(total / rows))
        return out


# ---------------------------------------------------------------- Wan self-attention (minimal re-expression)

class ChunkedWanSelfAttention(_Patch):
    """Wan self-attention with q/k/v projections, RoPE and attention in token chunks.

    Same math as the host's ``WanSelfAttention.forward`` (checked by
    ``compat.wan_self_attention_parts``): ``k = rope(norm_k(k(x)))`` and ``v = v(x)``
    are written chunk by chunk into full buffers, then each query chunk
    ``rope(norm_q(q(x_c)))`` attends to all keys, and ``o`` projects it into the
    output. RMSNorm and RoPE act per token, so each chunk uses its own rows of
    ``freqs``.
    """

    kind = "wan_self_attention"

    def __init__(self, module, original, planner: Planner, attention, rope) -> None:
        self.module_ref = weakref.ref(module)
        self.original = original
        self.planner = planner
        self.attention = attention
        self.rope = rope

    def __call__(self, x, freqs, transformer_options={}, *args, **kwargs):
        m = self.module_ref()
        if m is None or args or kwargs or x.dim() != 3:
            return self.original(x, freqs, transformer_options, *args, **kwargs)
        b, s = x.shape[:2]
        n, d = m.num_heads, m.head_dim
        if not isinstance(freqs, torch.Tensor) or freqs.dim() < 2 or freqs.shape[1] not in (1, s):
            return self.original(x, freqs, transformer_options=transformer_options)
        e = _elem(x)
        score = 4 * 2 if compat.attention_materializes_scores(self.attention) else 0
        # per query token: projection + norm + fp32 RoPE temporaries, attention output, o output
        bpr = b * (n * d * (4 * e + 2 * 4) + n * s * score)
        rows = self.planner.rows(self.kind, s, bpr, x.device)
        if rows >= s:
            STATS.record(self.kind, 1)
            return self.original(x, freqs, transformer_options=transformer_options)

        def freq_rows(start, length):
            return freqs.narrow(1, start, length) if freqs.shape[1] == s else freqs

        pieces = list(balanced_pieces(s, rows))
        # Materialising backends get k/v once in [b, heads, s, d] (skip_reshape) instead of
        # permuting full copies for every query chunk; streaming backends take plain views.
        heads_first = bool(score)
        k = v = None
        for start, length in pieces:
            xc = x.narrow(1, start, length).contiguous()
            kc = self.rope(m.norm_k(m.k(xc)).view(b, length, n, d), freq_rows(start, length))
            vc = m.v(xc).view(b, length, n, d)
            del xc
            if k is None:
                shape = (b, n, s, d) if heads_first else (b, s, n, d)
                k = torch.empty(shape, dtype=kc.dtype, device=kc.device)
                v = torch.empty(shape, dtype=vc.dtype, device=vc.device)
            if heads_first:
                k.narrow(2, start, length).copy_(kc.transpose(1, 2))
                v.narrow(2, start, length).copy_(vc.transpose(1, 2))
            else:
                k.narrow(1, start, length).copy_(kc)
                v.narrow(1, start, length).copy_(vc)
            del kc, vc
        if not heads_first:
            k, v = k.view(b, s, n * d), v.view(b, s, n * d)
        out = None
        with _Inside():
            for start, length in pieces:
                xc = x.narrow(1, start, length).contiguous()
                qc = self.rope(m.norm_q(m.q(xc)).view(b, length, n, d), freq_rows(start, length))
                del xc
                if heads_first:
                    yc = self.attention(qc.transpose(1, 2).contiguous(), k, v, heads=n, skip_reshape=True,
                                        transformer_options=transformer_options)
                else:
                    yc = self.attention(qc.view(b, length, n * d), k, v, heads=n, transformer_options=transformer_options)
                del qc
                oc = m.o(yc)
                del yc
                if out is None:
                    out = torch.empty((b, s, oc.shape[-1]), dtype=oc.dtype, device=oc.device)
                out.narrow(1, start, length).copy_(oc)
                del oc
        STATS.record(self.kind, len(pieces))
        return out


# ---------------------------------------------------------------- families and installation

@dataclass
class InstallReport:
    family: str
    patched: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)
    attention_override: bool = False

    def summary(self) -> str:
        parts = [f"{k} x{v}" for k, v in sorted(self.patched.items())]
        if self.attention_override:
            parts.append("attention query chunks (all attention calls)")
        text = f"{self.family}: " + (", ".join(parts) if parts else "nothing patched")
        if self.skipped:
            text += f"; left unpatched: {', '.join(self.skipped[:6])}{' ...' if len(self.skipped) > 6 else ''}"
        return text


SUPPORTED = "Wan 2.1/2.2 (WanModel and its variants), HunyuanVideo, SD1.5-style UNets (also under AnimateDiff) and the SVD VideoUNet"


def _classes():
    """The host classes the installers recognise (None where a module is missing)."""
    found = {}
    specs = {
        "WanModel": ("comfy.ldm.wan.model", "WanModel"),
        "WanAttentionBlock": ("comfy.ldm.wan.model", "WanAttentionBlock"),
        "WanT2VCrossAttention": ("comfy.ldm.wan.model", "WanT2VCrossAttention"),
        "WanI2VCrossAttention": ("comfy.ldm.wan.model", "WanI2VCrossAttention"),
        "HunyuanVideo": ("comfy.ldm.hunyuan_video.model", "HunyuanVideo"),
        "DoubleStreamBlock": ("comfy.ldm.flux.layers", "DoubleStreamBlock"),
        "UNetModel": ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"),
        "ResBlock": ("comfy.ldm.modules.diffusionmodules.openaimodel", "ResBlock"),
        "Upsample": ("comfy.ldm.modules.diffusionmodules.openaimodel", "Upsample"),
        "BasicTransformerBlock": ("comfy.ldm.modules.attention", "BasicTransformerBlock"),
        "FeedForward": ("comfy.ldm.modules.attention", "FeedForward"),
    }
    import importlib

    for key, (module, name) in specs.items():
        try:
            found[key] = getattr(importlib.import_module(module), name, None)
        except ImportError:
            found[key] = None
    return found


def model_family(diffusion_model: torch.nn.Module) -> str | None:
    c = _classes()
    for family, cls in (("wan", c["WanModel"]), ("hunyuan_video", c["HunyuanVideo"]), ("unet", c["UNetModel"])):
        if cls is not None and isinstance(diffusion_model, cls):
            return family
    return None


def _original(patcher, module: torch.nn.Module, path: str, attr: str):
    """What ``module.<attr>`` would be without us: this clone's earlier object patch, else the class method.

    Never reads the live attribute: another patcher sharing the module may have its
    own object patch applied right now.
    """
    key = f"{path}.{attr}"
    if key in patcher.object_patches:
        existing = patcher.object_patches[key]
        # a second Chunked Model Patch in the chain replaces the first instead of nesting
        return existing.original if isinstance(existing, _Patch) and hasattr(existing, "original") else existing
    return types.MethodType(getattr(type(module), attr), module)


def install(patcher, settings: ChunkSettings) -> InstallReport:
    """Add chunking object patches and the attention override to ``patcher`` (a clone)."""
    dm = patcher.model.diffusion_model
    family = model_family(dm)
    if family is None:
        raise ValueError(
            f"{NODE}: input 'model' is a {type(dm).__name__} diffusion model, which this node does not know how to "
            f"chunk exactly. Supported: {SUPPORTED}. Remove the node from this workflow or feed it a supported model.")
    report = InstallReport(family)
    planner = Planner(settings, weakref.ref(patcher))
    if settings.policy.mode == "off":
        return report
    c = _classes()

    def add(path: str, attr: str, make, label: str):
        full = f"diffusion_model.{path}" if path else "diffusion_model"
        module = patcher.get_model_object(full)
        patcher.add_object_patch(f"{full}.{attr}", make(module, _original(patcher, module, full, attr)))
        report.patched[label] += 1

    for name, module in dm.named_modules():
        if family == "wan" and c["WanAttentionBlock"] is not None and isinstance(module, c["WanAttentionBlock"]):
            ffn = getattr(module, "ffn", None)
            if settings.ffn and isinstance(ffn, torch.nn.Sequential):
                hidden = _ffn_hidden(ffn)
                add(f"{name}.ffn", "forward", lambda m, o, h=hidden: ChunkedRowwise(o, planner, "wan_ffn", h), "ffn")
            if settings.attention:
                sa = getattr(module, "self_attn", None)
                parts = compat.wan_self_attention_parts(sa) if sa is not None else None
                if parts is not None:
                    add(f"{name}.self_attn", "forward",
                        lambda m, o, p=parts: ChunkedWanSelfAttention(m, o, planner, p[0], p[1]), "self_attention")
                elif sa is not None:
                    report.skipped.append(f"{name}.self_attn ({type(sa).__name__}: layout not recognised)")
                ca = getattr(module, "cross_attn", None)
                if ca is not None and type(ca) in (c["WanT2VCrossAttention"], c["WanI2VCrossAttention"]):
                    def ca_bpr(x, args, kwargs):
                        ctx = args[0] if args else kwargs.get("context")
                        lk = ctx.shape[1] if isinstance(ctx, torch.Tensor) else 1
                        return x.shape[0] * (x.shape[2] * _elem(x) * 4 + 8 * lk * 64)
                    add(f"{name}.cross_attn", "forward",
                        lambda m, o: ChunkedTokens(o, planner, "wan_cross_attention", ca_bpr), "cross_attention")
                elif ca is not None:
                    report.skipped.append(f"{name}.cross_attn ({type(ca).__name__})")
        elif family == "hunyuan_video" and c["DoubleStreamBlock"] is not None and isinstance(module, c["DoubleStreamBlock"]):
            if settings.ffn:
                for sub in ("img_mlp", "txt_mlp"):
                    mlp = getattr(module, sub, None)
                    if isinstance(mlp, torch.nn.Sequential):
                        hidden = _ffn_hidden(mlp)
                        add(f"{name}.{sub}", "forward",
                            lambda m, o, h=hidden: ChunkedRowwise(o, planner, "hunyuan_mlp", h), "ffn")
        elif family == "unet":
            if settings.ffn and c["BasicTransformerBlock"] is not None and isinstance(module, c["BasicTransformerBlock"]):
                for sub in ("ff", "ff_in"):
                    ff = getattr(module, sub, None)
                    if c["FeedForward"] is not None and isinstance(ff, c["FeedForward"]):
                        hidden = _ffn_hidden(ff)
                        add(f"{name}.{sub}", "forward",
                            lambda m, o, h=hidden: ChunkedRowwise(o, planner, "unet_ff", h), "ffn")
            if settings.resblocks and c["ResBlock"] is not None and isinstance(module, c["ResBlock"]):
                # ResBlock.forward -> checkpoint(self._forward, ...): patching the instance's
                # _forward chunks the per-sample part only. For VideoResBlock that is the
                # spatial resnet (dim 0 = batch x frames); its time_stack ResBlock (5-D,
                # dim 0 = videos) normalises over frames, and dim 0 never splits them.
                add(name, "_forward", lambda m, o: ChunkedSamples(o, planner, "unet_resblock", 5.0), "resblock")
            if settings.resblocks and c["Upsample"] is not None and isinstance(module, c["Upsample"]) and getattr(module, "dims", 2) == 2:
                add(name, "forward", lambda m, o: ChunkedSamples(o, planner, "unet_upsample", 8.0, ("output_shape",)), "upsample")

    if settings.attention:
        if compat.attention_override_supported():
            previous = compat.get_attention_override(patcher.model_options)
            if isinstance(previous, ChunkedAttention):  # a second Chunked Model Patch replaces the first
                previous = previous.previous
            compat.set_attention_override(patcher, ChunkedAttention(planner, previous))
            report.attention_override = True
        else:
            report.skipped.append("attention (this ComfyUI has no optimized_attention_override hook)")
    for line in report.skipped:
        log.info("[LightCache] %s: left unpatched: %s", NODE, line)
    return report
