"""The node classes the pack registers, in menu order: one line per node."""
from __future__ import annotations

from .chunk_node import ChunkedModelPatch
from .sampler_node import LightCacheModelPatch, LightCacheSampler
from .vae_node import SlicedVAEDecode


def node_classes() -> list[type]:
    return [LightCacheSampler, LightCacheModelPatch, ChunkedModelPatch, SlicedVAEDecode]
