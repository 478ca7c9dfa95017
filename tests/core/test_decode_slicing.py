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


class HostCausalBlock(nn.Module):
    """A causal 3x3x3 residual stage with the Wan VAE's cache rule: the conv reads its slot's frames in front
    of its input (zeros for whatever is missing of 2), and the slot then holds its input's last 2 frames.
    ``prepend`` (0.3.x hosts): after a one-frame input the slot's previous last frame is kept in front;
    without it (newer hosts) the slot holds just the one frame."""

    def __init__(self, c=4, prepend=True):
        super().__init__()
        self.conv = nn.Conv3d(c, c, 3, padding=(0, 1, 1))
        self.prepend = prepend

    def forward(self, x, cache, idx):
        h = F.silu(F.normalize(x, dim=1))
        prev = cache[idx[0]]
        new = h[:, :, -2:].clone()
        if self.prepend and new.shape[2] < 2 and isinstance(prev, torch.Tensor):
            new = torch.cat([prev[:, :, -1:], new], 2)
        front = prev if isinstance(prev, torch.Tensor) else h[:, :, :0]
        pad = h.new_zeros(h.shape[:2] + (2 - front.shape[2],) + h.shape[3:])
        y = self.conv(torch.cat([pad, front, h], 2))
        cache[idx[0]] = new
        idx[0] += 1
        return x + y


@pytest.mark.parametrize("prepend", [True, False])
@pytest.mark.parametrize("row_chunks", [0, 1, 3])
def test_frame_chunked_call_equals_whole_units(prepend, row_chunks):
    """Units of 1, 4, 4 frames: one frame at a time (and row chunks inside) gives the whole-unit frames and
    caches, for hosts that prepend the previous frame to a short slot and for hosts that do not.
    ``row_chunks`` 0: the layer is called directly (only keep_cache_frames tops its slot up)."""
    torch.manual_seed(0)
    blocks = nn.ModuleList([HostCausalBlock(prepend=prepend), HostCausalBlock(prepend=prepend)]).eval()
    units = [torch.randn(1, 4, t, 11, 7) for t in (1, 4, 4)]
    ref_cache, got_cache = [None, None], [None, None]

    def whole(x, cache):
        idx = [0]
        for b in blocks:
            x = b(x, cache, idx)
        return x

    def per_frame(frames):
        idx = [0]
        for b in blocks:
            start = idx[0]
            replaced = got_cache[start:start + 1]
            if row_chunks == 0:
                frames = b(frames, got_cache, idx)
                ds.keep_cache_frames(replaced, got_cache, start)
                continue

            def fn(xr, local, b=b):
                i = [0]
                return b(xr, local, i), i[0]

            sub = got_cache[start:start + 1]
            frames, used = ds.row_chunked_call(fn, frames, sub, halo=1, chunks=row_chunks)
            got_cache[start:start + used] = sub[:used]
            idx[0] += used
            ds.keep_cache_frames(replaced, got_cache, start)
        return frames

    with torch.no_grad():
        for x in units:
            ref = whole(x, ref_cache)
            got = ds.frame_chunked_call(per_frame, x)
            assert got.shape == ref.shape
            assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
            for a, b in zip(got_cache, ref_cache):
                assert torch.allclose(a[:, :, -b.shape[2]:], b, atol=1e-5, rtol=0)


def test_frame_chunked_call_without_topping_up_is_wrong_on_newer_hosts():
    """Without keep_cache_frames a host that keeps only the latest frame loses history (the test is not vacuous)."""
    torch.manual_seed(0)
    block = HostCausalBlock(prepend=False).eval()
    first, second = torch.randn(1, 4, 1, 6, 5), torch.randn(1, 4, 4, 6, 5)
    ref_cache, got_cache = [None], [None]
    with torch.no_grad():
        block(first, ref_cache, [0])
        block(first, got_cache, [0])
        ref = block(second, ref_cache, [0])
        got = ds.frame_chunked_call(lambda f: block(f, got_cache, [0]), second)
    assert (got - ref).abs().max() > 1e-3


def test_row_chunked_call_rewrites_cache_slots_in_place():
    """Once a slot has its steady shape, later calls write into the same tensor (no second copy per slot)."""
    torch.manual_seed(0)
    block = HostCausalBlock().eval()
    cache = [None]

    def fn(xr, local):
        i = [0]
        return block(xr, local, i), i[0]

    with torch.no_grad():
        ds.row_chunked_call(fn, torch.randn(1, 4, 2, 12, 5), cache, 1, 3)
        slot = cache[0]
        ref_cache = [slot.clone()]
        x = torch.randn(1, 4, 2, 12, 5)
        got, _ = ds.row_chunked_call(fn, x, cache, 1, 3)
        ref = block(x, ref_cache, [0])
    assert cache[0] is slot
    assert torch.allclose(got, ref, atol=1e-5, rtol=0) and torch.allclose(cache[0], ref_cache[0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- row bands through a stack


def test_band_plan_back_propagates_rows_and_context():
    # stack: conv (halo 1), x2 upsampler (halo 1), conv (halo 2); 10 input rows -> 20 output rows
    steps = ds.band_plan(10, [1, 2, 1], [1, 1, 2], 8, 14)
    last, up, first = steps[2], steps[1], steps[0]
    assert (last.lo, last.hi) == (6, 16) and (last.keep_lo, last.keep_hi) == (2, 8)  # 8..14 with 2 rows each side
    assert (up.lo, up.hi) == (2, 9) and (up.keep_lo, up.keep_hi) == (6 - 4, 16 - 4)
    assert (first.lo, first.hi) == (1, 10) and (first.keep_lo, first.keep_hi) == (1, 8)
    # at the frame's edges no context is needed (the band's padding is the frame's)
    top = ds.band_plan(10, [1, 2, 1], [1, 1, 2], 0, 4)
    assert top[0].lo == 0 and top[-1].keep_lo == 0
    bottom = ds.band_plan(10, [1, 2, 1], [1, 1, 2], 16, 20)
    assert bottom[0].hi == 10 and bottom[-1].keep_hi - bottom[-1].keep_lo == 4
    with pytest.raises(ValueError):
        ds.band_plan(10, [1, 2], [1], 0, 4)
    with pytest.raises(ValueError):
        ds.band_plan(10, [2], [1], 0, 21)


class _ConvStack(nn.Module):
    """Convs (3x3 and 5x5, 'same' padding), a nearest x2 upsampler and pointwise ops: a spatially local stack."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                     nn.Conv2d(4, 4, 3, padding=1)), nn.Conv2d(4, 2, 5, padding=2)])
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        self.scales, self.halos = [1, 2, 1], [1, 1, 2]

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("bands", [2, 3, 5])
def test_bands_through_a_stack_equal_the_whole_frame(bands):
    """Each band: its planned input rows, every layer cropped to the rows the next one needs; stitched, the
    bands are the whole-frame output."""
    stack = _ConvStack()
    x = torch.randn(1, 3, 23, 9, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = stack(x)
        out = torch.empty_like(ref)
        for lo, hi in ds.split_rows(23, bands):
            steps = ds.band_plan(23, stack.scales, stack.halos, 2 * lo, 2 * hi)
            y = x[..., steps[0].lo:steps[0].hi, :]
            for layer, step in zip(stack.layers, steps):
                y = torch.tanh(layer(y))[..., step.keep_lo:step.keep_hi, :]
            out[..., 2 * lo:2 * hi, :] = y
    assert torch.allclose(out, ref, atol=1e-6)
    # too little context is not exact: the plan's halo is what makes it so
    steps = ds.band_plan(23, stack.scales, [0, 0, 0], 20, 30)
    y = x[..., steps[0].lo:steps[0].hi, :]
    for layer, step in zip(stack.layers, steps):
        y = torch.tanh(layer(y))[..., step.keep_lo:step.keep_hi, :]
    assert not torch.allclose(y, ref[..., 20:30, :], atol=1e-4)


def test_split_rows_and_compact_cache():
    assert ds.split_rows(10, 3) == [(0, 3), (3, 7), (7, 10)]
    assert ds.split_rows(2, 5) == [(0, 1), (1, 2)]
    x = torch.randn(1, 2, 5, 3, 3)
    view = x[:, :, -2:]
    own = torch.randn(1, 2, 2, 3, 3)
    cache = [view, own, "Rep", None]
    ds.compact_cache(cache)
    assert cache[0] is not view and torch.equal(cache[0], view)
    assert cache[0].untyped_storage().nbytes() == view.numel() * view.element_size()
    assert cache[1] is own and cache[2:] == ["Rep", None]


def test_slice_writer_writes_row_bands():
    writer = ds.SliceWriter(1, 2, 6, 4, 3, "cpu", torch.float32)
    top = torch.ones(1, 3, 2, 4, 4)
    bottom = torch.full((1, 3, 2, 2, 4), 2.0)
    assert writer.write(0, top, row_start=0) == 2 and writer.write(0, bottom, row_start=4) == 2
    out = writer.result()[0]
    assert torch.equal(out[:, :4], torch.ones(2, 4, 4, 3)) and torch.equal(out[:, 4:], torch.full((2, 2, 4, 3), 2.0))
    with pytest.raises(ValueError):
        writer.write(0, torch.ones(1, 3, 2, 3, 4), row_start=4)  # past the last row
