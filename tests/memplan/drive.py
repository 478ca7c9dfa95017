"""Run ComfyUI's own model code the way a prompt does, on real or fake tensors.

Shared by ``make memplan`` (fake tensors, a fake GPU, full size), its CPU
validation (real tensors, tiny models) and ``make gpu-check`` (real tensors on a
GPU). Everything model-related is the host's code:

* models come from ComfyUI's own detection (``model_detection.model_config_from_unet``
  of a state dict built on the meta device) and its ``supported_models`` classes;
* sampling evaluations go through a real ``CFGGuider`` (conds via
  ``process_conds``, then ``sampling_function`` -> ``calc_cond_batch`` ->
  ``BaseModel.apply_model``), with the patcher's OUTER_SAMPLE wrappers run around
  them the way ``CFGGuider.sample`` runs them, so EasyCache's and LightCache's
  wrappers see the usual arguments. Only the k-diffusion loop is ours (an Euler
  update): ComfyUI's samplers read sigmas on the host, which fake tensors cannot;
* decodes are the host's ``VAEDecode`` / ``VAEDecodeTiled`` nodes and this pack's
  ``Sliced VAE Decode`` on a real ``comfy.sd.VAE`` object.

Under fake tensors (``fake_gpu``) ``model_management`` is told the device is a GPU
of a given size: free memory is that size minus what the trace holds live,
``load_models_gpu`` does nothing (weights are built on the device), and
attention counts as flash-capable (ComfyUI's CFG batching rule reads that).
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

GiB = 2**30


# ---------------------------------------------------------------- model specs

@dataclass(frozen=True)
class DiTSpec:
    """A diffusion transformer at its real size (built by ComfyUI's own classes)."""

    name: str
    family: str  # "wan" | "hunyuan_video"
    params: dict  # constructor arguments of the host's DiT class (checkpoint layout)
    cfg: float  # the workflow's CFG (HunyuanVideo: 1, guidance-distilled)
    text_tokens: int  # length of the text-encoder output the workflow feeds
    text_dim: int = 4096
    guidance: float | None = None  # HunyuanVideo's FluxGuidance value

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)

    def tokens(self, width: int, height: int, frames: int) -> int:
        _, _, t, h, w = self.latent_shape(width, height, frames)
        return t * (h // 2) * (w // 2)


WAN_14B = DiTSpec("Wan 2.1 T2V 14B", "wan", dict(dim=5120, ffn_dim=13824, num_layers=40), cfg=5.0, text_tokens=512)
WAN_1_3B = DiTSpec("Wan 2.1 T2V 1.3B", "wan", dict(dim=1536, ffn_dim=8960, num_layers=30), cfg=5.0, text_tokens=512)
HUNYUAN = DiTSpec("HunyuanVideo", "hunyuan_video",
                  dict(hidden_size=3072, depth=20, depth_single_blocks=40, context_in_dim=4096), cfg=1.0,
                  text_tokens=256, guidance=6.0)
WAN_TINY = DiTSpec("tiny Wan 2.1 (fixture)", "wan", dict(dim=128, ffn_dim=256, num_layers=2), cfg=5.0, text_tokens=64)


@dataclass(frozen=True)
class VAESpec:
    name: str
    family: str  # "wan" | "svd"
    dim: int = 96  # Wan VAE base width (96 = the released Wan 2.1 VAE)

    def latent(self, width: int, height: int, frames: int) -> tuple[int, ...]:
        if self.family == "wan":
            return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
        return (frames, 4, height // 8, width // 8)


WAN_VAE = VAESpec("Wan 2.1 VAE", "wan", 96)
SVD_VAE = VAESpec("SVD VAE (SD decoder, temporal)", "svd")
WAN_VAE_TINY = VAESpec("tiny Wan 2.1 VAE (fixture)", "wan", 16)


# ---------------------------------------------------------------- host access

def host_module(suffix: str):
    """A module of this pack as the host loaded it (``lightcache.nodes.<x>``)."""
    found = [m for n, m in sys.modules.items() if n.endswith(suffix) and not n.startswith("nodes")]
    if not found:
        raise RuntimeError(f"pack module *{suffix} is not loaded: boot the host first")
    return found[0]


def _dit_state_dict(spec: DiTSpec) -> dict:
    """The checkpoint layout of ``spec`` (meta tensors: shapes only) for ComfyUI's detection."""
    from harness import fixtures

    with torch.device("meta"):
        if spec.family == "wan":
            p = spec.params
            module = fixtures.build_wan21("t2v", dim=p["dim"], num_layers=p["num_layers"], ffn_dim=p["ffn_dim"])
        else:
            module = _build_hunyuan(spec.params)
    return module.state_dict()


def _build_hunyuan(p: dict) -> torch.nn.Module:
    from comfy.ldm.hunyuan_video.model import HunyuanVideo, HunyuanVideoParams

    import comfy.ops

    params = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=p["context_in_dim"],
                  hidden_size=p["hidden_size"], mlp_ratio=4.0, num_heads=p["hidden_size"] // 128, depth=p["depth"],
                  depth_single_blocks=p["depth_single_blocks"], axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2],
                  qkv_bias=True, guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
                  vision_in_dim=None, meanflow_sum=False)
    known = getattr(HunyuanVideoParams, "__dataclass_fields__", params)
    return HunyuanVideo(image_model="hunyuan_video", operations=comfy.ops.disable_weight_init,
                        **{k: v for k, v in params.items() if k in known})


def build_model(spec: DiTSpec, device: torch.device, dtype: torch.dtype, init: Callable | None = None):
    """``(ModelPatcher, weights_bytes)`` of ``spec`` from the host's detection and model classes.

    Weights are created on ``device`` directly (uninitialised unless ``init(module)`` fills them).
    """
    import comfy.model_detection
    import comfy.model_patcher

    config = comfy.model_detection.model_config_from_unet(_dit_state_dict(spec), "")
    if config is None:
        raise RuntimeError(f"the host does not recognise {spec.name}'s layout")
    config.set_inference_dtype(dtype, None)
    model = config.get_model({}, "", device=device)
    if init is not None:
        init(model.diffusion_model)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.diffusion_model.buffers() if b.device.type == device.type)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    return patcher, weights


def text_conds(spec: DiTSpec, device: torch.device):
    """(positive, negative) as CLIPTextEncode (+ FluxGuidance for HunyuanVideo) would hand them over."""
    def one():
        ctx = torch.zeros(1, spec.text_tokens, spec.text_dim)
        extra: dict = {}
        if spec.family == "hunyuan_video":
            extra = {"pooled_output": torch.zeros(1, 768), "guidance": spec.guidance}
        return [[ctx, extra]]
    return one(), one()


# ---------------------------------------------------------------- sampling evaluations

@dataclass
class SampleRun:
    """What one run of :func:`sample` left behind (for the callers' bookkeeping)."""

    evaluations: int = 0
    region_start_bytes: int = 0
    notes: list = field(default_factory=list)


def sample(patcher, spec: DiTSpec, latent_shape: tuple, device: torch.device, *, evaluations: int = 2,
           steps: int | None = None, on_region: Callable[[str], None] | None = None, extra_state: Callable | None = None,
           seed: int = 0) -> SampleRun:
    """``evaluations`` model evaluations of a KSampler-like run of ``steps`` Euler steps.

    ``on_region("start"/"end")`` is called around the evaluations (where callers start
    and stop measuring); ``extra_state()`` is called after conds are ready and may
    allocate what a configuration keeps on the device for the whole run (it returns
    an object kept alive until the end).
    """
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sampler_helpers
    import comfy.samplers

    steps = steps or max(evaluations, 2)
    positive, negative = text_conds(spec, device)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(spec.cfg)
    run = SampleRun()
    sigmas_list = [1.0 - i / steps for i in range(steps)] + [0.0]

    def outer(noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None,
              latent_shapes=None):
        model = patcher.model
        guider.inner_model = model
        patcher.pre_run()
        guider.conds = comfy.samplers.process_conds(model, noise, guider.conds, device, latent_image, denoise_mask, seed)
        options = comfy.model_patcher.create_model_options_clone(guider.model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas
        kept = extra_state() if extra_state is not None else None
        x = noise * 1.0
        if on_region is not None:
            on_region("start")
        for i in range(min(evaluations, steps)):
            # sigmas come from host floats (a constant tensor, as host code may read it back)
            sigma = torch.tensor([sigmas_list[i]], device=device)
            denoised = guider(x, sigma, model_options=options, seed=seed)
            dt = sigmas_list[i + 1] - sigmas_list[i]
            x = x + (x - denoised) * (dt / sigmas_list[i])
            del denoised
            run.evaluations += 1
        if on_region is not None:
            on_region("end")
        del kept
        return x

    noise = torch.zeros(latent_shape, device=device)
    latent = torch.zeros(latent_shape, device=device)
    sigmas = torch.tensor(sigmas_list, device=device)
    guider.conds = {k: [c.copy() for c in v] for k, v in guider.original_conds.items()}
    comfy.samplers.preprocess_conds_hooks(guider.conds)
    orig_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(orig_options)
    # As CFGGuider.sample: the patcher's wrappers and callbacks go into transformer_options.
    comfy.sampler_helpers.prepare_model_patcher(patcher, guider.conds, guider.model_options)
    comfy.samplers.filter_registered_hooks_on_conds(guider.conds, guider.model_options)
    patcher.patch_model(load_weights=False)  # object patches (Chunked Model Patch)
    try:
        executor = comfy.patcher_extension.WrapperExecutor.new_class_executor(
            outer, guider, comfy.patcher_extension.get_all_wrappers(
                comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, guider.model_options, is_model_options=True))
        out = executor.execute(noise, latent, None, sigmas, None, None, True, seed, latent_shapes=[latent.shape])
        del out
    finally:
        guider.model_options = orig_options
        patcher.unpatch_model(device_to=None, unpatch_weights=False)
        patcher.cleanup()
    return run


# ---------------------------------------------------------------- configurations

def easycache(patcher, threshold: float = 0.2, start: float = 0.15, end: float = 0.95):
    """The host's EasyCache node applied with its defaults (a patched clone)."""
    nodes_easycache = importlib.import_module("comfy_extras.nodes_easycache")
    out = nodes_easycache.EasyCacheNode.execute(patcher, threshold, start, end, False)
    return _node_output(out)


def chunked(patcher, mode: str = "auto", count: int = 4, budget_mb: int = 0, free_memory: Callable | None = None):
    """This pack's Chunked Model Patch installers on a clone (``nodes/chunk_patches.install``).

    ``free_memory(device) -> bytes``: what ``auto`` plans with instead of the device's own figure."""
    chunk_patches = host_module("nodes.chunk_patches")
    from lightcache_core.chunking import ChunkPolicy

    clone = patcher.clone()
    extra = {"free_memory": free_memory} if free_memory is not None else {}
    settings = chunk_patches.ChunkSettings(policy=ChunkPolicy(mode=mode, count=count, budget_bytes=budget_mb * 2**20),
                                           **extra)
    chunk_patches.install(clone, settings)
    return clone


def lightcache(patcher, cache_device: str, mode: str = "mix"):
    """This pack's LightCache Model Patch node (the real engine; needs real tensors)."""
    node = host_module("nodes.sampler_node")
    cls = getattr(node, "LightCacheModelPatch", None)
    if cls is None:
        raise RuntimeError("nodes.sampler_node has no LightCacheModelPatch")
    out = cls.execute(patcher, mode, 0.3, 0.0, 1.0, cache_device)
    return _node_output(out)


def _node_output(out):
    result = getattr(out, "result", out)
    return result[0] if isinstance(result, (tuple, list)) else result


# ---------------------------------------------------------------- VAEs and decodes

def build_vae(spec: VAESpec, device: torch.device, dtype: torch.dtype, init: Callable | None = None, fake: bool = False):
    """A real ``comfy.sd.VAE`` of ``spec`` with its weights on ``device`` in ``dtype``; ``(vae, weights_bytes)``.

    ``fake``: inside ``fake_gpu``. The VAE is then built on the meta device by the host's own
    ``comfy.sd.VAE`` (detection included) and its parameters are replaced by fake ones on the
    device (fake parameters cannot go through ``Module.to``).
    """
    import comfy.sd
    from harness import fixtures

    def module():
        return fixtures.build_wan_vae(dim=spec.dim) if spec.family == "wan" else fixtures.build_svd_vae()

    if fake:
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes(), torch.device("meta"):
            vae = comfy.sd.VAE(sd=module().state_dict())
        materialize(vae.first_stage_model, device, dtype)
    else:
        source = module()
        vae = comfy.sd.VAE(sd=source.state_dict())
        del source
        vae.first_stage_model.to(device=device, dtype=dtype)
        if init is not None:
            init(vae.first_stage_model)
    vae.device = device
    vae.vae_dtype = dtype
    vae.patcher.load_device = device
    weights = sum(p.numel() * p.element_size() for p in vae.first_stage_model.parameters())
    return vae, weights


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Replace every parameter and buffer of ``module`` by an empty tensor of its shape on ``device``
    (floating ones in ``dtype``)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                dt = dtype if p.is_floating_point() else p.dtype
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=dt, device=device), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype, device=device)


def decode(config: str, vae, latent: torch.Tensor):
    """Run one decode node on ``{"samples": latent}``; returns the IMAGE tensor."""
    samples = {"samples": latent}
    if config == "VAE Decode":
        host_nodes = importlib.import_module("nodes")
        return host_nodes.VAEDecode().decode(vae, samples)[0]
    if config == "VAE Decode (Tiled)":
        host_nodes = importlib.import_module("nodes")
        return host_nodes.VAEDecodeTiled().decode(vae, samples, 512, 64, 64, 8)[0]
    if config.startswith("Sliced VAE Decode"):  # "Sliced VAE Decode" or "Sliced VAE Decode (budget_mb N)"
        node = host_module("nodes.vae_node")
        cls = next(v for k, v in vars(node).items() if isinstance(v, type) and k.lower().startswith("sliced"))
        budget = int(config.split("budget_mb", 1)[1].strip(" )")) if "budget_mb" in config else 0
        return _node_output(cls.execute(samples, vae, budget_mb=budget))
    raise ValueError(config)


DECODES = ("VAE Decode", "VAE Decode (Tiled)", "Sliced VAE Decode")


# ---------------------------------------------------------------- the fake GPU

@contextlib.contextmanager
def fake_gpu(device_bytes: int, tracker):
    """Fake tensors on a pretend CUDA device of ``device_bytes``, counted by ``tracker``.

    ``model_management`` sees a GPU: free memory = ``device_bytes`` minus what
    the tracker holds live, no model loading (weights are built on the device),
    flash-capable attention (its CFG batching rule reads that), no cache flushes;
    ``torch.cuda`` memory queries (node reports) are answered by the tracker.
    SDPA takes the fused CUDA kernel a CUDA build would take (``sdpa.cuda_kernels``).
    """
    with fake_device(tracker, device_bytes) as device:
        yield device


@contextlib.contextmanager
def fake_device(tracker, device_bytes: int | None = None, extra_modes=()):
    """Fake tensors counted by ``tracker``: on a pretend GPU when ``device_bytes`` is given
    (see ``fake_gpu``), else on the CPU with the host's own CPU memory answers (validation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import comfy.model_management as mm
    import comfy.model_patcher

    from .sdpa import cuda_kernels
    from .tracker import HostScalars, no_fake_constants

    gpu = device_bytes is not None

    def free(dev=None, torch_free_too=False):
        left = max(device_bytes - tracker.current, 0)
        return (left, left) if torch_free_too else left

    stubs = {"load_models_gpu": lambda *a, **k: None, "soft_empty_cache": lambda *a, **k: None}
    cuda_stubs = {}
    patcher_free = None
    if gpu:
        stubs.update(get_free_memory=free, pytorch_attention_flash_attention=lambda: True,
                     cuda_device_context=lambda device=None: contextlib.nullcontext())  # newer hosts
        # Memory probes (e.g. the core's PeakMemory in node reports) ask torch.cuda; the tracker answers.
        cuda_stubs = {"synchronize": lambda device=None: None, "current_device": lambda: 0,
                      "memory_allocated": lambda device=None: tracker.current,
                      "max_memory_allocated": lambda device=None: tracker.peak,
                      "reset_peak_memory_stats": lambda device=None: None}
        patcher_free = getattr(comfy.model_patcher.ModelPatcher, "get_free_memory", None)
    saved = {name: getattr(mm, name) for name in stubs if hasattr(mm, name)}
    cuda_saved = {name: getattr(torch.cuda, name) for name in cuda_stubs}
    for name, value in stubs.items():
        if name in saved:  # only what this host has
            setattr(mm, name, value)
    for name, value in cuda_stubs.items():
        setattr(torch.cuda, name, value)
    if patcher_free is not None:
        comfy.model_patcher.ModelPatcher.get_free_memory = lambda self, device=None: free(device)
    try:
        with torch.inference_mode(), no_fake_constants(), FakeTensorMode(allow_non_fake_inputs=True), HostScalars(), \
                tracker, \
                (cuda_kernels() if gpu else contextlib.nullcontext()), contextlib.ExitStack() as stack:
            for mode in extra_modes:
                stack.enter_context(mode)
            yield torch.device("cuda", 0) if gpu else torch.device("cpu")
    finally:
        for name, value in saved.items():
            setattr(mm, name, value)
        for name, value in cuda_saved.items():
            setattr(torch.cuda, name, value)
        if patcher_free is not None:
            comfy.model_patcher.ModelPatcher.get_free_memory = patcher_free
        gc.collect()


def collect() -> None:
    gc.collect()


def fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def isclose_ratio(a: float, b: float) -> float:
    return math.inf if b == 0 else a / b


