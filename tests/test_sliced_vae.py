"""Sliced VAE Decode against ComfyUI's own VAEDecode, through the host's real loaders and code paths."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent


def _slicing():
    mod = next(m for name, m in sys.modules.items() if name.endswith(".nodes.vae_slicing"))
    return mod


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: tiny CPU convs gain nothing from more, and on a shared machine OpenMP spinning
    between oversubscribed threads made these tests 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def wan_vae(comfy_host):
    import nodes
    from harness import fixtures

    return nodes.VAELoader().load_vae(fixtures.WAN_VAE.name)[0]


@pytest.fixture(scope="module")
def sd_vae(comfy_host):
    import nodes
    from harness import fixtures

    return nodes.VAELoader().load_vae(fixtures.SD_VAE.name)[0]


_REFS: dict = {}


def _latent(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _reference(vae, z, key):
    import nodes

    if key not in _REFS:
        with torch.inference_mode():
            _REFS[key] = nodes.VAEDecode().decode(vae, {"samples": z})[0]
    return _REFS[key]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("frames", [1, 2, 5, 21])
@pytest.mark.parametrize("per_slice", [1, 2, 3])
def test_wan_sliced_equals_vaedecode(wan_vae, frames, per_slice, batch):
    z = _latent((batch, 16, frames, 3, 5), seed=frames * 10 + batch)
    ref = _reference(wan_vae, z, ("wan", frames, batch))
    vs = _slicing()
    # Row chunks forced on (3 per layer) on odd cases, whole frames on the others: both must be exact.
    row_chunks = 3 if (frames + per_slice) % 2 else 1
    got = vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=per_slice, row_chunks=row_chunks)).images
    assert got.shape == ref.shape and got.dtype == ref.dtype and got.device == ref.device
    assert (got - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("row_chunks", [2, 5, 16])
def test_wan_row_chunks_exact_odd_size(wan_vae, row_chunks):
    """The halo row-chunking (every full-resolution layer split into row bands) changes nothing, at odd sizes."""
    z = _latent((1, 16, 5, 11, 7), seed=3)
    ref = _reference(wan_vae, z, ("wan-odd", 5))
    vs = _slicing()
    result = vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=2, row_chunks=row_chunks))
    assert result.images.shape == ref.shape == (17, 88, 56, 3)
    assert (result.images - ref).abs().max().item() <= 1e-5
    assert any("row chunks" in n for n in result.notes)


def test_row_chunks_really_split(wan_vae, monkeypatch):
    """Guard against a vacuous exactness test: forced row chunks do run the layers on partial rows."""
    vs = _slicing()
    seen = []
    original = vs.ds.row_chunked_call

    def spy(fn, x, cache, halo, chunks):
        seen.append((x.shape[-2], chunks, halo))
        return original(fn, x, cache, halo, chunks)

    monkeypatch.setattr(vs.ds, "row_chunked_call", spy)
    z = _latent((1, 16, 2, 9, 5), seed=4)
    vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=1, row_chunks=4))
    full_res = [s for s in seen if s[0] == 72]
    assert full_res and all(c > 1 for _, c, _ in full_res)
    assert all(h >= 1 for _, _, h in seen)


def test_tail_runs_frame_by_frame_and_stays_exact(wan_vae, monkeypatch):
    """The layers after the last temporal upsample run one frame at a time (the causal cache carried), and
    the frames still equal VAEDecode's, as they do with the split off."""
    vs = _slicing()
    seen = []
    original = vs.ds.frame_chunked_call

    def spy(fn, x, frames_per_call=1):
        seen.append(x.shape[2])
        return original(fn, x, frames_per_call)

    monkeypatch.setattr(vs.ds, "frame_chunked_call", spy)
    z = _latent((1, 16, 3, 5, 6), seed=11)
    ref = _reference(wan_vae, z, ("wan-tail", 3))
    split = vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=2))
    # the first latent frame decodes to one frame, the others to four: the host's decoder gets them one latent
    # frame at a time ([1, 4, 4]) or in pairs whose upsampled frames it splits itself (newer hosts: [1, 2, 2, 2, 2])
    assert seen[0] == 1 and sum(seen) == 1 + 4 * 2 and all(1 <= n <= 4 for n in seen), seen
    assert any("one frame at a time" in n for n in split.notes)
    whole = vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=2, frame_split=False))
    assert (split.images - ref).abs().max().item() <= 1e-5
    assert (whole.images - ref).abs().max().item() <= 1e-5


def test_cpu_lean_policy_splits_only_unfolding_layers(comfy_host):
    """Auto on CPU splits a layer only where torch would unfold its convolution (small frames: the unfolded
    copy is the peak, and chunks run faster); a layer big enough for oneDNN stays whole (chunks would send
    it back to the slower unfolding path)."""
    vs = _slicing()
    compat = next(m for name, m in sys.modules.items() if name.endswith(".nodes.compat"))
    weight = torch.zeros(16, 16, 3, 3, 3)
    small = torch.zeros(1, 16, 1, 96, 160)
    large = torch.zeros(1, 16, 1, 480, 832)
    assert compat.cpu_conv_unfolds(small, weight)
    assert vs._RowPlanner(0, 0).chunks(small, 2, weight) > 1
    if torch.backends.mkldnn.is_available():
        assert not compat.cpu_conv_unfolds(large, weight)
        assert vs._RowPlanner(0, 0).chunks(large, 2, weight) == 1
        assert vs._RowPlanner(16 * 2**20, 0).chunks(large, 2, weight) > 1  # the budget still splits


@pytest.mark.parametrize("row_chunks", [1, 3])
def test_wan22_decoder_equals_host_decode(comfy_host, row_chunks):
    """Wan 2.2's decoder (Up_ResidualBlock stages, DupUp3D shortcuts, first_chunk, unpatchify), built from the
    host's own class at a tiny width with seeded weights: unit-by-unit decoding with the cache carried, the
    tail frame by frame and row chunks gives the host's ``WanVAE.decode`` frames. (VAELoader only builds the
    full-width Wan 2.2 VAE, so this test calls the model directly.)"""
    from comfy.ldm.wan.vae2_2 import WanVAE

    from harness import fixtures

    vs = _slicing()
    model = fixtures.seeded_init_(WanVAE(dim=8, dec_dim=16, z_dim=8), seed=22, std=0.1).eval()
    runner = vs.WanCausalDecoder(model)
    z = _latent((1, 8, 3, 4, 5), seed=13)
    planner = vs._RowPlanner(0, row_chunks) if row_chunks > 1 else None
    with torch.inference_mode():
        ref = model.decode(z)
        cache = runner.new_cache()
        with runner.lean_layers(planner) as lean:
            got = torch.cat([runner.decode_unit(z[:, :, u0:u1], cache, first=(u0 == 0))
                             for u0, u1 in vs.ds.unit_ranges(3, runner.scheme)], 2)
    assert lean["frame_split"] and (lean["row_chunks"] or row_chunks == 1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_auto_splits_rows_on_cpu(wan_vae):
    """At its defaults on CPU the full-resolution layers run in row chunks (lean policy), exactly."""
    vs = _slicing()
    z = _latent((1, 16, 2, 12, 8), seed=12)
    ref = _reference(wan_vae, z, ("wan-auto", 2))
    result = vs.decode(wan_vae, z, vs.DecodeOptions())
    note = next(n for n in result.notes if n.startswith("row chunks"))
    assert int(note.split("up to ")[1].split()[0]) > 1
    assert (result.images - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("where", ["between units", "inside a layer"])
def test_interrupt_leaves_the_decoder_as_it_was(wan_vae, monkeypatch, where):
    """An interrupt (a BaseException in newer ComfyUI) between decoder calls or deep inside the row-chunked
    frame tail leaves no wrapped modules behind; the next decode is VAE Decode's again."""
    import comfy.model_management as mm

    vs = _slicing()
    decoder = wan_vae.first_stage_model.decoder
    before = (decoder.upsamples, decoder.head, [type(m) for m in decoder.modules()])
    z = _latent((1, 16, 3, 4, 4), seed=15)
    if where == "between units":
        calls = []

        def interrupt():
            calls.append(1)
            if len(calls) == 2:
                raise mm.InterruptProcessingException()

        monkeypatch.setattr(vs.compat, "throw_if_interrupted", interrupt)
        expected = mm.InterruptProcessingException
    else:
        head_conv = [m for m in decoder.head.modules() if isinstance(m, torch.nn.Conv3d)][-1]

        class Stop(BaseException):
            pass

        def stop(module, args):
            raise Stop()

        handle = head_conv.register_forward_pre_hook(stop)
        expected = Stop
    try:
        with pytest.raises(expected):
            vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=1, row_chunks=3))
    finally:
        if where != "between units":
            handle.remove()
    assert decoder.upsamples is before[0] and decoder.head is before[1]
    assert [type(m) for m in decoder.modules()] == before[2]
    monkeypatch.undo()
    ref = _reference(wan_vae, z, ("wan-interrupt", 3))
    assert (vs.decode(wan_vae, z, vs.DecodeOptions(frames_per_slice=1)).images - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("per_slice", [1, 2, 5])
def test_sd_vae_frame_slices_equal(sd_vae, per_slice):
    z = _latent((5, 4, 5, 7), seed=7)
    ref = _reference(sd_vae, z, ("sd", 5))
    vs = _slicing()
    result = vs.decode(sd_vae, z, vs.DecodeOptions(frames_per_slice=per_slice))
    assert result.path == "image frame slices"
    assert result.images.shape == ref.shape == (5, 40, 56, 3)
    assert (result.images - ref).abs().max().item() <= 1e-5
    assert result.slices == -(-5 // per_slice)


def test_node_through_prompt(runner, wan_vae):
    """The registered node in a real prompt: IMAGE like VAEDecode's and a report string."""
    from harness import fixtures

    prompt = {
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": fixtures.WAN_VAE.name}},
        "2": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 48, "height": 40, "length": 9, "batch_size": 1}},
        "3": {"class_type": "SlicedVAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0], "frames_per_slice": 1,
                                                         "row_chunks": 0, "budget_mb": 0, "tile_fallback": True}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}},
    }
    result = runner.run(prompt)
    ours, ref = result.output("3", 0), result.output("4", 0)
    report = result.output("3", 1)
    assert ours.shape == ref.shape == (9, 40, 48, 3)
    assert torch.equal(ours, ref)
    assert "LightCache decode (wan causal slices)" in report and "peak" in report


def _node_class():
    return next(m for name, m in sys.modules.items() if name.endswith(".nodes.vae_node")).SlicedVAEDecode


def test_every_input_and_output_has_a_tooltip(comfy_host):
    schema = _node_class().define_schema()
    assert schema.display_name == "Sliced VAE Decode"
    for item in list(schema.inputs) + list(schema.outputs):
        assert getattr(item, "tooltip", None), f"{item} has no tooltip"


def test_invalid_inputs_raise_clear_errors(comfy_host, wan_vae):
    node = _node_class()
    with pytest.raises(ValueError, match="Sliced VAE Decode: input 'samples'"):
        node.execute(torch.zeros(1), wan_vae)
    with pytest.raises(ValueError, match="Sliced VAE Decode: input 'vae'"):
        node.execute({"samples": torch.zeros(1, 16, 1, 2, 2)}, None)


def test_other_vae_falls_back_with_log(wan_vae, caplog):
    """A VAE without a strategy goes through ComfyUI's VAE.decode, with a log line."""
    vs = _slicing()
    z = _latent((1, 16, 2, 3, 3), seed=9)
    ref = _reference(wan_vae, z, ("wan-fb", 2))
    original = vs.family_of
    try:
        vs.family_of = lambda vae, samples: "other"
        with caplog.at_level("INFO", logger="LightCache"):
            result = vs.decode(wan_vae, z, vs.DecodeOptions())
    finally:
        vs.family_of = original
    assert torch.equal(result.images, ref)
    assert "fallback" in result.path and any("no slicing strategy" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_svd_auto_equals_vaedecode_and_smaller_slices_deviate(comfy_host, models_dir):
    """SVD's VideoDecoder mixes frames within the chunk it decodes. Auto takes VAE Decode's chunk (exact);
    a smaller explicit slice changes the frames, and the report says so. The SVD VAE has no width to detect,
    so the fixture is the full-size temporal decoder (fp16, random weights), made on demand."""
    import nodes
    from harness import corelink  # noqa: F401
    from harness import fixtures
    from lightcache_core.metrics import psnr

    fixtures.ensure_fixtures(models_dir, (fixtures.SVD_VAE,))
    vae = nodes.VAELoader().load_vae(fixtures.SVD_VAE.name)[0]
    vs = _slicing()
    z = _latent((14, 4, 8, 8), seed=14)
    assert vs.family_of(vae, z) == "svd"
    with torch.inference_mode():
        ref = nodes.VAEDecode().decode(vae, {"samples": z})[0]
    auto = vs.decode(vae, z, vs.DecodeOptions())
    assert auto.frames_per_slice == 14 and (auto.images - ref).abs().max().item() <= 1e-5
    half = vs.decode(vae, z, vs.DecodeOptions(frames_per_slice=7))
    assert (half.images - ref).abs().max().item() > 1e-3
    assert 15.0 < psnr(half.images, ref) < 60.0
    assert any("time context limited to 7-frame chunks" in n for n in half.notes)


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, gc
    sys.path.insert(0, {tests!r})
    from harness import host, fixtures
    host.boot(host.CACHE / "models"); fixtures.ensure_fixtures(host.CACHE / "models")
    import torch, nodes
    torch.set_num_threads(1)
    vs = next(m for n, m in sys.modules.items() if n.endswith(".nodes.vae_slicing"))
    vae = nodes.VAELoader().load_vae(fixtures.WAN_VAE.name)[0]
    frames = int(sys.argv[1])
    z = torch.randn(1, 16, frames, 8, 12, generator=torch.Generator().manual_seed(0))
    warm = vs.decode(vae, z[:, :, :2], vs.DecodeOptions(frames_per_slice=1, row_chunks=4)).images
    del warm; gc.collect()
    from harness import corelink
    from lightcache_core.memory_probe import PeakMemory
    import psutil
    process = psutil.Process()
    with PeakMemory("cpu", lambda: process.memory_info().rss) as probe:
        out = vs.decode(vae, z, vs.DecodeOptions(frames_per_slice=1, row_chunks=4)).images
    print(json.dumps({{"peak": probe.peak, "output": out.numel() * out.element_size()}}))
""")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_frames(comfy_host, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_MEMORY_CHILD.format(tests=str(TESTS)))
    figures = {}
    # A fixed mmap threshold stops glibc's heap from keeping freed blocks resident (its dynamic threshold
    # otherwise makes RSS creep up with the number of allocations, whoever makes them): this measures what
    # the decode holds, not allocator retention.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    for frames in (5, 21):
        proc = subprocess.run([sys.executable, str(script), str(frames)], capture_output=True, text=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[frames] = json.loads(proc.stdout.strip().splitlines()[-1])
    # The output buffer itself must grow with the clip; the working memory on top of it must not.
    work5 = figures[5]["peak"] - figures[5]["output"]
    work21 = figures[21]["peak"] - figures[21]["output"]
    assert work21 <= work5 * 1.25 + 8 * 2**20, figures


# ---------------------------------------------------------------- row bands through every frame

@pytest.mark.parametrize("bands,row_chunks,frame_split,batch,shape", [
    (2, 1, True, 1, (5, 11, 7)),
    (3, 3, True, 1, (6, 12, 5)),
    (4, 1, False, 1, (5, 9, 6)),
    (5, 0, True, 2, (4, 10, 3)),
    (2, 1, True, 1, (1, 8, 4)),
])
def test_wan_row_bands_equal_vaedecode(wan_vae, bands, row_chunks, frame_split, batch, shape):
    """Row bands, each decoded through every frame with its own causal cache and the rows of context its
    output needs (cropped after every layer), give VAE Decode's frames: with and without per-layer row chunks,
    with the layers run one frame at a time or whole units, for batches and single-frame clips."""
    frames, h, w = shape
    z = _latent((batch, 16, frames, h, w), seed=frames * 7 + h)
    ref = _reference(wan_vae, z, ("wan-bands", batch, shape))
    vs = _slicing()
    result = vs.decode(wan_vae, z, vs.DecodeOptions(bands=bands, row_chunks=row_chunks, frame_split=frame_split))
    assert result.path == "wan causal row bands"
    assert any(n.startswith(f"row bands: {bands} of") for n in result.notes), result.notes
    assert result.images.shape == ref.shape
    assert (result.images - ref).abs().max().item() <= 1e-5


def test_row_bands_decode_partial_rows_with_a_smaller_cache(wan_vae, monkeypatch):
    """Guard against a vacuous exactness test: each band's full-resolution layers see fewer rows than the
    frame has (its rows and their context), and the causal cache a band holds is a fraction of the whole
    frame's."""
    vs = _slicing()
    decoder = wan_vae.first_stage_model.decoder
    last = decoder.upsamples[-1]
    rows = []
    handle = last.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    caches = []
    original = vs._BandStack.run

    def spy(self, x, steps, cache, extras, emit):
        original(self, x, steps, cache, extras, emit)
        caches.append(sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor)))

    monkeypatch.setattr(vs._BandStack, "run", spy)
    z = _latent((1, 16, 3, 24, 4), seed=21)
    try:
        vs.decode(wan_vae, z, vs.DecodeOptions(bands=3, row_chunks=1))  # no per-layer row chunks inside bands
    finally:
        handle.remove()
    rows = rows[1:]  # the first call is the 4 x 4 probe that measures the layers' scales
    full = 24 * 8
    assert rows and max(rows) < full and min(rows) >= full // 3, rows
    # the whole frame's cache: the unit-by-unit decode's, after the same three units
    runner = vs.WanCausalDecoder(wan_vae.first_stage_model)
    cache = runner.new_cache()
    with torch.inference_mode(), runner.lean_layers(None):
        for u0, u1 in vs.ds.unit_ranges(3, runner.scheme):
            runner.decode_unit(z[:, :, u0:u1], cache, first=(u0 == 0))
    whole = sum(t.numel() * t.element_size() for t in cache if isinstance(t, torch.Tensor))
    assert max(caches) < 0.75 * whole, (max(caches), whole)


def test_auto_bands_fit_the_cache_target(wan_vae):
    """Auto: the fewest bands whose largest band cache fits min(BAND_CACHE_BYTES, budget / 2), at most one
    band per MIN_BAND_ROWS latent rows; small frames stay whole (the unit-by-unit decode)."""
    vs = _slicing()
    runner = vs.WanCausalDecoder(wan_vae.first_stage_model)
    stack = vs._BandStack(runner, None, True)
    conv1 = runner.decoder.conv1
    with torch.inference_mode():
        assert stack.measure(torch.zeros(1, conv1.out_channels, 1, 1, 1), ((), {}))
    assert stack.scales.count(2) == 3 and set(stack.scales) == {1, 2}  # three x2 upsamplers: 8x

    def worst(n, rows=90, width=160):
        return max(stack.cache_bytes(1, 4, width, stack.plan(rows, lo * 8, hi * 8))
                   for lo, hi in vs.ds.split_rows(rows, n))

    whole = worst(1)
    assert worst(2) < 0.7 * whole and worst(5) < worst(3) < worst(2)
    options = vs.DecodeOptions()
    budget = 2 * worst(3)  # target = budget / 2: three bands fit, two do not
    assert vs._choose_bands(stack, 90, 160, 1, 4, options, budget) == 3
    assert whole > vs.BAND_CACHE_BYTES  # this frame's whole cache is above the fixed target: bands even with
    assert vs._choose_bands(stack, 90, 160, 1, 4, options, 10 * whole) > 1  # all the memory in the world
    narrow = worst(1, width=16)  # a frame whose whole cache fits the target stays whole
    assert narrow <= vs.BAND_CACHE_BYTES and vs._choose_bands(stack, 90, 16, 1, 4, options, 10 * whole) == 1
    assert vs._choose_bands(stack, 90, 160, 1, 4, options, 1) == 90 // vs.MIN_BAND_ROWS
    assert vs._choose_bands(stack, 90, 160, 1, 4, vs.DecodeOptions(bands=7), 1) == 7
    # a small frame never takes the band path at auto
    z = _latent((1, 16, 2, 2 * vs.MIN_BAND_ROWS - 1, 3), seed=5)
    assert vs.decode(wan_vae, z, vs.DecodeOptions(budget_bytes=1)).path == "wan causal slices"


@pytest.mark.parametrize("bands", [2, 3])
def test_wan22_decoder_in_row_bands_equals_host_decode(comfy_host, bands):
    """Wan 2.2's decoder (Up_ResidualBlock stages with their own temporal upsampling, first_chunk, a
    12-channel head and unpatchify) in row bands gives the host's ``WanVAE.decode`` frames."""
    import types

    from comfy.ldm.wan.vae2_2 import WanVAE

    from harness import fixtures

    vs = _slicing()
    model = fixtures.seeded_init_(WanVAE(dim=8, dec_dim=16, z_dim=8), seed=22, std=0.1).eval()
    runner = vs.WanCausalDecoder(model)
    z = _latent((1, 8, 4, 11, 6), seed=13)
    vae = types.SimpleNamespace(vae_dtype=torch.float32, device=torch.device("cpu"), output_device=torch.device("cpu"),
                                process_output=lambda x: x)
    with torch.inference_mode():
        ref = model.decode(z)
        result = vs._decode_wan_bands(vae, z, vs.DecodeOptions(bands=bands), runner, 2**30, None, 1, ref.shape[2],
                                      torch.float32)
    assert result is not None and result.path == "wan causal row bands"
    got = result.images.reshape(1, *ref.shape[2:], ref.shape[1]).movedim(-1, 1)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_interrupt_during_the_middle_pass_restores_the_decoder(wan_vae, monkeypatch):
    """The band path swaps the decoder's upsample stack for a capture while it runs the middle blocks; an
    interrupt there leaves the decoder as it was."""
    import comfy.model_management as mm

    vs = _slicing()
    decoder = wan_vae.first_stage_model.decoder
    before = (decoder.upsamples, decoder.head)
    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise mm.InterruptProcessingException()

    monkeypatch.setattr(vs.compat, "throw_if_interrupted", interrupt)
    with pytest.raises(mm.InterruptProcessingException):
        vs.decode(wan_vae, _latent((1, 16, 3, 8, 4), seed=2), vs.DecodeOptions(bands=2))
    assert (decoder.upsamples, decoder.head) == before
