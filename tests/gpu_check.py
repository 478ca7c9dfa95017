"""``make gpu-check``: one self-contained check of the pack on a CUDA machine, compared with ``make memplan``'s trace.

On one GPU (budget: <= 8 minutes on an H200, model builds included):

* random-weight, full-size Wan 2.1 1.3B from ComfyUI's own classes at 832x480x33, ``--steps`` (12) Euler steps
  through the host's own KSampler code (``nodes.common_ksampler``) for: KSampler, EasyCache (the host node),
  LightCache Model Patch with ``cache_device`` gpu / cpu / auto, Chunked Model Patch (auto and count 4), and
  LightCache cpu + Chunked Model Patch; peak ``torch.cuda.max_memory_allocated`` (and reserved) and wall time;
* one block of Wan 2.1 14B at its real width (a one-layer WanModel, dim 5120) at 832x480x81 and 1280x720x81;
* Wan 2.1 VAE: VAE Decode, VAE Decode (Tiled) and Sliced VAE Decode of an 832x480x33 latent;
* stream overlap: every ``CacheStore`` made during the run measures its prefetch waits
  (``StoreConfig.measure_waits``), and the store counters are reported per configuration;
* the CUDA unit tests (``tests/core/test_cache_store_cuda.py``);
* the same configurations traced by memplan (fake tensors, same sizes, a pretend device of this GPU's size)
  next to each measurement.

Writes ``out/gpu_check/gpu_check.json`` and ``gpu_check.md``. ``--dry`` runs the same script at tiny size on the
CPU (tiny fixture models; peaks from the CPU allocator's own counters; the CUDA tests skip): CI runs that.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness import corelink  # noqa: E402,F401

BUDGET_S = 480


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and models of one run (full on a GPU, tiny with --dry)."""

    dit: str
    size: tuple
    block: str
    block_sizes: tuple
    vae: str
    vae_size: tuple
    steps: int


FULL = Plan(dit="WAN_1_3B", size=(832, 480, 33), block="WAN_14B_ONE_BLOCK", block_sizes=((832, 480, 81), (1280, 720, 81)),
            vae="WAN_VAE", vae_size=(832, 480, 33), steps=12)
DRY = Plan(dit="WAN_TINY", size=(128, 128, 9), block="WAN_TINY_ONE_BLOCK", block_sizes=((128, 128, 9),),
           vae="WAN_VAE_TINY", vae_size=(96, 64, 9), steps=10)


def _specs():
    from memplan import drive

    drive.WAN_14B_ONE_BLOCK = dataclasses.replace(drive.WAN_14B, name="Wan 2.1 T2V 14B, one block",
                                                  params=dict(dim=5120, ffn_dim=13824, num_layers=1))
    drive.WAN_TINY_ONE_BLOCK = dataclasses.replace(drive.WAN_TINY, name="tiny Wan, one block (dim 256)",
                                                   params=dict(dim=256, ffn_dim=512, num_layers=1))


def seeded_init(module, seed: int) -> None:
    """Random weights on the module's own device (norm scales 1), fast for a full-size model on a GPU."""
    import torch

    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if (any(t in name for t in ("norm", "gamma", "scale")) and p.dim() <= 1) or leaf == "gamma":
                p.fill_(1.0)
            elif p.dim() >= 2:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, min(0.08, 1.0 / math.sqrt(max(fan_in, 1))), generator=gen)
            else:
                p.normal_(0.0, 0.005, generator=gen)


# ---------------------------------------------------------------- measuring

class Probe:
    """Wall time and peak memory of a region: CUDA allocator peaks on a GPU, the CPU allocator's own count
    (profiler memory events) on the CPU."""

    def __init__(self, device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def __enter__(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.reserved_before = torch.cuda.memory_reserved(self.device)
        else:
            from memplan.validate import AllocatorPeak

            self.before = 0
            self._cpu = AllocatorPeak()
            self._cpu.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated(self.device)
            self.peak_reserved = torch.cuda.max_memory_reserved(self.device)
            self.above_start = self.peak - self.before
        else:
            self._cpu.stop()
            self.above_start = self._cpu.peak
            self.peak = None
            self.peak_reserved = None


@contextlib.contextmanager
def measured_stores():
    """Every CacheStore made inside measures its prefetch waits; yields the list of stores.

    The pack's nodes use the ``lightcache_core`` inside the pack (``<pack>.lightcache_core``), a different
    module object from the one tests import, so every loaded copy is patched."""
    stores = []
    patched = []
    for name, module in list(sys.modules.items()):
        cls = getattr(module, "CacheStore", None) if name.endswith("lightcache_core.cache_store") else None
        if cls is None:
            continue
        original = cls.__init__

        def init(self, compute_device, config=None, _original=original, _module=module, **kwargs):
            config = _module.StoreConfig() if config is None else config
            _original(self, compute_device, dataclasses.replace(config, measure_waits=True), **kwargs)
            stores.append(self)

        cls.__init__ = init
        patched.append((cls, original))
    try:
        yield stores
    finally:
        for cls, original in patched:
            cls.__init__ = original


def _store_stats(stores) -> dict:
    keys = ("puts", "prefetches", "late_prefetches", "prefetch_wait_s", "bytes_to_host", "bytes_to_device",
            "peak_device_bytes", "pinned_host_bytes", "pageable_fallbacks")
    total = {k: 0 for k in keys}
    for s in stores:
        st = s.stats.as_dict()
        for k in keys:
            total[k] = max(total[k], st[k]) if k == "peak_device_bytes" else total[k] + st[k]
    total["stores"] = len(stores)
    return total


# ---------------------------------------------------------------- the phases

SAMPLER_CONFIGS = ["KSampler", "EasyCache", "LightCache cache_device gpu", "LightCache cache_device cpu",
                   "LightCache cache_device auto", "KSampler + Chunked Model Patch (auto)",
                   "KSampler + Chunked Model Patch (count 4)", "LightCache cpu + Chunked Model Patch (count 4)"]


def _patched(config: str, base):
    from memplan import drive

    if config == "KSampler":
        return base
    if config == "EasyCache":
        return drive.easycache(base)
    if config.startswith("LightCache cache_device"):
        return drive.lightcache(base, config.rsplit(" ", 1)[1])
    if config == "KSampler + Chunked Model Patch (auto)":
        return drive.chunked(base, "auto")
    if config == "KSampler + Chunked Model Patch (count 4)":
        return drive.chunked(base, "count", 4)
    if config == "LightCache cpu + Chunked Model Patch (count 4)":
        return drive.lightcache(drive.chunked(base, "count", 4), "cpu")
    raise ValueError(config)


def sampler_phase(plan: Plan, device, dtype, rows: list) -> None:
    import importlib

    import torch

    from memplan import drive

    spec = getattr(drive, plan.dit)
    t0 = time.perf_counter()
    base, weights = drive.build_model(spec, device, dtype, init=lambda m: seeded_init(m, 1))
    build_s = time.perf_counter() - t0
    host_nodes = importlib.import_module("nodes")
    positive, negative = drive.text_conds(spec, device)
    latent = {"samples": torch.zeros(spec.latent_shape(*plan.size))}
    size = "x".join(map(str, plan.size))
    for i, config in enumerate(SAMPLER_CONFIGS):
        row = {"phase": "sampler", "model": spec.name, "size": size, "config": config, "steps": plan.steps,
               "weights_bytes": weights, "build_seconds": round(build_s, 1) if i == 0 else None}
        try:
            with measured_stores() as stores:
                model = _patched(config, base)
                with Probe(device) as probe:
                    out = host_nodes.common_ksampler(model, 0, plan.steps, spec.cfg, "euler", "simple", positive,
                                                     negative, latent)
                del out
            row.update(_probe_fields(probe))
            if stores:
                row["store"] = _store_stats(stores)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
            row["traceback"] = traceback.format_exc()[-2000:]
        rows.append(row)
        drive.collect()
    del base
    _unload()


def block_phase(plan: Plan, device, dtype, rows: list) -> None:
    from memplan import drive

    spec = getattr(drive, plan.block)
    base, weights = drive.build_model(spec, device, dtype, init=lambda m: seeded_init(m, 2))
    for size in plan.block_sizes:
        row = {"phase": "block", "model": spec.name, "size": "x".join(map(str, size)), "config": "KSampler",
               "weights_bytes": weights, "steps": 1}
        try:
            probe = Probe(device)
            drive.sample(base, spec, spec.latent_shape(*size), device, evaluations=1,
                         on_region=lambda e: probe.__enter__() if e == "start" else probe.__exit__())
            row.update(_probe_fields(probe))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(row)
        drive.collect()
    del base
    _unload()


def decode_phase(plan: Plan, device, dtype, rows: list) -> None:
    import torch

    from memplan import drive

    spec = getattr(drive, plan.vae)
    vae, weights = drive.build_vae(spec, device, dtype, init=lambda m: seeded_init(m, 3))
    gen = torch.Generator().manual_seed(4)
    latent = torch.randn(spec.latent(*plan.vae_size), generator=gen)
    outputs = {}
    for config in drive.DECODES:
        row = {"phase": "decode", "model": spec.name, "size": "x".join(map(str, plan.vae_size)), "config": config,
               "weights_bytes": weights}
        try:
            with Probe(device) as probe:
                image = drive.decode(config, vae, latent)
            row.update(_probe_fields(probe))
            outputs[config] = image.float().cpu()
            if config != "VAE Decode" and "VAE Decode" in outputs:
                row["max_abs_vs_vae_decode"] = float((outputs[config] - outputs["VAE Decode"]).abs().max())
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"[:400]
        rows.append(row)
        drive.collect()
    _unload()


def _probe_fields(probe: Probe) -> dict:
    fields = {"seconds": round(probe.seconds, 3), "peak_above_start_bytes": int(probe.above_start)}
    if probe.peak is not None:
        fields.update(peak_bytes=int(probe.peak), peak_reserved_bytes=int(probe.peak_reserved),
                      reserved_growth_bytes=int(probe.peak_reserved - probe.reserved_before))
    return fields


def _unload() -> None:
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


def trace_phase(plan: Plan, device_bytes: int | None, rows: list) -> None:
    """memplan's trace of the same configurations, attached to the measured rows."""
    from memplan import run

    traced = {}
    jobs = [(plan.dit, plan.size, "sampler"), *((plan.block, s, "block") for s in plan.block_sizes),
            (plan.vae, plan.vae_size, "decode")]
    for name, size, kind in jobs:
        try:
            if kind == "decode":
                recs = run.trace_vae(name, *size, device_bytes)
            else:
                recs = run.trace_dit(name, *size, device_bytes, configs=None if kind == "sampler" else ["KSampler"])
        except Exception as exc:  # noqa: BLE001
            recs = [{"config": "*", "error": f"{type(exc).__name__}: {exc}"[:300]}]
        for r in recs:
            traced[(kind, "x".join(map(str, size)), r["config"])] = r
    for row in rows:
        t = traced.get((row["phase"], row["size"], row["config"]))
        if t is None:
            continue
        if "error" in t:
            row["trace_error"] = t["error"]
            continue
        row["traced_peak_bytes"] = t["peak_bytes"]
        row["traced_peak_above_start_bytes"] = t.get("peak_above_start_bytes")
        if row.get("peak_bytes"):
            row["measured_vs_traced"] = round(row["peak_bytes"] / t["peak_bytes"], 4)
        if row.get("peak_above_start_bytes") and t.get("peak_above_start_bytes"):
            row["measured_vs_traced_above_start"] = round(row["peak_above_start_bytes"] / t["peak_above_start_bytes"], 4)


def cuda_tests(dry: bool) -> dict:
    """The CUDA unit tests, in a child pytest (they skip without a GPU)."""
    cmd = [sys.executable, "-m", "pytest", str(TESTS / "core" / "test_cache_store_cuda.py"), "-q", "-rs", "-p",
           "no:cacheprovider"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(TESTS), timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"returncode": proc.returncode, "summary": lines[-1] if lines else "", "seconds": round(time.perf_counter() - t0, 1),
            "output_tail": "\n".join(lines[-25:]), "expected_to_skip": dry}


# ---------------------------------------------------------------- report

def _gib(n) -> str:
    return "–" if n is None else (f"{n / 2**30:.2f}" if abs(n) >= 2**30 / 10 else f"{n / 2**20:.1f} Mi")


def markdown(payload: dict) -> str:
    dry = payload["dry"]
    unit = "GiB (Mi = MiB)"
    head = ("## make gpu-check DRY=1 (tiny models on the CPU; peaks = CPU allocator, above the region's start)" if dry else
            f"## make gpu-check on {payload['machine']['cuda']}")
    lines = [head, "", f"host ComfyUI {payload['host']}; {payload['seconds']:.0f} s in all; sizes in {unit}", "",
             "| phase | model | size | configuration | time s | peak | peak above start | traced peak above start | measured / traced | reserved growth | store: prefetches / late / wait s | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        store = r.get("store")
        store_text = (f"{store['prefetches']} / {store['late_prefetches']} / {store['prefetch_wait_s']:.4f}"
                      if store else "")
        ratio = r.get("measured_vs_traced_above_start")
        note = r.get("error") or r.get("trace_error") or ""
        if "max_abs_vs_vae_decode" in r:
            note = (note + f" max|diff| vs VAE Decode {r['max_abs_vs_vae_decode']:.2e}").strip()
        lines.append(f"| {r['phase']} | {r['model']} | {r['size']} | {r['config']} | {r.get('seconds', '–')} | "
                     f"{_gib(r.get('peak_bytes'))} | {_gib(r.get('peak_above_start_bytes'))} | "
                     f"{_gib(r.get('traced_peak_above_start_bytes'))} | {'–' if ratio is None else f'{ratio:.3f}'} | "
                     f"{_gib(r.get('reserved_growth_bytes'))} | {store_text} | {note} |")
    t = payload.get("cuda_tests", {})
    lines += ["", f"CUDA unit tests (tests/core/test_cache_store_cuda.py): {t.get('summary', 'not run')}"]
    if dry:
        lines += ["", "On the CPU the decode rows measure more than the trace: PyTorch's CPU convolutions unfold their "
                  "input inside the kernel, which no trace sees (`make memplan`'s validation models that buffer and "
                  "then agrees). Store counters show no prefetches on a CPU compute device (host is the device)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny models on the CPU (what CI runs)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--skip", action="append", default=[], help="phase to skip: sampler, block, decode, trace, tests")
    opts = parser.parse_args(argv)
    started = time.perf_counter()
    plan = DRY if opts.dry else FULL
    if opts.steps:
        plan = dataclasses.replace(plan, steps=opts.steps)
    out = opts.out or REPO / "out" / ("gpu_check_dry" if opts.dry else "gpu_check")

    import torch

    if not opts.dry and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here. Run `make gpu-check` on a GPU machine, or `make gpu-check DRY=1` for "
              "the same script at tiny size on the CPU.")
        return 2
    from harness import host
    from memplan import run as memplan

    memplan.boot_host(cpu=opts.dry)
    _specs()
    device = torch.device("cpu") if opts.dry else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if opts.dry else torch.bfloat16
    device_bytes = None if opts.dry else torch.cuda.get_device_properties(device).total_memory
    rows: list = []
    skip = set(opts.skip)
    with torch.inference_mode():
        for name, phase in (("sampler", sampler_phase), ("block", block_phase), ("decode", decode_phase)):
            if name in skip:
                continue
            try:
                phase(plan, device, dtype, rows)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory building a model: report, go on
                rows.append({"phase": name, "model": "-", "size": "-", "config": "(phase setup)",
                             "error": f"{type(exc).__name__}: {exc}"[:400], "traceback": traceback.format_exc()[-2000:]})
                _unload()
    if "trace" not in skip:
        trace_phase(plan, device_bytes, rows)
    tests = cuda_tests(opts.dry) if "tests" not in skip else {"summary": "skipped (--skip tests)"}
    payload = {"dry": opts.dry, "host": memplan.host_label(), "plan": dataclasses.asdict(plan),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                           "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                           "device_bytes": device_bytes},
               "rows": rows, "cuda_tests": tests, "seconds": time.perf_counter() - started,
               "budget_seconds": BUDGET_S}
    text = markdown(payload)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str))
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    print(f"\n[gpu-check] {len(rows)} rows in {payload['seconds']:.0f} s -> {out}")
    failed = [r for r in rows if "error" in r]
    if not opts.dry and payload["seconds"] > BUDGET_S:
        print(f"[gpu-check] WARNING: took {payload['seconds']:.0f} s, over the {BUDGET_S} s budget")
    if tests.get("returncode") not in (None, 0, 5):
        failed.append({"config": "cuda tests"})
    del host
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
