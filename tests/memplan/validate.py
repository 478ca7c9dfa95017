"""Does the trace agree with a measurement? Tiny fixture models on the CPU, traced and run for real.

For each configuration the same code runs twice on the CPU, at a tiny size:

* **measured**: real tensors; the peak is the CPU allocator's own count of live bytes
  (``torch.profiler`` with ``profile_memory``: every allocation and free with the running
  total), above the total at the start of the measured region;
* **traced**: fake tensors counted by ``tracker.LiveBytes`` on the ``cpu`` device, the same
  region.

They agree within 10 % or the row says why not. Known reasons: kernels that allocate
scratch memory inside themselves (PyTorch's CPU 3-D convolution unfolds its input, about 27x,
for small layers; the trace cannot see it, so the row also gives the trace plus a model of
that buffer); LightCache rows compare the real engine's measured peak with the KSampler trace
plus ``accounting.cache_footprint`` (on a CPU compute device host entries are device memory).
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

TOLERANCE = 0.10
SIZE = (256, 256, 33)  # tiny Wan: latent 16x9x32x32, 2304 tokens
VAE_SIZE = (160, 96, 17)  # tiny Wan VAE: latent 16x5x12x20


# ---------------------------------------------------------------- measuring and tracing

class AllocatorPeak:
    """Peak of the CPU allocator's live bytes between ``start()`` and ``stop()`` (profiler memory events)."""

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
        self.peak = 0

    def start(self) -> None:
        self._prof.start()

    def stop(self) -> None:
        self._prof.stop()
        events = []

        def walk(nodes):
            for n in nodes:
                extra = n.extra_fields
                if type(extra).__name__ == "_ExtraFields_Allocation" and str(extra.device).startswith("cpu"):
                    events.append((n.start_time_ns, extra.total_allocated, extra.alloc_size))
                walk(n.children)

        walk(self._prof.profiler.kineto_results.experimental_event_tree())
        if not events:
            return
        events.sort()
        # The running total is process-wide (it does not restart with a profiling session): measure
        # from the total just before the region's first event.
        base = events[0][1] - events[0][2]
        self.peak = max(total for _, total, _ in events) - base


class ConvWorkspace(TorchDispatchMode):
    """Models the scratch buffers PyTorch's CPU convolutions allocate inside themselves.

    For each 2-D/3-D convolution that PyTorch would run by unfolding (asked of its own backend
    choice with a zero-stride probe of the input's shape), ``peak`` takes the live bytes at
    that moment plus the unfolded copy (``C_in * kernel volume * output positions`` elements per
    sample); for oneDNN convolutions, the live bytes plus copies of input and output in its blocked
    layout (an estimate: oneDNN may convolve in place in the plain layout).
    """

    def __init__(self, tracker) -> None:
        super().__init__()
        self.tracker = tracker
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        conv = None
        if func is torch.ops.aten.convolution.default:
            conv = (args[3], args[4], args[5], args[6], args[8])
        elif func in (torch.ops.aten.conv3d.default, torch.ops.aten.conv2d.default):
            # (input, weight, bias, stride, padding, dilation, groups)
            n = args[0].dim() - 2
            full = list(args) + [None] * (7 - len(args))
            conv = (full[3] or [1] * n, full[4] or [0] * n, full[5] or [1] * n, False, full[6] or 1)
        if conv is not None and args[0].dim() in (4, 5) and args[0].device.type == "cpu" and not isinstance(conv[1], str):
            x, w = args[0], args[1]
            stride, padding, dilation, transposed, groups = conv
            with _disable_current_modes():
                probe = torch.zeros(1, dtype=x.dtype).expand(x.shape)
                weight = torch.zeros(1, dtype=w.dtype).expand(w.shape)
                try:
                    backend = str(torch._C._select_conv_backend(probe, weight, None, stride, padding, dilation,
                                                                transposed, [0] * (x.dim() - 2), groups, None))
                except (RuntimeError, TypeError):
                    backend = ""
            scratch = 0
            if "Slow" in backend:  # im2col: the unfolded input
                scratch = w.shape[1] * math.prod(w.shape[2:]) * math.prod(out.shape[2:]) * x.shape[0] * x.element_size()
            elif "Mkldnn" in backend:  # oneDNN: input and output reordered into its blocked layout
                scratch = (x.numel() + out.numel()) * x.element_size()
            self.peak = max(self.peak, self.tracker.current + scratch)
        return out


def fake_cpu(tracker, extra_modes=()):
    from memplan import drive

    return drive.fake_device(tracker, None, extra_modes)


def _init(module: torch.nn.Module) -> None:
    from harness import fixtures

    fixtures.seeded_init_(module, 7)


# ---------------------------------------------------------------- the sampler rows

def _sampler_case(config: str):
    """``(patch(patcher) -> patcher, evaluations)`` for a sampler configuration."""
    from memplan import drive

    if config == "KSampler":
        return (lambda p: p), 1
    if config == "EasyCache":
        return drive.easycache, 2
    if config == "KSampler + Chunked Model Patch (count 4)":
        return (lambda p: drive.chunked(p, "count", 4)), 1
    if config.startswith("LightCache cache_device"):
        device = config.rsplit(" ", 1)[1]
        return (lambda p: drive.lightcache(p, device)), 2
    raise ValueError(config)


def _measure_sampler(config: str) -> int:
    from memplan import drive

    spec = drive.WAN_TINY
    patch, evaluations = _sampler_case(config)
    torch.manual_seed(0)
    patcher, _ = drive.build_model(spec, torch.device("cpu"), torch.float32, init=_init)
    probe = AllocatorPeak()
    with torch.inference_mode():  # as ComfyUI runs nodes
        drive.sample(patch(patcher), spec, spec.latent_shape(*SIZE), torch.device("cpu"), evaluations=evaluations,
                     on_region=lambda e: probe.start() if e == "start" else probe.stop())
    return probe.peak


def _trace_sampler(config: str) -> tuple[int, dict]:
    from memplan import drive
    from memplan.accounting import cache_footprint, lightcache_entries

    from .tracker import LiveBytes

    spec = drive.WAN_TINY
    base_config = "KSampler" if config.startswith("LightCache") else config
    patch, evaluations = _sampler_case(base_config)
    if config.startswith("LightCache"):
        evaluations = 2
    tracker = LiveBytes("cpu")
    start = {}
    with fake_cpu(tracker) as dev:
        patcher, _ = drive.build_model(spec, dev, torch.float32)

        def region(event):
            if event == "start":
                tracker.reset_peak()
                start["bytes"] = tracker.current

        drive.sample(patch(patcher), spec, spec.latent_shape(*SIZE), dev, evaluations=evaluations, on_region=region)
    traced = tracker.peak - start["bytes"]
    info: dict = {}
    if config.startswith("LightCache"):
        latent = spec.latent_shape(*SIZE)
        tokens = spec.tokens(*SIZE)
        entries, working = lightcache_entries("mix", (1,) + tuple(latent[1:]), (1, tokens, spec.params["dim"]), 2,
                                              model_dtype=torch.float32)
        fp = cache_footprint(entries, config.rsplit(" ", 1)[1], working=working)
        # On a CPU compute device the host is the device: every entry is CPU memory.
        info = {"ksampler_trace": traced, "cache_bytes": fp.resident + fp.host, "working_bytes": fp.working}
        traced += fp.resident + fp.host + fp.working
    return traced, info


# ---------------------------------------------------------------- the decode rows

def _measure_decode(config: str) -> int:
    from memplan import drive

    torch.manual_seed(0)
    vae, _ = drive.build_vae(drive.WAN_VAE_TINY, torch.device("cpu"), torch.float32, init=_init)
    latent = torch.randn(drive.WAN_VAE_TINY.latent(*VAE_SIZE))
    probe = AllocatorPeak()
    with torch.inference_mode():  # as ComfyUI runs nodes
        probe.start()
        image = drive.decode(config, vae, latent)
        probe.stop()
    del image
    return probe.peak


def _trace_decode(config: str) -> tuple[int, dict]:
    from memplan import drive

    from .tracker import LiveBytes

    tracker = LiveBytes("cpu")
    workspace = ConvWorkspace(tracker)
    with fake_cpu(tracker, extra_modes=(workspace,)) as dev:
        vae, _ = drive.build_vae(drive.WAN_VAE_TINY, dev, torch.float32, fake=True)
        latent = torch.empty(drive.WAN_VAE_TINY.latent(*VAE_SIZE))
        tracker.reset_peak()
        workspace.peak = 0
        start = tracker.current
        image = drive.decode(config, vae, latent)
        del image
    traced = tracker.peak - start
    return traced, {"with_cpu_conv_workspace": max(traced, workspace.peak - start)}


# ---------------------------------------------------------------- all rows

SAMPLER_CONFIGS = ["KSampler", "EasyCache", "KSampler + Chunked Model Patch (count 4)",
                   "LightCache cache_device cpu", "LightCache cache_device gpu"]


def run_all(decodes_only: bool = False) -> list[dict]:
    from memplan import drive

    rows = []
    for config in ([] if decodes_only else SAMPLER_CONFIGS):
        rows.append(_row(f"{drive.WAN_TINY.name} {'x'.join(map(str, SIZE))}", config, _measure_sampler, _trace_sampler))
    for config in drive.DECODES:
        rows.append(_row(f"{drive.WAN_VAE_TINY.name} {'x'.join(map(str, VAE_SIZE))}", config, _measure_decode,
                         _trace_decode))
    return rows


def _row(case: str, config: str, measure, trace) -> dict:
    row = {"case": case, "config": config}
    t0 = time.perf_counter()
    try:
        row["measured_bytes"] = int(measure(config))
    except Exception as exc:  # noqa: BLE001 - e.g. an engine mid-rewrite: report, do not hide the other rows
        row["error"] = f"measured run failed: {type(exc).__name__}: {exc}"[:300]
        return row
    traced, info = trace(config)
    row["traced_bytes"] = int(traced)
    row.update({k: int(v) for k, v in info.items()})
    row["difference"] = (row["traced_bytes"] - row["measured_bytes"]) / max(row["measured_bytes"], 1)
    row["within_tolerance"] = abs(row["difference"]) <= TOLERANCE
    if not row["within_tolerance"]:
        row["explanation"] = _explain(row)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _explain(row: dict) -> str:
    ws = row.get("with_cpu_conv_workspace")
    if ws is not None:
        d = (ws - row["measured_bytes"]) / max(row["measured_bytes"], 1)
        return (f"CPU 3-D convolutions unfold their input inside the kernel (no tensor the trace can see); with that "
                f"buffer modelled the trace reads {ws / 2**20:.1f} MiB ({d:+.1%} vs measured). On CUDA the "
                f"corresponding cuDNN workspace is allocated through the caching allocator and is not in the trace "
                f"either.")
    if "cache_bytes" in row:
        engine = row["measured_bytes"] - row["ksampler_trace"]
        listed = row["cache_bytes"] + row["working_bytes"]
        return ("LightCache: measured is the engine as loaded (this working tree); traced is the KSampler trace plus "
                f"accounting.lightcache_entries ({row['cache_bytes'] / 2**20:.2f} MiB entries + "
                f"{row['working_bytes'] / 2**20:.2f} MiB block input = {listed / 2**20:.2f} MiB), while the engine "
                f"added {engine / 2**20:.2f} MiB over the traced KSampler: the accounting lists "
                f"{'more' if listed > engine else 'less'} than this engine keeps. It describes the engine at the "
                "commit it was written against; point it at the engine's own description (see accounting.py).")
    return "not explained"


def table(rows: list[dict]) -> str:
    lines = ["## Validation at tiny size on the CPU: traced vs measured peak above the region's start "
             "(measured: the CPU allocator's live bytes via torch.profiler memory events)", "",
             "| case | configuration | measured MiB | traced MiB | difference | within 10 % | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['config']} | – | – | – | – | {r['error']} |")
            continue
        note = r.get("explanation", "")
        lines.append(f"| {r['case']} | {r['config']} | {r['measured_bytes'] / 2**20:.2f} | {r['traced_bytes'] / 2**20:.2f} | "
                     f"{r['difference']:+.1%} | {'yes' if r['within_tolerance'] else 'no'} | {note} |")
    return "\n".join(lines)
