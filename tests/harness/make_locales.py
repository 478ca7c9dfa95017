"""Generate locales/en/main.json (the frontend's translations of our nodes) from the live nodes.

    .venv/bin/python tests/harness/make_locales.py

ComfyUI serves every pack's ``locales/<lang>/main.json`` at ``/i18n`` and the frontend
merges it under its own keys: ``nodeDefs.<NodeId>.display_name`` / ``description``,
``inputs.<name>.name`` / ``tooltip`` and ``outputs.<index>.name`` / ``tooltip`` (the
shape of the frontend's own ``locales/en/nodeDefs.json``). An English entry wins over the
schema's text, so the file must follow the schema: it is generated from the V1 node info
the host serves at ``/object_info`` (``GET_NODE_INFO_V1``), and
``tests/test_packaging.py`` fails when it is stale.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import host  # noqa: E402

NODE_IDS = ("LightCacheSampler", "LightCacheModelPatch", "ChunkedModelPatch", "SlicedVAEDecode")
LOCALE_FILE = host.REPO / "locales" / "en" / "main.json"


def node_translation(info: dict) -> dict:
    """One ``nodeDefs`` entry from a node's ``/object_info`` dict."""
    entry: dict = {"display_name": info["display_name"]}
    if info.get("description"):
        entry["description"] = info["description"]
    inputs: dict = {}
    for section in ("required", "optional"):
        for name, spec in (info.get("input", {}).get(section) or {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            item = {"name": name}
            if options.get("tooltip"):
                item["tooltip"] = options["tooltip"]
            inputs[name] = item
    if inputs:
        entry["inputs"] = inputs
    outputs: dict = {}
    types = info.get("output") or []
    names = info.get("output_name") or []
    tooltips = info.get("output_tooltips") or []
    for index, type_name in enumerate(types):
        item = {}
        name = names[index] if index < len(names) else None
        if name and name != type_name:
            item["name"] = name
        if index < len(tooltips) and tooltips[index]:
            item["tooltip"] = tooltips[index]
        if item:
            outputs[str(index)] = item
    if outputs:
        entry["outputs"] = outputs
    return entry


def build(node_classes: dict) -> dict:
    """``main.json`` content for our nodes, from the loaded node classes."""
    return {"nodeDefs": {node_id: node_translation(node_classes[node_id].GET_NODE_INFO_V1()) for node_id in NODE_IDS}}


def render(content: dict) -> str:
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    booted = host.boot(host.CACHE / "models")
    LOCALE_FILE.parent.mkdir(parents=True, exist_ok=True)
    LOCALE_FILE.write_text(render(build(booted.nodes.NODE_CLASS_MAPPINGS)))
    print("wrote", LOCALE_FILE)


if __name__ == "__main__":
    main()
