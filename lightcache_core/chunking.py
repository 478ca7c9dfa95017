"""Feature chunking: run a row-independent function on slices of its input.

Peak activation memory of a per-row op (per-frame conv, token-wise MLP, ...) grows
with the number of rows processed at once.  ``run_chunked`` processes ``rows_per_chunk``
rows at a time and writes each result straight into one preallocated output, so the
only full-size tensor is the output itself (no ``torch.cat``, no list of partials).

Exactness: chunking is exact only for functions whose rows are independent along the
chunked dim (per-sample GroupNorm, per-frame convs/attention, token-wise Linear/MLP
along the token dim).  It is *not* exact for ops that mix rows (temporal attention or a
GroupNorm over frames when chunking frames; full attention when chunking tokens).
Bit-identity additionally depends on the kernel computing each row the same way for
different row counts; see ``tests/core/test_chunking.py`` for what is verified.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

ChunkMode = Literal["off", "count", "size", "auto"]
_MODES = ("off", "count", "size", "auto")


@dataclass(frozen=True)
class ChunkPolicy:
    """How many rows to process per chunk.

    mode: ``"off"`` (one chunk), ``"count"`` (split into ``count`` chunks),
        ``"size"`` (``size`` rows per chunk), ``"auto"`` (rows that fit a byte budget:
        ``budget_bytes`` when > 0, else ``safety`` x the free bytes the caller supplies).
    count: number of chunks for ``"count"`` (>= 1).
    size: rows per chunk for ``"size"`` (>= 1 in that mode).
    budget_bytes: working-memory budget in bytes for ``"auto"`` (0 = use free memory).
    """

    mode: str = "auto"
    count: int = 4
    size: int = 0
    budget_bytes: int = 0

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"ChunkPolicy.mode must be one of {_MODES}, got {self.mode!r}")
        if self.count < 1:
            raise ValueError(f"ChunkPolicy.count must be >= 1, got {self.count}")
        if self.size < 0 or (self.mode == "size" and self.size < 1):
            raise ValueError(f"ChunkPolicy.size must be >= 1 in 'size' mode (>= 0 otherwise), got {self.size}")
        if self.budget_bytes < 0:
            raise ValueError(f"ChunkPolicy.budget_bytes must be >= 0, got {self.budget_bytes}")


def plan_chunk_rows(
    total_rows: int,
    bytes_per_row: int,
    policy: ChunkPolicy,
    free_bytes: int | None = None,
    safety: float = 0.5,
    *,
    fixed_bytes: int = 0,
    whole_bytes: int | None = None,
    max_chunks: int | None = None,
) -> int:
    """Rows per chunk for a dim of ``total_rows`` rows; always in ``[1, max(total_rows, 1)]``.

    total_rows: size of the chunked dim.
    bytes_per_row: working memory one row of a chunk needs (bytes), used by ``"auto"``.
    free_bytes: free device memory (bytes), used by ``"auto"`` when
        ``policy.budget_bytes`` is 0; without it ``"auto"`` does not chunk.
    safety: fraction of ``free_bytes`` the op may use (the ``"auto"`` budget).
    fixed_bytes: ``"auto"``: memory the op holds at full size once it runs in chunks
        (e.g. the keys, values and output of a chunked transformer block), on top of
        ``bytes_per_row`` x rows.
    whole_bytes: ``"auto"``: working memory of the unchunked op when it differs from
        ``bytes_per_row x total_rows`` (it may hold things a chunked run never does).
    max_chunks: ``"auto"``: never more chunks than this (when even that does not fit,
        the fixed part dominates and smaller chunks would only cost time).

    ``"count"`` gives ``ceil(total_rows / count)``; ``"auto"`` keeps the op whole when
    its whole working set fits the budget, else gives ``(budget - fixed) //
    bytes_per_row`` (at least 1, and at least ``ceil(total / max_chunks)``).
    ``total_rows`` <= 0 returns 1 so the result is always a valid chunk length.
    """
    if total_rows <= 0:
        return 1
    if not 0.0 < safety <= 1.0:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    if policy.mode == "off":
        rows = total_rows
    elif policy.mode == "count":
        rows = math.ceil(total_rows / policy.count)
    elif policy.mode == "size":
        rows = policy.size
    else:
        if policy.budget_bytes > 0:
            budget = policy.budget_bytes
        elif free_bytes is not None:
            budget = int(max(free_bytes, 0) * safety)
        else:
            budget = None
        whole = whole_bytes if whole_bytes is not None else bytes_per_row * total_rows
        if budget is None or bytes_per_row <= 0 or whole <= budget:
            rows = total_rows
        else:
            rows = max(budget - max(int(fixed_bytes), 0), 0) // bytes_per_row
            if max_chunks is not None and max_chunks >= 1:
                rows = max(rows, math.ceil(total_rows / max_chunks))
    return max(1, min(int(rows), total_rows))


def run_chunked(
    fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    dim: int,
    rows_per_chunk: int,
    out: torch.Tensor | None = None,
    extra_inputs: tuple = (),
    counter: object | None = None,
    contiguous: bool = True,
) -> torch.Tensor:
    """``fn(x, *extra_inputs)`` computed at most ``rows_per_chunk`` rows of ``dim`` at a time.

    x: input of any shape; ``dim`` is the chunked dim (negative allowed).
    extra_inputs: further positional arguments; tensors are sliced along the same
        ``dim`` (they must have ``x.shape[dim]`` rows there), others are passed as is.
    fn: must map ``n`` rows to ``n`` rows along ``dim``; other dims/dtype are free.
    out: optional preallocated output (shape of the full result); allocated lazily
        from the first chunk's result otherwise.
    counter: optional object with ``.add(n_chunks)`` or a callable ``(n_chunks)``,
        told how many times ``fn`` ran.
    contiguous: pass each tensor chunk as a contiguous copy when its view is not
        contiguous (chunks along dim 0 of a contiguous tensor are never copied).  BLAS
        kernels may round differently for strided inputs, so this keeps chunked
        results bitwise equal to the unchunked call on contiguous input; the copy is
        chunk-sized.
    The ``ceil(total / rows_per_chunk)`` chunks are balanced (sizes differ by at most
    one row) so no tiny tail chunk falls onto a differently-rounding small-matrix
    kernel.
    Returns the full result.  When ``rows_per_chunk >= x.shape[dim]`` this is
    ``fn(x, *extra_inputs)`` itself (copied into ``out`` if given).
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    dim = dim % x.dim() if x.dim() else 0
    total = x.shape[dim] if x.dim() else 1
    if rows_per_chunk >= total:
        result = fn(x, *extra_inputs)
        _count(counter, 1)
        if out is None:
            return result
        out.copy_(result)
        return out

    pieces = list(balanced_pieces(total, rows_per_chunk))
    for start, rows in pieces:
        chunk_x = _prepare(x.narrow(dim, start, rows), contiguous)
        chunk_args = [_narrow_if_tensor(a, dim, start, rows, total, contiguous) for a in extra_inputs]
        result = fn(chunk_x, *chunk_args)
        if result.dim() <= dim or result.shape[dim] != rows:
            raise ValueError(
                f"run_chunked: fn must keep {rows} rows along dim {dim}, got shape {tuple(result.shape)}")
        if out is None:
            full_shape = list(result.shape)
            full_shape[dim] = total
            out = torch.empty(full_shape, dtype=result.dtype, device=result.device)
        out.narrow(dim, start, rows).copy_(result)
        del result, chunk_x, chunk_args  # free before the next chunk allocates its own
    _count(counter, len(pieces))
    return out


def balanced_pieces(total: int, rows_per_chunk: int) -> Iterator[tuple[int, int]]:
    """``(start, length)`` of the ``ceil(total / rows_per_chunk)`` chunks of ``total`` rows.

    Lengths differ by at most one row, so no tiny last chunk lands in a slower
    kernel; every length is <= ``rows_per_chunk``.
    """
    n_chunks = max(1, math.ceil(total / max(1, rows_per_chunk)))
    base, longer = divmod(total, n_chunks)
    start = 0
    for index in range(n_chunks):
        length = base + (1 if index < longer else 0)
        yield start, length
        start += length


def _prepare(chunk: torch.Tensor, contiguous: bool) -> torch.Tensor:
    return chunk.contiguous() if contiguous else chunk


def _narrow_if_tensor(value: object, dim: int, start: int, rows: int, total: int, contiguous: bool) -> object:
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() <= dim or value.shape[dim] != total:
        raise ValueError(
            f"run_chunked: extra input of shape {tuple(value.shape)} has no dim {dim} of size {total}")
    return _prepare(value.narrow(dim, start, rows), contiguous)


def _count(counter: object | None, n_chunks: int) -> None:
    if counter is None:
        return
    if hasattr(counter, "add"):
        counter.add(n_chunks)
    elif callable(counter):
        counter(n_chunks)
    else:
        raise TypeError("counter must have .add(n) or be callable")
