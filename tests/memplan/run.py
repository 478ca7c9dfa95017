"""``make memplan``: peak device memory at real size, from a fake-tensor trace of ComfyUI's own code.

No GPU runs: every model is built by the host's own classes with fake weights on
a pretend CUDA device (``drive.fake_gpu``), and the real forward / decode code runs
on fake tensors while ``tracker.LiveBytes`` counts the live device bytes.

* KSampler, EasyCache and Chunked Model Patch rows are traces of two model
  evaluations through a real ``CFGGuider`` (EasyCache's own wrappers run: its
  first two evaluations read nothing back from the device).
* LightCache rows are the KSampler (or chunked) trace with the cache's device
  bytes allocated for the whole run, as ``accounting.cache_footprint`` gets them
  from the real ``CacheStore`` placement logic fed with the entries the engine
  stores (the engine's decisions need ``.item()``, which fake tensors cannot serve).
* Decode rows are traces of the host's VAE Decode / VAE Decode (Tiled) nodes and
  this pack's Sliced VAE Decode on a real ``comfy.sd.VAE``.

Writes ``out/memplan.json`` (records ``{model, size, config, peak_bytes, weights_bytes, ...}``)
and prints one table. ``--only WORD`` limits the cases; ``--validate`` adds the
tiny-size CPU validation (``validate.py``); ``--device-gib`` sets the pretend GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from harness import corelink  # noqa: E402,F401

DEFAULT_OUT = REPO / "out" / "memplan.json"
DEVICE_GIB = 141  # the H200 `make gpu-check` runs on (ComfyUI's CFG batching and `auto` modes read free memory)

DIT_CASES = [("WAN_14B", 1280, 720, 81), ("WAN_14B", 832, 480, 81), ("WAN_1_3B", 832, 480, 81), ("HUNYUAN", 1280, 720, 129)]
VAE_CASES = [("WAN_VAE", 1280, 720, 81), ("WAN_VAE", 832, 480, 81), ("SVD_VAE", 1024, 576, 25)]
CHUNK_COUNT = 4  # the Chunked Model Patch node's `chunks` default
# Sliced VAE Decode sizes itself from free memory (half of it): on a 141 GiB device nothing needs splitting,
# so one row shows the same node with an explicit working-memory budget.
SLICED_BUDGET = "Sliced VAE Decode (budget_mb 1024)"

KSAMPLER = "KSampler"
# Chunked Model Patch at `auto` on cards smaller than the traced device: its planner reads the free memory such a
# card has while the sampler runs (``card_free_bytes``); the model code, its weights on the traced device and
# ComfyUI's CFG batching stay those of the traced device, so the rows compare with the KSampler row.
CARDS = {"24 GB card": 24, "80 GB card": 80}
AUTO_CARD_CONFIGS = [f"KSampler + Chunked Model Patch (auto, {card})" for card in CARDS]
DIT_CONFIGS = [KSAMPLER, "EasyCache", "LightCache cache_device gpu", "LightCache cache_device cpu",
               "LightCache cache_device auto", "KSampler + Chunked Model Patch (auto)", *AUTO_CARD_CONFIGS,
               f"KSampler + Chunked Model Patch (count {CHUNK_COUNT})",
               f"LightCache cpu + Chunked Model Patch (count {CHUNK_COUNT})"]
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context and the allocator hold before any tensor (not traced)


def card_free_bytes(patcher, latent_shape: tuple, card_gib: float, weights_bytes: int) -> tuple[int, str]:
    """Free device bytes while sampling on a ``card_gib`` card, and how they were reached.

    ComfyUI (``sampler_helpers.prepare_sampling`` -> ``load_models_gpu``) keeps its own estimate of one
    evaluation's activations (``BaseModel.memory_required`` of a batch of one) plus its inference reserve free,
    and loads as much of the weights as fits in the rest (the others stream from the host); a card that holds
    every weight has what the weights leave.
    """
    import comfy.model_management as mm

    from memplan.drive import GiB

    card = int(card_gib * GiB) - int(CUDA_CONTEXT_GIB * GiB)
    estimate = int(patcher.model.memory_required([1] + list(latent_shape[1:])))
    keep_free = estimate + int(mm.minimum_inference_memory()) + int(mm.extra_reserved_memory())
    resident = max(0, min(int(weights_bytes), card - keep_free))
    free = card - resident
    how = (f"{card_gib:g} GB card: {free / GiB:.1f} GiB free while sampling ({resident / GiB:.1f} GiB of weights "
           f"resident, ComfyUI's estimate {estimate / GiB:.1f} GiB + reserve; CFG batching as traced)")
    return free, how


def boot_host(cpu: bool = True):
    """Boot ComfyUI (``LIGHTCACHE_HOST`` picks which) with PyTorch attention, as on an NVIDIA machine.

    cpu: boot with ``--cpu`` (traces and dry runs); ``make gpu-check`` passes False to use the GPU."""
    from harness import host

    path = host.comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    use_overlay = getattr(host, "use_overlay", None)
    if callable(use_overlay):
        use_overlay()
    from comfy.cli_args import args

    args.use_pytorch_cross_attention = True  # ComfyUI's attention on NVIDIA: PyTorch SDPA
    return host.boot(Path(os.environ.get("LIGHTCACHE_MODELS_DIR", host.CACHE / "models")), cpu=cpu)


def host_label() -> str:
    from harness import host

    name = getattr(host, "host_name", None)
    return name() if callable(name) else "0.3.75"


# ---------------------------------------------------------------- DiT traces

def trace_dit(spec_name: str, width: int, height: int, frames: int, device_bytes: int | None,
              configs: list[str] | None = None) -> list[dict]:
    """Rows for one DiT at one size (see the module docstring for what is traced and what is accounted).

    ``device_bytes`` None traces on the (fake) CPU instead of a pretend GPU, in float32, the way a CPU run of
    the same code behaves (``make gpu-check DRY=1`` compares with that): cache entries placed on the host are
    then device memory too.
    """
    import torch

    from memplan import drive
    from memplan.accounting import cache_footprint, lightcache_entries
    from memplan.tracker import LiveBytes

    spec = getattr(drive, spec_name)
    size = f"{width}x{height}x{frames}"
    latent = spec.latent_shape(width, height, frames)
    configs = configs or DIT_CONFIGS
    gpu = device_bytes is not None
    tracker = LiveBytes("cuda" if gpu else "cpu")
    chunk_count = f"KSampler + Chunked Model Patch (count {CHUNK_COUNT})"
    dtype = torch.bfloat16 if gpu else torch.float32
    with drive.fake_device(tracker, device_bytes) as dev:
        with tracker.phase("weights"):
            patcher, weights = drive.build_model(spec, dev, dtype)
        base = tracker.current
        calls = {"n": 0}
        hook = patcher.model.diffusion_model.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))

        def run(p, evaluations: int) -> dict:
            """Peak over ``evaluations`` model evaluations (the last one is the steady state)."""
            drive.collect()
            calls["n"] = 0
            start = {}

            def region(event):
                if event == "start":
                    tracker.reset_peak()
                    start["bytes"] = tracker.current

            t0 = time.perf_counter()
            drive.sample(p, spec, latent, dev, evaluations=evaluations, on_region=region)
            drive.collect()
            return {"peak": tracker.peak, "dominant": tracker.dominant(3), "calls": calls["n"] // evaluations,
                    "seconds": time.perf_counter() - t0, "leaked": tracker.current - base, "start": start["bytes"]}

        traces = {KSAMPLER: run(patcher, 1)}
        wanted = set(configs)
        if "EasyCache" in wanted:  # its diffs of the first evaluation are live during the second
            traces["EasyCache"] = run(drive.easycache(patcher), 2)
        if "KSampler + Chunked Model Patch (auto)" in wanted:
            traces["KSampler + Chunked Model Patch (auto)"] = run(drive.chunked(patcher, "auto", CHUNK_COUNT), 1)
        for card, gib in CARDS.items():
            config = f"KSampler + Chunked Model Patch (auto, {card})"
            if config in wanted and gpu:
                free, how = card_free_bytes(patcher, latent, gib, weights)

                def card_free(device, free=free):  # less what the run holds above the weights
                    return max(free - max(tracker.current - base, 0), 0)

                traces[config] = run(drive.chunked(patcher, "auto", CHUNK_COUNT, free_memory=card_free), 1)
                traces[config]["free_memory"] = how
        if any("count" in c for c in wanted):
            traces[chunk_count] = run(drive.chunked(patcher, "count", CHUNK_COUNT), 1)
        hook.remove()
    ks = traces[KSAMPLER]
    branches = 2 if spec.cfg != 1.0 else 1
    tokens = spec.tokens(width, height, frames)
    if spec.family == "hunyuan_video":  # the cached range is in the single blocks: image and text tokens
        tokens += spec.text_tokens
    dim = spec.params.get("dim") or spec.params["hidden_size"]
    entries, working = lightcache_entries("mix", (1,) + tuple(latent[1:]), (1, tokens, dim), branches, model_dtype=dtype)
    free_at_store = max(device_bytes - ks["peak"], 0) if gpu else None  # the device's free memory at the step's peak
    footprints = {cd: cache_footprint(entries, cd, free_bytes=free_at_store, working=working)
                  for cd in ("gpu", "cpu", "auto")}
    records: list[dict] = []
    for config in configs:
        fp = None
        if config.startswith("LightCache cache_device"):
            t, fp = ks, footprints[config.rsplit(" ", 1)[1]]
        elif config.startswith("LightCache cpu + Chunked"):
            t, fp = traces[chunk_count], footprints["cpu"]
        elif config not in traces:  # a card row on the CPU (no card to model)
            continue
        else:
            t = traces[config]
        rec = {"model": spec.name, "size": size, "config": config, "peak_bytes": int(t["peak"]),
               "weights_bytes": int(weights), "kind": "sampler", "method": "trace",
               "model_calls_per_evaluation": t["calls"], "dominant": _dominant_text(t["dominant"]),
               "trace_seconds": round(t["seconds"], 2)}
        if fp is not None and not gpu:  # on a CPU compute device the host is the device
            fp.resident += fp.host
            fp.host = 0
            fp.prefetch_by_kind = {}
        if fp is not None:
            # The traced computed evaluation, plus the cache's resident bytes for the whole run and the
            # engine's working set (held from the first to the last cached block, i.e. across the block
            # where the step's peak is). A reuse evaluation holds no working set but brings host entries
            # back (prefetch): bounded by the same activations plus the resident cache plus that copy.
            compute = t["peak"] + fp.resident + fp.working
            reuse = t["peak"] + fp.resident + fp.transient
            rec.update(method="trace + CacheStore accounting", peak_bytes=int(max(compute, reuse)),
                       cache_resident_bytes=fp.resident, cache_host_bytes=fp.host, engine_working_bytes=fp.working,
                       reuse_transient_bytes=fp.transient, computed_evaluation_bytes=int(compute),
                       reuse_evaluation_bound_bytes=int(reuse),
                       placements=[f"{k}: {r} ({why})" for k, r, why in fp.placements])
            extra = [f"cache on device {drive.fmt_bytes(fp.resident)}"] if fp.resident else []
            if fp.working:
                extra.append(f"engine block input {drive.fmt_bytes(fp.working)}")
            if reuse > compute:
                extra.append(f"reuse evaluation prefetch {drive.fmt_bytes(fp.transient)}")
            rec["dominant"] = "; ".join([rec["dominant"]] + extra)
        rec["activation_bytes"] = rec["peak_bytes"] - rec["weights_bytes"]
        rec["peak_above_start_bytes"] = rec["peak_bytes"] - t["start"]
        if t.get("free_memory"):
            rec["planner_free_memory"] = t["free_memory"]
        if t["leaked"]:
            rec["note"] = f"{drive.fmt_bytes(t['leaked'])} still live after the run"
        records.append(rec)
    return records


def _allocate(tracker, device, items):
    import torch

    kept = []
    for label, nbytes in items:
        if nbytes > 0:
            with tracker.phase(label):
                kept.append(torch.empty(int(nbytes), dtype=torch.uint8, device=device))
    return kept


def _dominant_text(dominant) -> str:
    from memplan.drive import fmt_bytes

    return ", ".join(f"{label} {fmt_bytes(n)}" for label, n in dominant)


# ---------------------------------------------------------------- decode traces

def trace_vae(spec_name: str, width: int, height: int, frames: int, device_bytes: int | None) -> list[dict]:
    """Rows for one VAE's decodes at one size (``device_bytes`` None: on the fake CPU, float32)."""
    import torch

    from memplan import drive
    from memplan.tracker import LiveBytes

    spec = getattr(drive, spec_name)
    size = f"{width}x{height}x{frames}"
    gpu = device_bytes is not None
    tracker = LiveBytes("cuda" if gpu else "cpu")
    records = []
    with drive.fake_device(tracker, device_bytes) as dev:
        with tracker.phase("weights"):
            vae, weights = drive.build_vae(spec, dev, torch.bfloat16 if gpu else torch.float32, fake=True)
        configs = list(drive.DECODES) + ([SLICED_BUDGET] if (spec_name, width, height) == ("WAN_VAE", 1280, 720) else [])
        for config in configs:
            drive.collect()
            shape = spec.latent(width, height, frames)
            note = None
            if spec.family == "svd" and config == "VAE Decode (Tiled)":
                # tiled_scale decodes a 4-D batch one frame at a time (three tilings each): every frame has
                # the same device peak, and the output gathers on the CPU, so one frame is traced.
                shape = (1,) + tuple(shape[1:])
                note = f"traced frame 1 of {frames}: VAEDecodeTiled decodes frame by frame (same device peak per frame)"
            latent = torch.empty(shape)  # latents wait on the CPU between nodes
            tracker.reset_peak()
            start = tracker.current
            t0 = time.perf_counter()
            image = drive.decode(config, vae, latent)
            seconds = time.perf_counter() - t0
            del image, latent
            drive.collect()
            rec = {"model": spec.name, "size": size, "config": config, "peak_bytes": int(tracker.peak),
                   "weights_bytes": int(weights), "activation_bytes": int(tracker.peak - weights),
                   "kind": "decode", "method": "trace", "dominant": _dominant_text(tracker.dominant(3)),
                   "trace_seconds": round(seconds, 2), "peak_above_start_bytes": int(tracker.peak - start)}
            if note:
                rec["note"] = note
            records.append(rec)
    return records


# ---------------------------------------------------------------- table

def ratios(records: list[dict]) -> None:
    base = {}
    for r in records:
        if r["config"] in (KSAMPLER, "VAE Decode"):
            base[(r["model"], r["size"])] = r
    for r in records:
        b = base.get((r["model"], r["size"]))
        if b is not None:
            r["ratio_vs_baseline"] = round(r["peak_bytes"] / b["peak_bytes"], 4)
            act = b["peak_bytes"] - b["weights_bytes"]
            if act > 0:
                r["activation_ratio_vs_baseline"] = round((r["peak_bytes"] - r["weights_bytes"]) / act, 4)


def table(records: list[dict], device_gib: float, host: str) -> str:
    from memplan.drive import GiB

    lines = [f"## Peak device memory at real size — TRACED, no GPU ran (fake tensors on a pretend {device_gib:g} GiB "
             f"CUDA device, ComfyUI {host}, bf16 weights, PyTorch SDPA flash/efficient attention)",
             "",
             "| model | size | configuration | peak GiB | weights GiB | activations GiB | vs baseline | activations vs baseline | what dominates the peak (besides weights) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        ratio = r.get("ratio_vs_baseline")
        aratio = r.get("activation_ratio_vs_baseline")
        lines.append(f"| {r['model']} | {r['size']} | {r['config']} | {r['peak_bytes'] / GiB:.2f} | "
                     f"{r['weights_bytes'] / GiB:.2f} | {(r['peak_bytes'] - r['weights_bytes']) / GiB:.2f} | "
                     f"{'–' if ratio is None else f'{ratio:.3f}x'} | {'–' if aratio is None else f'{aratio:.3f}x'} | "
                     f"{r.get('dominant', '')} |")
    cards = [r for r in records if r.get("planner_free_memory")]
    if cards:
        lines += ["", "`auto` on a smaller card: the planner reads the free memory that card has while sampling "
                  "(the trace itself runs on the pretend device, with its CFG batching):"]
        lines += [f"- {r['model']} {r['size']}, {r['planner_free_memory']}" for r in cards]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device-gib", type=float, default=DEVICE_GIB)
    parser.add_argument("--out", type=Path, default=None, help="default out/memplan.json (0.3.75), "
                        "out/memplan-<host>.json for another host")
    parser.add_argument("--only", action="append", default=[], help="substring of a model or size to keep")
    parser.add_argument("--validate", action="store_true", help="also run the tiny-size CPU validation")
    parser.add_argument("--no-decode", action="store_true")
    opts = parser.parse_args(argv)
    started = time.perf_counter()
    boot_host()
    from memplan import drive

    device_bytes = int(opts.device_gib * drive.GiB)

    def keep(name, w, h, f):
        label = f"{getattr(drive, name).name} {w}x{h}x{f}"
        return not opts.only or any(o in label for o in opts.only)

    records: list[dict] = []
    for case in DIT_CASES:
        if keep(*case):
            print(f"[memplan] tracing {getattr(drive, case[0]).name} {case[1]}x{case[2]}x{case[3]} ...", flush=True)
            records += trace_dit(*case, device_bytes)
    if not opts.no_decode:
        for case in VAE_CASES:
            if keep(*case):
                print(f"[memplan] tracing {getattr(drive, case[0]).name} {case[1]}x{case[2]}x{case[3]} decodes ...", flush=True)
                records += trace_vae(*case, device_bytes)
    ratios(records)
    host = host_label()
    if opts.out is None:
        opts.out = DEFAULT_OUT if host == "0.3.75" else DEFAULT_OUT.with_name(f"memplan-{host}.json")
    text = table(records, opts.device_gib, host)
    payload = {"host": host, "device_gib": opts.device_gib, "traced": True,
               "note": "TRACE: fake tensors, no GPU ran; not measured", "records": records}
    if opts.validate:
        from memplan import validate

        payload["validation"] = validate.run_all()
        text += "\n\n" + validate.table(payload["validation"])
    print("\n" + text)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(payload, indent=2, default=str))
    (opts.out.with_suffix(".md")).write_text(text + "\n")
    print(f"\n[memplan] {len(records)} rows in {time.perf_counter() - started:.0f} s -> {opts.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
