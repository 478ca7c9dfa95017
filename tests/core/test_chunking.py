"""Chunked execution: planning arithmetic and exactness against the unchunked call.

What is guaranteed (fp32, CPU, this torch build):
* Per-frame Conv2d chunked along dim 0 of [B*T, C, H, W]: bitwise equal whenever every
  chunk holds >= 2 frames.  Single-frame chunks take a different conv kernel and agree
  to 1e-5 relative.
* Linear / GELU-MLP chunked along the token dim of [B, L, C]: bitwise equal when each
  chunk's GEMM has >= 12 rows (B x chunk rows), which the balanced chunking of
  ``run_chunked`` ensures for the sizes tested below (multiples of 8 rows, >= 16 rows
  per chunk).  Smaller GEMMs go to BLAS small-matrix/GEMV paths that round
  differently; there the result agrees to 1e-5 relative (observed max abs error ~1.5e-6
  on O(1) outputs), which ``test_linear_any_chunk_size_within_tolerance`` checks.
"""

import pytest
import torch

from lightcache_core import ChunkPolicy, plan_chunk_rows, run_chunked


class Counter:
    def __init__(self):
        self.n = 0

    def add(self, n):
        self.n += n


@pytest.fixture(autouse=True)
def _no_grad_seeded():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


# ------------------------------------------------------------------ planning
def test_plan_off_and_count_and_size():
    assert plan_chunk_rows(100, 10, ChunkPolicy(mode="off")) == 100
    assert plan_chunk_rows(100, 10, ChunkPolicy(mode="count", count=4)) == 25
    assert plan_chunk_rows(50, 10, ChunkPolicy(mode="count", count=9)) == 6  # ceil(50/9)
    assert plan_chunk_rows(10, 10, ChunkPolicy(mode="count", count=100)) == 1
    assert plan_chunk_rows(100, 10, ChunkPolicy(mode="size", size=30)) == 30
    assert plan_chunk_rows(100, 10, ChunkPolicy(mode="size", size=300)) == 100


def test_plan_auto_budget_and_free_memory():
    policy = ChunkPolicy(mode="auto", budget_bytes=1000)
    assert plan_chunk_rows(100, 30, policy) == 33
    assert plan_chunk_rows(100, 5000, policy) == 1  # never below one row
    assert plan_chunk_rows(10, 1, policy) == 10  # never above total
    free_policy = ChunkPolicy(mode="auto")
    assert plan_chunk_rows(100, 10, free_policy, free_bytes=400, safety=0.5) == 20
    assert plan_chunk_rows(100, 10, free_policy) == 100  # no memory information: no chunking
    assert plan_chunk_rows(0, 10, free_policy) == 1


def test_plan_auto_with_fixed_and_whole_working_sets():
    """auto: whole when the unchunked op fits the budget; else chunks that fit next to what the chunked op
    holds at full size, never more than max_chunks."""
    policy = ChunkPolicy(mode="auto", budget_bytes=1000)
    # per-row estimate says 100 x 20 = 2000 > 1000, but the unchunked op really needs only 900: whole
    assert plan_chunk_rows(100, 20, policy, whole_bytes=900) == 100
    # it needs 5000 whole: chunks of (1000 - 400 fixed) // 20 = 30 rows
    assert plan_chunk_rows(100, 20, policy, fixed_bytes=400, whole_bytes=5000) == 30
    # the fixed part alone exceeds the budget: as many chunks as allowed, no more
    assert plan_chunk_rows(100, 20, policy, fixed_bytes=2000, max_chunks=4) == 25
    assert plan_chunk_rows(100, 20, policy, fixed_bytes=2000) == 1
    # free memory instead of a budget: the share of it
    assert plan_chunk_rows(100, 20, ChunkPolicy(mode="auto"), free_bytes=4000, safety=0.25, fixed_bytes=400) == 30
    # count/size ignore all of it
    assert plan_chunk_rows(100, 20, ChunkPolicy(mode="count", count=4), fixed_bytes=10**9, max_chunks=2) == 25


@pytest.mark.parametrize("kwargs", [dict(mode="bogus"), dict(count=0), dict(mode="size", size=0),
                                    dict(budget_bytes=-1)])
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        ChunkPolicy(**kwargs)


def test_plan_rejects_bad_safety():
    with pytest.raises(ValueError):
        plan_chunk_rows(10, 1, ChunkPolicy(), free_bytes=100, safety=0.0)


# ------------------------------------------------------------------ execution
@pytest.mark.parametrize("rows", [16, 32, 64, 100])
@pytest.mark.parametrize("batch,tokens", [(1, 300), (2, 200), (2, 1000)])
def test_linear_token_chunks_bit_identical(batch, tokens, rows):
    linear = torch.nn.Linear(320, 320)
    x = torch.randn(batch, tokens, 320)
    counter = Counter()
    out = run_chunked(linear, x, dim=1, rows_per_chunk=rows, counter=counter)
    assert torch.equal(out, linear(x))
    assert counter.n == -(-tokens // rows)


def test_linear_any_chunk_size_within_tolerance():
    linear = torch.nn.Linear(320, 320)
    x = torch.randn(2, 64, 320)
    ref = linear(x)
    for rows in (1, 2, 3, 5, 7, 11, 30):
        torch.testing.assert_close(run_chunked(linear, x, 1, rows), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [16, 24, 64, 150])
def test_gelu_mlp_token_chunks_bit_identical(rows):
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(256, 64))
    x = torch.randn(2, 300, 64)
    assert torch.equal(run_chunked(mlp, x, dim=-2, rows_per_chunk=rows), mlp(x))


@pytest.mark.parametrize("frames_per_chunk", [2, 3, 5, 8, 16])
def test_per_frame_conv_chunks_bit_identical(frames_per_chunk):
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2 * 25, 8, 32, 40)  # [B*T, C, H, W]
    counter = Counter()
    out = run_chunked(conv, x, dim=0, rows_per_chunk=frames_per_chunk, counter=counter)
    assert torch.equal(out, conv(x))
    assert counter.n == -(-50 // frames_per_chunk)


def test_single_frame_conv_chunks_within_tolerance():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(12, 8, 16, 16)
    torch.testing.assert_close(run_chunked(conv, x, 0, 1), conv(x), rtol=1e-5, atol=1e-5)


def test_no_chunk_path_returns_fn_result_directly():
    calls = []

    def fn(t):
        calls.append(t.shape)
        return t * 2

    x = torch.randn(4, 5)
    counter = Counter()
    out = run_chunked(fn, x, 0, rows_per_chunk=4, counter=counter)
    assert calls == [x.shape] and counter.n == 1
    assert torch.equal(out, x * 2)


def test_writes_into_given_out_and_never_concatenates(monkeypatch):
    def no_cat(*args, **kwargs):
        raise AssertionError("run_chunked must not concatenate")

    monkeypatch.setattr(torch, "cat", no_cat)
    x = torch.randn(10, 3)
    out = torch.empty(10, 3)
    result = run_chunked(lambda t: t + 1, x, 0, 3, out=out)
    assert result is out
    assert torch.equal(out, x + 1)


def test_chunk_sizes_are_balanced():
    sizes = []
    run_chunked(lambda t: (sizes.append(t.shape[0]), t)[1], torch.randn(10, 2), 0, 4)
    assert sizes == [4, 3, 3]  # ceil(10/4) = 3 chunks, no 2-row tail


def test_extra_inputs_are_sliced_and_non_tensors_passed():
    x = torch.randn(3, 9, 4)
    scale = torch.randn(3, 9, 1)
    seen = []

    def fn(t, s, tag):
        seen.append(tag)
        return t * s

    out = run_chunked(fn, x, 1, 4, extra_inputs=(scale, "tag"))
    assert torch.equal(out, x * scale)
    assert seen == ["tag"] * 3


def test_callable_counter_and_dtype_change():
    counts = []
    x = torch.randn(6, 2)
    out = run_chunked(lambda t: t.to(torch.float64), x, 0, 2, counter=counts.append)
    assert counts == [3] and out.dtype == torch.float64
    assert torch.equal(out, x.double())


def test_fn_changing_row_count_is_rejected():
    with pytest.raises(ValueError):
        run_chunked(lambda t: t[:1], torch.randn(6, 2), 0, 2)
    with pytest.raises(ValueError):
        run_chunked(lambda t, e: t, torch.randn(6, 2), 0, 2, extra_inputs=(torch.randn(5, 2),))
    with pytest.raises(ValueError):
        run_chunked(lambda t: t, torch.randn(6, 2), 0, 0)
