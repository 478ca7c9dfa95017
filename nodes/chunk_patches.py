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
* whole transformer blocks (Wan ``WanAttentionBlock``, the HunyuanVideo/Flux
  ``SingleStreamBlock``) run along tokens in two passes of the host's own block
  forward: pass 1 runs each chunk up to its self-attention call, where the
  attention override files the chunk's keys and values into full buffers and
  stops the pass; pass 2 runs each chunk again, and its self-attention attends
  to all keys and values. Everything else in those blocks (norms, modulation,
  the fused ``linear1``/``linear2``, MLPs, cross-attention, residual adds) acts per
  token, so the block holds its input, its output, the keys and the values at
  full size and everything else at chunk size.

Hooks: a forward that calls ``transformer_options["patches"]`` hooks (newer Wan
``attn1_patch``/``attn2_patch``, Flux ``attn1_patch``/``attn1_output_patch``)
expects them to see the whole sequence. Whenever a hook the host's forward
consults is present, that module runs its original forward (chunked only inside,
where it is still exact). Patches never touch ``transformer_options`` (the block
loop's ``block_index``/``total_blocks``/``block_type`` stay as the host set them).

Counters and clones: every :func:`install` has its own :class:`ChunkStats`
(``stats_of(patcher)``). Clones of a chunk-patched model share the installed
patch objects (immutable settings plus those lock-protected counters): on
hosts that deep-copy ``model_options`` on ``clone()`` the objects return
themselves from ``__deepcopy__``, and newer hosts share them anyway. A second
Chunked Model Patch on a clone installs new objects and leaves the first alone.
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
    """Counts of chunked executions per op kind, one per installed patch (``stats_of(patcher)``).

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

    def __deepcopy__(self, memo):  # shared by the clones of one patched model (see the module doc)
        return self


_LOCAL = threading.local()  # .depth > 0 while a chunked module runs its pieces; .block: a block pass


class _Inside:
    """Marks 'already chunked': the attention override then passes calls through."""

    def __enter__(self):
        _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1

    def __exit__(self, *exc):
        _LOCAL.depth -= 1


def _inside() -> bool:
    return getattr(_LOCAL, "depth", 0) > 0


def _block_pass():
    """The :class:`_BlockPass` of the chunked block running on this thread (None outside one)."""
    return getattr(_LOCAL, "block", None)


def _hooks_present(transformer_options, names: frozenset) -> bool:
    """True when ``transformer_options["patches"]`` holds a hook that the host forward consults."""
    if not names or not isinstance(transformer_options, dict):
        return False
    patches = transformer_options.get("patches")
    return isinstance(patches, dict) and any(patches.get(name) for name in names)


# ``auto``: the share of the free device memory one op's working set may take. An op whose whole working set
# is larger runs in chunks. A quarter leaves room for what else lives on the device while a step runs (the
# caching allocator's rounding and fragmentation, step caches and prefetch buffers, models ComfyUI keeps
# loaded), and chunking costs little: a chunked Wan block recomputes nothing.
AUTO_SHARE = 0.25
# ``auto``: at most this many pieces per chunked block. Beyond it the full-size keys, values and output a
# chunked block holds dominate, and smaller pieces would only cost time.
AUTO_MAX_BLOCK_PIECES = 16
# Inside a chunked Wan block, the self-attention runs each chunk's queries (and its key/value projections and
# RoPE) in this many sub-pieces, so its fp32 RoPE temporaries and attention outputs stay small.
INNER_PIECES = 4


@dataclass(frozen=True)
class ChunkSettings:
    """What the node asked for.

    ``free_memory``: where ``auto`` reads the device's free bytes (``callable(device) -> int``); None: the
    host's figure (``compat.free_memory_bytes``). Traces use it to plan for a card they do not run on.
    """

    policy: ChunkPolicy
    ffn: bool = True
    attention: bool = True
    resblocks: bool = True
    safety: float = AUTO_SHARE
    blocks: bool = True  # whole DiT blocks along tokens (needs ffn and attention); False: per-op chunks only
    free_memory: object = field(default=None, compare=False)


@dataclass
class Planner:
    """Turns (op, rows, bytes per row) into rows per chunk and logs each new choice once."""

    settings: ChunkSettings
    patcher_ref: object = None  # weakref to the ModelPatcher (free-memory source)
    stats: ChunkStats = field(default_factory=ChunkStats)  # this install's counters
    _logged: set = field(default_factory=set)
    _lock: object = field(default_factory=threading.Lock)

    def __deepcopy__(self, memo):  # hosts that deep-copy model_options on clone: share, never copy
        return self

    def note(self, key, text: str) -> None:
        """Log ``text`` once per ``key``."""
        with self._lock:
            first = key not in self._logged and len(self._logged) < 256
            if first:
                self._logged.add(key)
        if first:
            log.info("[LightCache] %s: %s", NODE, text)

    def free_bytes(self, device: torch.device) -> int:
        source = self.settings.free_memory
        if source is not None:
            return int(source(device))
        patcher = self.patcher_ref() if self.patcher_ref is not None else None
        return compat.free_memory_bytes(device, patcher)

    def rows(self, kind: str, total: int, bytes_per_row: int, device: torch.device, *, fixed_bytes: int = 0,
             whole_bytes: int | None = None, max_chunks: int | None = None) -> int:
        """Rows per chunk of op ``kind`` (see ``plan_chunk_rows``; ``bytes_per_row`` counts every batch entry)."""
        policy = self.settings.policy
        if policy.mode == "off" or total <= 1:
            return max(total, 1)
        free = None
        if policy.mode == "auto" and policy.budget_bytes == 0:
            free = self.free_bytes(device)
        rows = plan_chunk_rows(total, max(int(bytes_per_row), 1), policy, free_bytes=free, safety=self.settings.safety,
                               fixed_bytes=fixed_bytes, whole_bytes=whole_bytes, max_chunks=max_chunks)
        key = (kind, total, rows)
        with self._lock:
            first = key not in self._logged and len(self._logged) < 256
            if first:
                self._logged.add(key)
        if first:
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
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or _block_pass() is not None:
            return self.original(x, *args, **kwargs)  # (a chunked block already bounds the rows)
        width = x.shape[-1]
        total = x.numel() // max(width, 1)
        # input row + widest intermediate twice (linear output and activation) + output row
        bpr = (2 * width + 2 * self.hidden) * _elem(x)
        rows = self.planner.rows(self.kind, total, bpr, x.device)
        if rows >= total:
            self.planner.stats.record(self.kind, 1)
            return self.original(x)
        flat = x.reshape(total, width)
        out = run_chunked(self.original, flat, 0, rows)
        self.planner.stats.record(self.kind, math.ceil(total / rows))
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
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or _block_pass() is not None:
            return self.original(x, *args, **kwargs)
        total = x.shape[1]
        rows = self.planner.rows(self.kind, total, self.bytes_per_row(x, args, kwargs), x.device)
        if rows >= total:
            self.planner.stats.record(self.kind, 1)
            return self.original(x, *args, **kwargs)
        with _Inside():
            out = run_chunked(lambda xc: self.original(xc, *args, **kwargs), x, 1, rows)
        self.planner.stats.record(self.kind, math.ceil(total / rows))
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
            self.planner.stats.record(self.kind, 1)
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
        self.planner.stats.record(self.kind, math.ceil(total / rows))
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
        block = _block_pass()
        if block is not None:
            if not block.used:  # the block's self-attention: file or use the full keys and values
                block.used = True
                return block.attention(self, func, q, k, v, heads, args, kwargs)
            return self._call(func, q, k, v, heads, args, kwargs)  # later calls (cross-attention) on the chunk
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
            self.planner.stats.record(label, 1)
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
        self.planner.stats.record(label, math.ceil(total / rows))
        return out


# ---------------------------------------------------------------- Wan self-attention (minimal re-expression)

def _freq_rows(freqs: torch.Tensor, start: int, length: int, total: int) -> torch.Tensor:
    return freqs.narrow(1, start, length) if freqs.shape[1] == total else freqs


class ChunkedWanSelfAttention(_Patch):
    """Wan self-attention with q/k/v projections, RoPE and attention in token chunks.

    Same math as the host's ``WanSelfAttention.forward`` (checked by
    ``compat.wan_self_attention_parts``): ``k = rope(norm_k(k(x)))`` and ``v = v(x)``
    are written chunk by chunk into full-size buffers in the model's dtype (RoPE's fp32
    temporaries exist for one chunk only), then each query chunk ``rope(norm_q(q(x_c)))``
    attends to all keys, and ``o`` projects it into the output. RMSNorm and RoPE act per
    token, so each chunk uses its own rows of ``freqs``.

    Inside a chunked Wan block (:class:`ChunkedBlock`) the same pieces serve the block's
    passes, one sub-piece of the block's chunk at a time: ``capture`` files the chunk's
    rotated keys and values (no queries), ``attend`` computes the chunk's attention output
    (queries, attention, ``o``; no keys or values) into a full-size buffer, and ``finish``
    hands the block that buffer's rows. So every projection runs once per token, as in
    the host's forward.
    """

    kind = "wan_self_attention"

    def __init__(self, module, original, planner: Planner, attention, rope, hook_names: frozenset = frozenset()) -> None:
        self.module_ref = weakref.ref(module)
        self.original = original
        self.planner = planner
        self.attention = attention
        self.rope = rope
        self.hook_names = hook_names  # patches the host's forward calls (newer Wan: attn1_patch)

    def _usable(self, m, x, freqs, args, kwargs, transformer_options) -> bool:
        return (m is not None and not args and not kwargs and isinstance(x, torch.Tensor) and x.dim() == 3
                and not _hooks_present(transformer_options, self.hook_names)
                and isinstance(freqs, torch.Tensor) and freqs.dim() >= 2 and freqs.shape[1] in (1, x.shape[1]))

    def __call__(self, x, freqs, transformer_options={}, *args, **kwargs):
        m = self.module_ref()
        usable = self._usable(m, x, freqs, args, kwargs, transformer_options)
        block = _block_pass()
        if block is not None:
            if usable and x.shape[1] == block.length and block.phase in _MODULE_PHASES:
                return self._block_phase(block, m, x, freqs, transformer_options)
            # the host's forward on the chunk: its attention call files or uses keys and values through the override
            return self.original(x, freqs, transformer_options, *args, **kwargs)
        if not usable:
            # hooks see the whole q/k/attention output, as the host gives them
            return self.original(x, freqs, transformer_options, *args, **kwargs)
        b, s = x.shape[:2]
        n, d = m.num_heads, m.head_dim
        e = _elem(x)
        score = 4 * 2 if compat.attention_materializes_scores(self.attention) else 0
        # per query token: projection + norm + fp32 RoPE temporaries, attention output, o output
        bpr = b * (n * d * (4 * e + 2 * 4) + n * s * score)
        rows = self.planner.rows(self.kind, s, bpr, x.device, fixed_bytes=3 * b * s * n * d * e)
        if rows >= s:
            self.planner.stats.record(self.kind, 1)
            return self.original(x, freqs, transformer_options=transformer_options)
        pieces = list(balanced_pieces(s, rows))
        # Materialising backends get k/v once in [b, heads, s, d] (skip_reshape) instead of
        # permuting full copies for every query chunk; streaming backends take plain views.
        heads_first = bool(score)
        k, v = self._keys_values(m, x, freqs, pieces, 0, s, heads_first)
        out = None
        with _Inside():
            for start, length in pieces:
                oc = self._attend(m, x, freqs, start, length, k, v, heads_first, transformer_options)
                if out is None:
                    out = torch.empty((b, s, oc.shape[-1]), dtype=oc.dtype, device=oc.device)
                out.narrow(1, start, length).copy_(oc)
                del oc
        del k, v
        self.planner.stats.record(self.kind, len(pieces))
        return out

    # -------------------------------------------------------------- pieces shared by both paths

    def _rotated(self, proj, norm, m, x, freqs, start: int, length: int):
        """``rope(norm(proj(x)))`` of rows ``[start, start + length)`` of ``x``: ``[b, length, heads, head_dim]``."""
        b, total = x.shape[:2]
        xc = x.narrow(1, start, length).contiguous()
        t = norm(proj(xc)).view(b, length, m.num_heads, m.head_dim)
        del xc
        return self.rope(t, _freq_rows(freqs, start, length, total))

    def _keys_values(self, m, x, freqs, pieces, offset: int, total: int, heads_first: bool, buffers=None):
        """Rotated keys and values of ``pieces`` of ``x`` written into rows ``offset + start`` of full buffers
        (``buffers["k"]``/``["v"]`` when given, else new ones of ``total`` tokens)."""
        b = x.shape[0]
        n, d = m.num_heads, m.head_dim
        k = buffers.get("k") if buffers is not None else None
        v = buffers.get("v") if buffers is not None else None
        dim = 2 if heads_first else 1
        for start, length in pieces:
            kc = self._rotated(m.k, m.norm_k, m, x, freqs, start, length)
            xc = x.narrow(1, start, length).contiguous()
            vc = m.v(xc).view(b, length, n, d)
            del xc
            if k is None:
                shape = (b, n, total, d) if heads_first else (b, total, n, d)
                k = torch.empty(shape, dtype=kc.dtype, device=kc.device)
                v = torch.empty(shape, dtype=vc.dtype, device=vc.device)
                if buffers is not None:
                    buffers["k"], buffers["v"] = k, v
            k.narrow(dim, offset + start, length).copy_(kc.transpose(1, 2) if heads_first else kc)
            v.narrow(dim, offset + start, length).copy_(vc.transpose(1, 2) if heads_first else vc)
            del kc, vc
        return k, v

    def _attend(self, m, x, freqs, start: int, length: int, k, v, heads_first: bool, transformer_options):
        """``o(attention(rope(norm_q(q(x rows))), k, v))`` of rows ``[start, start + length)`` of ``x``."""
        b = x.shape[0]
        n, d = m.num_heads, m.head_dim
        qc = self._rotated(m.q, m.norm_q, m, x, freqs, start, length)
        if heads_first:
            yc = self.attention(qc.transpose(1, 2).contiguous(), k, v, heads=n, skip_reshape=True,
                                transformer_options=transformer_options)
        else:
            s_kv = k.shape[1]
            yc = self.attention(qc.reshape(b, length, n * d), k.view(b, s_kv, n * d), v.view(b, s_kv, n * d), heads=n,
                                transformer_options=transformer_options)
        del qc
        oc = m.o(yc)
        del yc
        return oc

    # -------------------------------------------------------------- inside a chunked block

    def _block_phase(self, block: "_BlockPass", m, x, freqs, transformer_options):
        buf = block.buffers
        if buf.setdefault("by", "module") != "module":
            raise _Unchunkable("the block's self-attention changed path between chunks")
        length = x.shape[1]
        heads_first = compat.attention_materializes_scores(self.attention)
        if buf.setdefault("heads_first", heads_first) != heads_first:
            raise _Unchunkable("the attention backend changed between passes")
        pieces = list(balanced_pieces(length, math.ceil(length / INNER_PIECES)))
        if block.phase == "capture":  # this chunk's rotated keys and values into the block's full buffers
            self._keys_values(m, x, freqs, pieces, block.start, block.total, heads_first, buf)
            raise _Captured()
        if block.phase == "attend":  # this chunk's attention output (after o) into a full buffer
            if "k" not in buf:
                raise _Unchunkable("no keys were filed")
            block.used = True  # later attention calls in this chunk (none here) pass through the override
            for start, length_i in pieces:
                oc = self._attend(m, x, freqs, start, length_i, buf["k"], buf["v"], heads_first, transformer_options)
                if "y" not in buf:
                    buf["y"] = torch.empty((x.shape[0], block.total, oc.shape[-1]), dtype=oc.dtype, device=oc.device)
                buf["y"].narrow(1, block.start + start, length_i).copy_(oc)
                del oc
            raise _Captured()
        # finish: the rows computed in the attend pass; the block's cross-attention then passes the override
        block.used = True
        if "y" not in buf:
            raise _Unchunkable("no attention output was filed")
        return buf["y"].narrow(1, block.start, length)


# ---------------------------------------------------------------- whole blocks along tokens

class _Captured(Exception):
    """Ends a chunk's pass once what the pass collects (keys and values, or the attention output) is filed."""


class _Unchunkable(Exception):
    """The block's self-attention does not look like this chunk's (another layout): run it whole."""


# Passes of a chunked block: through the attention override (the host's own self-attention code) "capture"
# then "use"; through the Wan self-attention patch "capture", "attend", then "finish".
_OVERRIDE_PHASES = ("capture", "use")
_MODULE_PHASES = ("capture", "attend", "finish")


class _BlockPass:
    """What one chunk of a :class:`ChunkedBlock` pass tells the patches inside the block (thread-local)."""

    def __init__(self, phase: str, start: int, length: int, total: int, buffers: dict) -> None:
        self.phase = phase
        self.start, self.length, self.total = start, length, total
        self.buffers = buffers  # full-size keys/values ("k", "v"), attention output ("y"), which path filed them
        self.used = False  # the block's self-attention ran (later attention calls pass through the override)

    def attention(self, override, func, q, k, v, heads, args, kwargs):
        """The block's first attention call, reached through the override (the host's own self-attention)."""
        buf = self.buffers
        if buf.setdefault("by", "override") != "override" or self.phase not in _OVERRIDE_PHASES:
            raise _Unchunkable("the block's self-attention changed path between chunks")
        dim = 2 if kwargs.get("skip_reshape", False) else 1
        if any(not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != self.length for t in (q, k, v)):
            raise _Unchunkable("self-attention is not over this chunk's tokens")
        if self.phase == "capture":
            if "k" not in buf:
                for name, t in (("k", k), ("v", v)):
                    shape = list(t.shape)
                    shape[dim] = self.total
                    buf[name] = torch.empty(shape, dtype=t.dtype, device=t.device)
                buf["dim"] = dim
            if buf["dim"] != dim:
                raise _Unchunkable("self-attention layout changed between chunks")
            buf["k"].narrow(dim, self.start, self.length).copy_(k)
            buf["v"].narrow(dim, self.start, self.length).copy_(v)
            raise _Captured()
        if buf.get("dim") != dim:
            raise _Unchunkable("self-attention layout changed between passes")
        del k, v
        return override._call(func, q, buf["k"], buf["v"], heads, args, kwargs)


class ChunkedBlock(_Patch):
    """A transformer block's ``forward`` run along tokens, through the host's own forward, in passes.

    Valid for blocks whose only op across tokens is their first attention call (self-attention)
    and whose other inputs are per token (sliced along ``token_dims``) or shared by all tokens
    (passed whole). Two ways, chosen by what the block's self-attention reaches first:

    * through the Wan self-attention patch (:class:`ChunkedWanSelfAttention`), three passes:
      ``capture`` runs each chunk up to its self-attention, which files the chunk's rotated
      keys and values into full buffers and stops the pass; ``attend`` runs each chunk up to
      its self-attention again, which computes the chunk's attention output (queries against
      all keys and values, then ``o``) into a full buffer; the keys and values are then
      released, and ``finish`` runs each chunk through the whole forward, its self-attention
      returning the filed rows. Each chunk's output is written over its own rows of that
      buffer (read before they are overwritten), so the block holds its input and one
      full-size buffer besides the keys and values, and never all of them with a chunk's
      feed-forward working set;
    * through the attention override (any other self-attention, e.g. HunyuanVideo's
      single-stream blocks), two passes: ``capture`` files the keys and values the host
      computed; ``use`` runs each chunk through the whole forward against them.

    Falls back to the original forward for anything else: other arguments, hooks the forward
    consults, masks with a key-sized query dim of another length, a block that never reached
    its self-attention.
    """

    def __init__(self, original, planner: Planner, kind: str, signature, token_dims: dict, shared: frozenset,
                 hook_names: frozenset, plan) -> None:
        self.original = original
        self.planner = planner
        self.kind = kind
        self.signature = signature  # inspect.Signature of the host forward, without self
        # argument name -> its token dim: an int, "mask" (dim -2, whole when 1), or callable(tensor) -> int | None
        self.token_dims = token_dims
        self.shared = shared  # tensor arguments the same for every token (context, vec): passed whole
        self.hook_names = hook_names
        self.plan = plan  # callable(x, arguments) -> dict(bytes_per_row, fixed_bytes, whole_bytes) for the planner

    def _whole(self, args, kwargs):
        return self.original(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if _block_pass() is not None or _inside():
            return self._whole(args, kwargs)
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return self._whole(args, kwargs)
        arguments = bound.arguments
        x = arguments.get("x")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] <= 1:
            return self._whole(args, kwargs)
        opts = arguments.get("transformer_options", {})
        if _hooks_present(opts, self.hook_names) or not isinstance(compat.get_attention_override({"transformer_options": opts}), ChunkedAttention):
            return self._whole(args, kwargs)
        total = x.shape[1]
        sliced = {}  # name -> token dim to narrow
        for name, value in arguments.items():
            if name == "x" or name in self.shared or not isinstance(value, torch.Tensor):
                continue
            if name not in self.token_dims:  # an argument this patch does not know: never guess its layout
                if total in value.shape:
                    return self._whole(args, kwargs)
                continue
            dim = self.token_dims[name]
            if dim == "mask":
                dim = value.dim() - 2 if value.dim() >= 2 else None
                if dim is None or value.shape[dim] == 1:
                    continue  # broadcast over queries: whole
            elif callable(dim):
                dim = dim(value)
            if dim is None:
                continue
            if dim < 0 or value.dim() <= dim or value.shape[dim] not in (1, total):
                return self._whole(args, kwargs)
            if value.shape[dim] == total:
                sliced[name] = dim
        rows = self.planner.rows(self.kind, total, device=x.device, max_chunks=AUTO_MAX_BLOCK_PIECES,
                                 **self.plan(x, arguments))
        if rows >= total:
            self.planner.stats.record(self.kind, 1)
            return self._whole(args, kwargs)
        pieces = list(balanced_pieces(total, rows))

        def chunk_arguments(start, length):
            chunk = dict(arguments)
            chunk["x"] = x.narrow(1, start, length).contiguous()
            for name, dim in sliced.items():
                chunk[name] = arguments[name].narrow(dim, start, length)
            return chunk

        buffers: dict = {}
        try:
            self._pass("capture", pieces, chunk_arguments, x, buffers)
            if buffers.get("by") == "module":
                self._pass("attend", pieces, chunk_arguments, x, buffers)
                buffers.pop("k", None)  # every query has attended: release the keys and values
                buffers.pop("v", None)
                out = self._pass("finish", pieces, chunk_arguments, x, buffers)
            else:
                out = self._pass("use", pieces, chunk_arguments, x, buffers)
        except _Unchunkable as why:
            self.planner.note(("whole", self.kind, str(why)), f"{self.kind} runs whole ({why})")
            buffers.clear()
            return self._whole(args, kwargs)
        buffers.clear()
        self.planner.stats.record(self.kind, len(pieces))
        return out

    def _pass(self, phase: str, pieces, chunk_arguments, x, buffers: dict):
        """One pass of the block forward over every chunk; returns the block output for the last two phases."""
        collects = phase in ("capture", "attend")
        total = x.shape[1]
        out = None
        for start, length in pieces:
            chunk = chunk_arguments(start, length)
            state = _BlockPass(phase, start, length, total, buffers)
            _LOCAL.block = state
            try:
                result = self.original(**chunk)
            except _Captured:
                if not collects:
                    raise _Unchunkable(f"a {phase} pass stopped early") from None
                continue
            finally:
                _LOCAL.block = None
            del chunk
            if collects or not state.used:
                raise _Unchunkable("the block never reached its self-attention")
            if out is None:
                shape = (x.shape[0], total, *result.shape[2:])
                y = buffers.get("y")
                if (y is not None and tuple(y.shape) == shape and y.dtype == result.dtype
                        and y.device == result.device):
                    out = y  # a chunk's attention rows are read before its output rows overwrite them
                else:
                    out = torch.empty(shape, dtype=result.dtype, device=result.device)
            out.narrow(1, start, length).copy_(result)
            del result
        return out


# ---------------------------------------------------------------- families and installation

@dataclass
class InstallReport:
    family: str
    patched: Counter = field(default_factory=Counter)
    skipped: list = field(default_factory=list)
    attention_override: bool = False
    stats: ChunkStats | None = None  # this install's counters (also ``stats_of(patcher)``)

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
        "SingleStreamBlock": ("comfy.ldm.flux.layers", "SingleStreamBlock"),
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


def stats_of(patcher) -> ChunkStats | None:
    """The counters of the Chunked Model Patch installed on ``patcher`` (or on the model it was cloned from).

    The newest install wins when several are stacked; None when the model carries none.
    """
    override = compat.get_attention_override(getattr(patcher, "model_options", {}))
    if isinstance(override, ChunkedAttention):
        return override.planner.stats
    for patch in reversed(list(getattr(patcher, "object_patches", {}).values())):
        planner = getattr(patch, "planner", None) if isinstance(patch, _Patch) else None
        if planner is not None:
            return planner.stats
    return None


def _module_hook_names(module: torch.nn.Module) -> frozenset:
    """``patches`` hook names the forwards of ``module`` and its sub-modules may call (host code, read once)."""
    return compat.forward_patch_names(*{type(m).forward for m in module.modules()})


def _wan_e_token_dim(e: torch.Tensor):
    # [B, 6, C]: one modulation for every token; [B, L_e, 6, C]: per token when L_e matches
    return 1 if e.dim() == 4 else None


def _score_bytes(heads: int, total: int) -> int:
    """Per query row: the fp32 score and softmax rows a materialising attention backend holds."""
    import comfy.ldm.modules.attention as attention

    return heads * total * 8 if compat.attention_materializes_scores(getattr(attention, "optimized_attention", None)) else 0


def _wan_block_patch(module, original, planner: Planner) -> "ChunkedBlock":
    import inspect

    ffn = _ffn_hidden(module.ffn) if isinstance(getattr(module, "ffn", None), torch.nn.Module) else 4 * getattr(module, "dim", 1)
    heads = getattr(module, "num_heads", 1)

    def plan(x, arguments):
        b, total, width = x.shape
        e = _elem(x)
        score = _score_bytes(heads, total)
        hidden = b * total * width * e
        # A chunk's working set, per token (each of b batch entries): its input and running hidden state,
        # the modulated FFN input, the FFN intermediate twice, the cross-attention's q and output; the
        # self-attention works on a quarter of the chunk at a time.
        per_row = b * ((3 * width + 2 * ffn) * e + score // INNER_PIECES)
        # Unchunked: the modulated input, q, k (normed) and their fp32 RoPE temporaries; or the FFN's.
        whole = b * total * (max(4 * width * e + 4 * width * 4, (3 * width + 2 * ffn) * e) + score)
        # Chunked, once the keys and values are released: the attention output / block output buffer
        # (keys and values are held with small chunk working sets only).
        return {"bytes_per_row": per_row, "fixed_bytes": hidden, "whole_bytes": whole}

    return ChunkedBlock(original, planner, "wan_block", inspect.signature(original),
                        {"freqs": 1, "e": _wan_e_token_dim}, frozenset({"context"}), _module_hook_names(module), plan)


def _single_block_patch(module, original, planner: Planner) -> "ChunkedBlock":
    import inspect

    mlp = int(getattr(module, "mlp_hidden_dim", 0) or 4 * getattr(module, "hidden_size", 1))
    heads = getattr(module, "num_heads", 1)

    def plan(x, arguments):
        b, total, width = x.shape
        e = _elem(x)
        # fused linear1 output (qkv + mlp), q/k/v after norm (+ fp32 RoPE), attention, MLP activation, the
        # concatenation fed to linear2, its output and the gated residual
        per_row = b * ((9 * width + 3 * mlp) * e + 8 * width * 4 + _score_bytes(heads, total))
        # chunked: full-size keys, values and output
        return {"bytes_per_row": per_row, "fixed_bytes": 3 * b * total * width * e, "whole_bytes": None}

    return ChunkedBlock(original, planner, "hunyuan_single_block", inspect.signature(original),
                        {"pe": 2, "attn_mask": "mask"}, frozenset({"vec"}), _module_hook_names(module), plan)


def install(patcher, settings: ChunkSettings) -> InstallReport:
    """Add chunking object patches and the attention override to ``patcher`` (a clone)."""
    dm = patcher.model.diffusion_model
    family = model_family(dm)
    if family is None:
        raise ValueError(
            f"{NODE}: input 'model' is a {type(dm).__name__} diffusion model, which this node does not know how to "
            f"chunk exactly. Supported: {SUPPORTED}. Remove the node from this workflow or feed it a supported model.")
    planner = Planner(settings, weakref.ref(patcher))
    report = InstallReport(family, stats=planner.stats)
    if settings.policy.mode == "off":
        return report
    c = _classes()
    # Whole blocks along tokens need the attention override (it files keys and values) and chunk
    # both the attention and the feed-forward, so they run when both are asked for.
    blocks = settings.blocks and settings.ffn and settings.attention and compat.attention_override_supported()

    def add(path: str, attr: str, make, label: str):
        full = f"diffusion_model.{path}" if path else "diffusion_model"
        module = patcher.get_model_object(full)
        patcher.add_object_patch(f"{full}.{attr}", make(module, _original(patcher, module, full, attr)))
        report.patched[label] += 1

    for name, module in dm.named_modules():
        if family == "wan" and c["WanAttentionBlock"] is not None and isinstance(module, c["WanAttentionBlock"]):
            if blocks and type(module) is c["WanAttentionBlock"]:  # subclasses (VACE, audio) take other inputs
                add(name, "forward", lambda m, o: _wan_block_patch(m, o, planner), "block")
            ffn = getattr(module, "ffn", None)
            if settings.ffn and isinstance(ffn, torch.nn.Sequential):
                hidden = _ffn_hidden(ffn)
                add(f"{name}.ffn", "forward", lambda m, o, h=hidden: ChunkedRowwise(o, planner, "wan_ffn", h), "ffn")
            if settings.attention:
                sa = getattr(module, "self_attn", None)
                parts = compat.wan_self_attention_parts(sa) if sa is not None else None
                if parts is not None:
                    add(f"{name}.self_attn", "forward",
                        lambda m, o, p=parts: ChunkedWanSelfAttention(m, o, planner, p[0], p[1], _module_hook_names(m)),
                        "self_attention")
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
        elif (family == "hunyuan_video" and blocks and c["SingleStreamBlock"] is not None
              and type(module) is c["SingleStreamBlock"]):
            add(name, "forward", lambda m, o: _single_block_patch(m, o, planner), "single_block")
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
