"""The one place that knows how ComfyUI versions differ.

Everything here detects a feature rather than checking a version number, and
uses only public hook points (keyed wrappers, ``patches_replace``, object
patches, the V3 schema). Node modules import these helpers instead of
touching version-dependent host details themselves. Floor: ComfyUI 0.3.75;
target: the ~0.38+ generation users run.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

import comfy.model_management as model_management
import comfy.model_patcher
import comfy.patcher_extension
from comfy_api.latest import io

log = logging.getLogger("LightCache")

WrappersMP = comfy.patcher_extension.WrappersMP


# ---------------------------------------------------------------- UI messages

def executing_node_id() -> str | None:
    """The id of the node now executing, or None outside a prompt run."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # before the execution-context API existed
        return None
    ctx = get_executing_context()
    return None if ctx is None else str(ctx.node_id)


def send_progress_text(text: str, node_id: str | None = None) -> None:
    """Show ``text`` under the node in the UI; a no-op when no server is attached."""
    node_id = node_id or executing_node_id()
    if node_id is None:
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    sender = getattr(server, "send_progress_text", None)
    if sender is not None:
        sender(text, node_id)


# ---------------------------------------------------------------- memory

def free_memory_bytes(device: torch.device, patcher: Any = None) -> int:
    """Bytes free for activations on ``device``.

    Newer ComfyUI asks custom code to use ``ModelPatcher.get_free_memory``
    (it counts memory that Dynamic VRAM can evict); older hosts only have
    ``model_management.get_free_memory``.
    """
    getter = getattr(patcher, "get_free_memory", None)
    if callable(getter):
        try:
            return int(getter(device))
        except TypeError:
            pass
    return int(model_management.get_free_memory(device))


def host_pinned_allocator(mm: Any = None, cli_args: Any = None):
    """Host buffers for the cache store under the host's one pinned-memory budget (or None: no budget here).

    Returns a core ``BudgetedHostAllocator`` to pass as ``CacheStore(..., host_allocator=...)``:
    ``--disable-pinned-memory`` (or pinning off on this host) -> pageable buffers with a note; a host
    whose ``model_management.pin_memory`` registers plain tensors (newer ComfyUI, one growable budget
    with ``unpin_memory``) -> buffers pinned through it, pageable once it refuses; a host that pins only
    its own parameter types (0.3.75) -> torch-pinned buffers only while they fit what its budget
    (``MAX_PINNED_MEMORY - TOTAL_PINNED_MEMORY``) has left. None where the host keeps no pinned budget
    (the store then pins with torch, as before). ``mm``/``cli_args``: stand-ins for tests.
    """
    from ..lightcache_core.pinned_pool import BudgetedHostAllocator

    mm = model_management if mm is None else mm
    if cli_args is None:
        import comfy.cli_args

        cli_args = comfy.cli_args.args
    if getattr(cli_args, "disable_pinned_memory", False):
        return BudgetedHostAllocator(disabled="--disable-pinned-memory")
    pin, unpin = getattr(mm, "pin_memory", None), getattr(mm, "unpin_memory", None)
    if not (callable(pin) and callable(unpin) and hasattr(mm, "MAX_PINNED_MEMORY")):
        return None
    if getattr(mm, "MAX_PINNED_MEMORY", 0) <= 0:
        return BudgetedHostAllocator(disabled="the host has pinned memory off")
    allowed = getattr(mm, "PINNING_ALLOWED_TYPES", None)
    if allowed is None or "Tensor" in allowed:
        return BudgetedHostAllocator(register=pin, unregister=unpin, source="ComfyUI")
    return BudgetedHostAllocator(remaining=lambda: int(mm.MAX_PINNED_MEMORY - getattr(mm, "TOTAL_PINNED_MEMORY", 0)),
                                 source="ComfyUI")


def compute_device() -> torch.device:
    return model_management.get_torch_device()


NODE_CATEGORY = "LightCache"  # the Add Node menu folder of every node of the pack


def throw_if_interrupted() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    model_management.throw_exception_if_processing_interrupted()


# ---------------------------------------------------------------- patching

def create_model_options_clone(model_options: dict) -> dict:
    """A copy of ``model_options`` safe to mutate for one run."""
    clone = getattr(comfy.model_patcher, "create_model_options_clone", None)
    if clone is not None:
        return clone(model_options)
    import copy

    return copy.deepcopy(model_options)


def transformer_options_of(args: tuple, kwargs: dict) -> dict:
    """Find ``transformer_options`` in a DIFFUSION_MODEL wrapper's arguments.

    Models pass it as a keyword, or as the last positional argument (newer
    Wan); both forms appear across versions.
    """
    opts = kwargs.get("transformer_options")
    if isinstance(opts, dict):
        return opts
    for value in reversed(args):
        if isinstance(value, dict) and ("sigmas" in value or "cond_or_uncond" in value or "patches" in value):
            return value
    return {}


# ---------------------------------------------------------------- V3 schema

def _accepts(cls: type, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(cls.Input.__init__).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def input_flags(advanced: bool = False) -> dict:
    """Extra keyword flags for V3 inputs that only newer hosts understand.

    ``advanced=True`` (fold the input away in the UI) exists only in
    ~0.38-era schemas and raises on 0.3.75, so it is passed only if accepted.
    """
    if advanced and _accepts(io.Float, "advanced"):
        return {"advanced": True}
    return {}


def _schema_params() -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(io.Schema).parameters)
    except (TypeError, ValueError):
        return frozenset()


def schema_extras(**extras: Any) -> dict:
    """The ``io.Schema`` keyword arguments among ``extras`` that this host accepts.

    Newer schemas take e.g. ``search_aliases=[...]`` (names the node search
    also matches) or ``essentials_category``; 0.3.75's ``io.Schema`` raises on
    them. Use as ``io.Schema(..., **compat.schema_extras(search_aliases=[...]))``;
    unknown or ``None`` values are dropped, so the node loads on every host.
    """
    accepted = _schema_params()
    return {name: value for name, value in extras.items() if value is not None and name in accepted}


# ---------------------------------------------------------------- DiT caching (LightCache Sampler)

def diffusion_model_of(model_patcher: Any) -> Any:
    """The ``nn.Module`` that runs the DiT/UNet forward (``model.diffusion_model``)."""
    try:
        return model_patcher.get_model_object("diffusion_model")
    except (AttributeError, KeyError):
        return getattr(getattr(model_patcher, "model", None), "diffusion_model", None)


def _forward_honours_patches_replace(module: Any) -> bool:
    """True when the module's forward code looks up ``patches_replace['dit']``.

    Feature detection by reading the host's own source: a model whose block loop
    never consults ``patches_replace`` cannot take block-level caching.
    """
    import inspect

    for name in ("forward_orig", "_forward", "forward"):
        fn = getattr(type(module), name, None)
        if fn is None:
            continue
        try:
            src = inspect.getsource(fn)
        except (OSError, TypeError):
            continue
        if "patches_replace" in src and ("double_block" in src or "single_block" in src):
            return True
    return False


def dit_block_layout(model_patcher: Any) -> list[tuple[str, int]] | None:
    """Block segments a DiT exposes through ``patches_replace["dit"]``, in run order.

    Returns e.g. ``[("double_block", 40)]`` for Wan, ``[("double_block", 20),
    ("single_block", 40)]`` for HunyuanVideo/Flux, or None when the model's block
    loop does not honour ``patches_replace`` (UNets, models with own loops).
    """
    dm = diffusion_model_of(model_patcher)
    if dm is None or not _forward_honours_patches_replace(dm):
        return None
    segments: list[tuple[str, int]] = []
    if hasattr(dm, "double_blocks") or hasattr(dm, "single_blocks"):
        for attr, name in (("double_blocks", "double_block"), ("single_blocks", "single_block")):
            blocks = getattr(dm, attr, None)
            if blocks is not None and len(blocks) > 0:
                segments.append((name, len(blocks)))
    elif getattr(dm, "blocks", None) is not None:
        segments.append(("double_block", len(dm.blocks)))
    return segments or None


def is_unet_model(model_patcher: Any) -> bool:
    """True for ComfyUI's UNet families (openaimodel ``UNetModel``, SVD ``VideoUNet``)."""
    dm = diffusion_model_of(model_patcher)
    if dm is None:
        return False
    try:
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError:
        return False
    return isinstance(dm, UNetModel)


def context_window_id(transformer_options: dict) -> tuple | None:
    """The frame indices of the context window being evaluated, or None outside context windows.

    Core's context windows put the window object in ``transformer_options["context_window"]``
    (every window carries the same cond uuids); AnimateDiff-Evolved passes ``ad_params["sub_idxs"]``.
    """
    window = transformer_options.get("context_window") if isinstance(transformer_options, dict) else None
    indices = getattr(window, "index_list", None)
    if indices is not None:
        return tuple(int(i) for i in indices)
    ad = transformer_options.get("ad_params") if isinstance(transformer_options, dict) else None
    if isinstance(ad, dict) and ad.get("sub_idxs") is not None:
        return tuple(int(i) for i in ad["sub_idxs"])
    return None


def guider_cfg_scale(guider: Any) -> float:
    """The CFG scale of a guider (``CFGGuider.cfg``); 1.0 for guiders without a single scale."""
    cfg = getattr(guider, "cfg", None)
    return float(cfg) if isinstance(cfg, (int, float)) else 1.0


def block_side_inputs(args: tuple, kwargs: dict) -> str | None:
    """What a diffusion model call adds inside its block loop besides the blocks, or None.

    VACE (``vace_context``: ``x += c_skip`` after mapped blocks) and ControlNet residuals
    (``control`` with input/output/middle lists, HunyuanVideo) are added by the loop
    after a block returns, so a cached block residual would contain them twice.
    """
    control = kwargs.get("control")
    if control is None:
        control = next((a for a in args if isinstance(a, dict) and {"input", "output", "middle"} & set(a)), None)
    if isinstance(control, dict) and any(control.get(k) for k in ("input", "output", "middle")):
        return "ControlNet residuals"
    if kwargs.get("vace_context") is not None:
        return "VACE control"
    return None


def model_sigma_max(model_patcher: Any) -> float | None:
    """The largest sigma of the model's noise schedule (1.0 for flow models), None when unknown."""
    try:
        sampling = model_patcher.get_model_object("model_sampling")
        return float(sampling.sigma_max)
    except Exception:  # noqa: BLE001 - only informs a report note
        return None


def torch_compile_active(model_patcher: Any) -> bool:
    """True when the model goes through ComfyUI's torch.compile helper (TorchCompileModel and the
    packs built on ``set_torch_compile_wrapper``): its kwargs in ``model_options`` or its APPLY_MODEL wrapper."""
    options = getattr(model_patcher, "model_options", None) or {}
    if "torch_compile_kwargs" in options:
        return True
    wrappers = (getattr(model_patcher, "wrappers", None) or {}).get(WrappersMP.APPLY_MODEL, {})
    return "torch.compile" in wrappers


STACKED_CACHE_KEYS = {"easycache": "EasyCache", "lazycache": "LazyCache"}


def stacked_caches(model_patcher: Any) -> list[str]:
    """Names of other step caches already on the model (ComfyUI's EasyCache/LazyCache).

    Detected by their keyed wrappers and their ``transformer_options`` holders; two caches
    deciding over the same evaluations would each count steps the other skipped.
    """
    found = set()
    to = getattr(model_patcher, "model_options", {}).get("transformer_options", {})
    for key, name in STACKED_CACHE_KEYS.items():
        if key in to:
            found.add(name)
    for per_type in (getattr(model_patcher, "wrappers", None) or {}).values():
        for key in per_type:
            if key in STACKED_CACHE_KEYS:
                found.add(STACKED_CACHE_KEYS[key])
    return sorted(found)


def latent_layout(model_patcher: Any) -> tuple[int, int] | None:
    """(channels, rank) of the latents the model samples, e.g. (16, 5) for Wan; None when unknown."""
    fmt = getattr(getattr(model_patcher, "model", None), "latent_format", None)
    channels = getattr(fmt, "latent_channels", None)
    dims = getattr(fmt, "latent_dimensions", None)
    if not isinstance(channels, int) or not isinstance(dims, int):
        return None
    return channels, dims + 2


# ---------------------------------------------------------------- chunking (Chunked Model Patch)

ATTENTION_OVERRIDE_KEY = "optimized_attention_override"

# Attention backends that build the (queries x keys) score matrix in memory; the
# others (PyTorch SDPA flash/efficient kernels, xformers, sage, flash-attn) stream it.
_SCORE_MATERIALIZING_ATTENTION = frozenset({"attention_basic", "attention_sub_quad", "attention_split"})


def attention_override_supported() -> bool:
    """True when ComfyUI's attention functions honour ``transformer_options["optimized_attention_override"]``.

    The hook arrived with ``wrap_attn`` (present in 0.3.75 and later); older hosts
    call the attention function directly.
    """
    try:
        import comfy.ldm.modules.attention as attention
    except ImportError:
        return False
    return hasattr(attention, "wrap_attn")


def get_attention_override(model_options: dict):
    """The attention override already installed on ``model_options`` (None when none)."""
    return model_options.get("transformer_options", {}).get(ATTENTION_OVERRIDE_KEY)


def set_attention_override(patcher: Any, fn) -> None:
    """Install ``fn(func, q, k, v, heads, *args, **kwargs)`` as the model's attention override.

    ~0.38 hosts have ``ModelPatcher.set_model_optimized_attention``-era helpers, but the
    storage key is the same ``transformer_options`` entry on every version that has it.
    """
    patcher.model_options.setdefault("transformer_options", {})[ATTENTION_OVERRIDE_KEY] = fn


def attention_materializes_scores(func, has_mask: bool = False) -> bool:
    """Whether attention function ``func`` holds the full score matrix of its queries.

    PyTorch SDPA with an explicit mask may fall back to its math kernel, so a masked
    ``attention_pytorch`` call counts as materialising.
    """
    name = getattr(func, "__name__", "")
    if name in _SCORE_MATERIALIZING_ATTENTION:
        return True
    return name == "attention_pytorch" and has_mask


def forward_patch_names(*functions) -> frozenset:
    """Every string constant in the code of these host functions (and the functions nested in them).

    A forward that calls ``transformer_options["patches"][name]`` hooks names them as string
    constants (newer Wan: ``"attn1_patch"``, ``"attn2_patch"``; Flux blocks: ``"attn1_output_patch"``).
    Intersected with the keys of a call's ``patches``, this tells the chunking patches which hooks
    the host would call there, without knowing any host's list.
    """
    names: set = set()
    codes = [getattr(getattr(f, "__func__", f), "__code__", None) for f in functions]
    while codes:
        code = codes.pop()
        if code is None:
            continue
        for const in code.co_consts:
            if isinstance(const, str):
                names.add(const)
            elif hasattr(const, "co_consts"):
                codes.append(const)
    return frozenset(names)


def wan_self_attention_parts(module: torch.nn.Module):
    """``(optimized_attention, apply_rope1)`` exactly as the host's Wan self-attention uses them.

    Returns None unless ``module`` is a plain ``WanSelfAttention`` whose forward is the
    host's own ``forward(x, freqs, transformer_options)`` built from ``q/k/v/o``,
    ``norm_q/norm_k``, ``apply_rope1`` and ``optimized_attention`` (0.3.75 layout).
    A subclass, another signature or another body leaves the module unpatched.
    """
    import inspect

    try:
        from comfy.ldm.wan import model as wan_model
    except ImportError:
        return None
    cls = getattr(wan_model, "WanSelfAttention", None)
    if cls is None or type(module) is not cls:
        return None
    forward = cls.__dict__.get("forward")
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):
        return None
    if params != ["self", "x", "freqs", "transformer_options"]:
        return None
    names: set = set()
    codes = [getattr(forward, "__code__", None)]
    while codes:  # the forward's own names and those of its nested helpers (qkv_fn_q, ...)
        code = codes.pop()
        if code is not None:
            names.update(code.co_names)
            codes.extend(c for c in code.co_consts if hasattr(c, "co_names"))
    needed = {"q", "k", "v", "o", "norm_q", "norm_k", "apply_rope1", "optimized_attention", "view"}
    if not needed <= names:
        return None
    if not all(hasattr(module, a) for a in ("q", "k", "v", "o", "norm_q", "norm_k", "num_heads", "head_dim")):
        return None
    attention = getattr(wan_model, "optimized_attention", None)
    rope = getattr(wan_model, "apply_rope1", None)
    if attention is None or rope is None:
        return None
    return attention, rope


def ksampler_options() -> tuple[list[str], list[str]]:
    """(sampler names, scheduler names) exactly as KSampler lists them."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)


def common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0) -> dict:
    """Sample exactly as KSampler does (same noise, callback/preview, latent copy).

    Uses the host's public ``nodes.common_ksampler`` when present, else the same
    steps through ``comfy.sample.sample``. Returns the output LATENT dict.
    """
    import importlib

    host_nodes = importlib.import_module("nodes")  # ComfyUI's top-level nodes.py
    fn = getattr(host_nodes, "common_ksampler", None)
    if fn is not None:
        return fn(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=denoise)[0]
    import comfy.sample
    import comfy.utils
    import latent_preview

    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                                  denoise=denoise, noise_mask=latent.get("noise_mask"), callback=callback,
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


# ---------------------------------------------------------------- VAE decode (Sliced VAE Decode)

def wan_decode_unit_scheme(decoder: Any) -> str:
    """How the host's Wan ``WanVAE.decode`` feeds its decoder: ``"single"`` or ``"pairs"``.

    0.3.x calls ``Decoder3d`` once per latent frame; newer hosts feed the first
    latent frame alone, then pairs, and split each temporal upsample's output
    frame by frame inside ``Decoder3d`` (a ``run_up`` method, or nested
    ``run_up``/``run_upsamples`` helpers in ``forward``). The causal cache
    reproduces the host's numbers most closely when the units match, so detect
    that splitting decoder by those names.
    """
    if callable(getattr(decoder, "run_up", None)):
        return "pairs"
    code = getattr(getattr(type(decoder), "forward", None), "__code__", None)
    nested = {getattr(c, "co_name", None) for c in (code.co_consts if code is not None else ())}
    return "pairs" if nested & {"run_up", "run_upsamples"} else "single"


def cpu_conv_unfolds(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether PyTorch runs a causal "same" 3-D convolution of ``x`` ``[b, c, t, rows, w]`` on CPU by
    unfolding it (im2col: about 27x its input, then a matrix product) rather than with oneDNN (no copy).

    The convolution sees ``x`` padded: ``kt - 1`` cached or zero frames in front and ``k // 2`` rows and
    columns each side. Asks torch's own backend choice where it exposes one
    (``torch._C._select_conv_backend``, with a zero-stride probe of that shape and the layer's first 3-D
    ``weight``); otherwise ATen's rule for float32: oneDNN when the batch is above 1 or channels x frames x
    rows exceeds 20480.
    """
    if x.device.type != "cpu":
        return False
    kt, kh, kw = (weight.shape[2:] if weight is not None and weight.dim() == 5 else (3, 3, 3))
    shape = (x.shape[0], x.shape[1], x.shape[2] + kt - 1, x.shape[3] + kh - 1, x.shape[4] + kw - 1)
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is not None and weight is not None and weight.dim() == 5 and weight.shape[1] == x.shape[1]:
        probe = x.new_zeros(1).expand(shape)
        try:
            backend = select(probe, weight, None, [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1, None)
            return "Slow" in str(backend)
        except (RuntimeError, TypeError):
            pass
    if x.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return True
    return shape[0] == 1 and shape[1] * shape[2] * shape[3] <= 20480


def vae_has_chunked_io(first_stage_model: Any) -> bool:
    """True if the VAE offers newer ComfyUI's chunked-IO protocol (``comfy_has_chunked_io`` +
    ``decode_output_shape``); the host's ``VAE.decode`` then streams into a preallocated output itself."""
    return bool(getattr(first_stage_model, "comfy_has_chunked_io", False)) and callable(
        getattr(first_stage_model, "decode_output_shape", None))


def vae_output_dtype() -> torch.dtype:
    """The dtype VAEDecode returns: ``vae_output_dtype()`` where the host has it, else float32."""
    getter = getattr(model_management, "vae_output_dtype", None)
    if callable(getter):
        try:
            return getter()
        except TypeError:
            pass
    return torch.float32


def progress_bar(total: int):
    """The host's UI progress bar (``comfy.utils.ProgressBar``), or a no-op stand-in."""
    try:
        import comfy.utils

        return comfy.utils.ProgressBar(max(int(total), 1))
    except Exception:  # noqa: BLE001 - progress is cosmetic
        class _Nop:
            def update(self, _n: int = 1) -> None:
                pass

        return _Nop()


def process_rss_reader():
    """A callable returning this process's resident bytes (psutil ships with ComfyUI)."""
    import psutil

    process = psutil.Process()
    return lambda: process.memory_info().rss
