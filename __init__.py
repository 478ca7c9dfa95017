"""LightCache for ComfyUI: faster, lighter video diffusion with no training.

ComfyUI loads this folder from ``custom_nodes/``. Nodes are V3 schema classes
registered through ``comfy_entrypoint``; we deliberately define no
``NODE_CLASS_MAPPINGS``, because the loader would then take the V1 path and
ignore the entry point. The frontend extension in ``web/`` is served through
``WEB_DIRECTORY`` (and ``[tool.comfy] web`` in pyproject.toml).
"""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
