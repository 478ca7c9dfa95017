"""The list of node classes the pack registers, in menu order.

Each node module is imported here, so a new node is one line in one place.
"""
from __future__ import annotations

import importlib
import logging

# (module, class name). Modules are imported lazily so a broken optional node
# logs one clear line instead of taking the whole pack down.
NODE_SPECS: list[tuple[str, str]] = [
    ("sampler_node", "LightCacheSampler"),
    ("sampler_node", "LightCacheModelPatch"),
    ("chunk_node", "ChunkedModelPatch"),
    ("vae_node", "SlicedVAEDecode"),
]


def node_classes() -> list[type]:
    classes = []
    for module_name, class_name in NODE_SPECS:
        try:
            module = importlib.import_module(f".{module_name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.endswith(module_name):
                continue  # node module not present in this checkout
            raise
        classes.append(getattr(module, class_name))
    if not classes:
        logging.warning("[LightCache] no node modules found")
    return classes
