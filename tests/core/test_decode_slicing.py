"""lightcache_core.decode_slicing: slice planning, the output writer, and exact halo row chunks (no host)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F

from lightcache_core import decode_slicing as ds


def test_unit_ranges():
    assert ds.unit_ranges(3, "single") == [(0, 1), (1, 2), (2, 3)]
    assert ds.unit_ranges(1, "pairs") == [(0, 1)]
    assert ds.unit_ranges(4, "pairs") == [(0, 1), (1, 3), (3, 4)]
    assert ds.unit_ranges(5, "pairs") == [(0, 1), (1, 3), (3, 5)]
    assert ds.unit_ranges(0) == []


def test_group_units_never_splits_a_unit():
    units = ds.unit_ranges(7, "pairs")
    groups = ds.group_units(units, 1)
    assert [u for g in groups for u in g] == units and all(len(g) == 1 for g in groups)
    groups = ds.group_units(ds.unit_ranges(7, "single"), 3)
    assert [len(g) for g in groups] == [3, 3, 1]


def test_frames_per_slice_for_budget():
    assert ds.frames_per_slice_for_budget(21, 100, 1000) == 10
    assert ds.frames_per_slice_for_budget(21, 100, 50) == 1
    assert ds.frames_per_slice_for_budget(5, 100, 10**9) == 5


@pytest.mark.parametrize("rows,chunks,halo", [(10, 3, 2), (7, 7, 1), (5, 4, 3), (64, 8, 4)])
def test_row_plan_covers_rows(rows, chunks, halo):
    plan = ds.row_plan(rows, chunks, halo)
    kept = [r for c in plan for r in range(c.keep_lo, c.keep_hi)]
    assert kept == list(range(rows))
    for c in plan:
        assert c.lo == max(0, c.keep_lo - halo) and c.hi == min(rows, c.keep_hi + halo)
        assert c.keep_hi - c.keep_lo >= min(halo, rows) or len(plan) == 1


def test_writer_copies_slices_and_processes():
    w = ds.SliceWriter(2, 5, 3, 4, 3)
    x = torch.randn(2, 3, 2, 3, 4)
    assert w.write(0, x, lambda t: t * 2) == 2
    w.write(2, torch.randn(2, 3, 3, 3, 4))
    assert torch.equal(w.result()[:, :2], (x * 2).movedim(1, -1))
    with pytest.raises(ValueError):
        w.write(4, torch.randn(2, 3, 2, 3, 4))


class CausalConv(nn.Conv3d):
    """A causal 3x3x3 conv with a 2-frame cache slot, like the Wan VAE's (time padded on the left only)."""

    def forward(self, x, cache=None):
        x = torch.cat([cache, x], 2) if cache is not None else F.pad(x, (0, 0, 0, 0, 2, 0))
        return super().forward(F.pad(x, (1, 1, 1, 1, 0, 0)))


class Block(nn.Module):
    """norm (per pixel) -> SiLU -> causal conv -> nearest x2 upsample -> 3x3 conv: a decoder stage in miniature."""

    def __init__(self, c=4):
        super().__init__()
        self.conv = CausalConv(c, c, 3)
        self.up = nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact")
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, cache, idx):
        h = F.silu(F.normalize(x, dim=1))
        prev = cache[idx[0]]
        new = h[:, :, -2:].clone()
        h = self.conv(h, prev)
        cache[idx[0]] = new
        idx[0] += 1
        b, c, t = h.shape[:3]
        h = self.up(h.movedim(2, 1).reshape(b * t, c, *h.shape[-2:]))
        h = self.conv2(h)
        return h.reshape(b, t, c, *h.shape[-2:]).movedim(1, 2)


def test_conv_halo_counts_rows():
    assert ds.conv_halo(Block()) == 2
    assert ds.conv_halo(nn.Conv2d(3, 3, 3, stride=2, padding=1)) is None


@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_row_chunked_call_is_exact_and_carries_the_cache(chunks):
    torch.manual_seed(0)
    block = Block().eval()
    frames = [torch.randn(1, 4, 2, 13, 9) for _ in range(3)]
    halo = ds.conv_halo(block)
    ref_cache, got_cache = [None], [None]
    with torch.no_grad():
        for x in frames:
            ref = block(x, ref_cache, [0])

            def fn(xr, local):
                idx = [0]
                return block(xr, local, idx), idx[0]

            got, used = ds.row_chunked_call(fn, x, got_cache, halo, chunks)
            assert used == 1
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-6, rtol=0)
            assert torch.allclose(got_cache[0], ref_cache[0], atol=1e-6, rtol=0)


def test_too_small_halo_is_not_exact():
    """The halo matters: with none, chunk borders differ (so the exactness test is not vacuous)."""
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 4, 2, 12, 9)
    with torch.no_grad():
        ref = block(x, [None], [0])
        got, _ = ds.row_chunked_call(lambda xr, local: (block(xr, local, [0]), 1), x, [None], 0, 3)
    assert (got - ref).abs().max() > 1e-3
