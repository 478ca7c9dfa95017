"""ComfyUI nodes of the LightCache pack: thin adapters from ComfyUI objects to core calls."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .registry import node_classes


class LightCacheExtension(ComfyExtension):
    """The pack's V3 extension: hands ComfyUI the node classes."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_classes()


async def comfy_entrypoint() -> LightCacheExtension:
    return LightCacheExtension()
