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


def compute_device() -> torch.device:
    return model_management.get_torch_device()


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
