"""What the pack ships besides its nodes, checked against the live host.

* ``locales/en/main.json`` is what the frontend merges as our nodes' English names,
  descriptions and tooltips; an English entry wins over the schema's text, so it must
  equal what the live nodes declare (regenerate: ``python tests/harness/make_locales.py``);
* ``web/docs/<NodeId>.md``, the help page the frontend fetches for each node, exists
  and names the node and every one of its inputs;
* V3 ``search_aliases`` reach the node info on hosts whose schema has them, and
  ``compat.schema_extras`` leaves them out (so the node still loads) where it has not;
* ``pyproject.toml``'s ``requires-comfyui`` range holds every host the suite runs on;
* ``.github/workflows/publish.yml`` publishes to the Comfy Registry only from this
  repository's owner, when ``pyproject.toml`` changes on ``main``.

The browser test (test_e2e_browser.py) checks that a running server serves the help
pages and translations where the frontend looks for them.
"""
from __future__ import annotations

import inspect
import json
import re
import tomllib

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from harness import host, make_locales

PACK_NODES = {"LightCacheSampler": "LightCache Sampler", "LightCacheModelPatch": "LightCache Model Patch",
              "ChunkedModelPatch": "Chunked Model Patch", "SlicedVAEDecode": "Sliced VAE Decode"}
# Words the node search must also match, per node (a subset of what the node declares).
# LightCache Sampler / Model Patch apply compat.schema_extras in sampler_node.py.
SEARCH_ALIASES = {
    "LightCacheSampler": {"teacache", "easycache", "magcache", "first block cache", "fbcache", "deepcache"},
    "LightCacheModelPatch": {"teacache", "easycache", "magcache", "first block cache", "fbcache", "deepcache"},
    "ChunkedModelPatch": {"chunk", "ffn chunk", "attention chunk"},
    "SlicedVAEDecode": {"tiled vae decode", "vae decode"},
}
# The hosts the suite runs on (the harness's list; both where it predates a host list).
TEST_HOSTS = sorted(getattr(host, "HOSTS", None) or ("0.3.75", "0.33.0"), key=Version)
PYPROJECT = tomllib.loads((host.REPO / "pyproject.toml").read_text())


def _pack_class(comfy_host, node_id: str):
    cls = comfy_host.nodes.NODE_CLASS_MAPPINGS[node_id]
    assert cls.RELATIVE_PYTHON_MODULE == "custom_nodes.lightcache", node_id
    return cls


def test_english_locale_matches_live_nodes(comfy_host):
    classes = {node_id: _pack_class(comfy_host, node_id) for node_id in PACK_NODES}
    expected = make_locales.build(classes)
    shipped = json.loads(make_locales.LOCALE_FILE.read_text())
    assert set(shipped["nodeDefs"]) == set(PACK_NODES)
    for node_id, entry in expected["nodeDefs"].items():
        assert shipped["nodeDefs"][node_id] == entry, (
            f"locales/en/main.json is stale for {node_id} (the frontend shows its text instead of the schema's); "
            f"run: .venv/bin/python tests/harness/make_locales.py")
        assert entry["display_name"] == PACK_NODES[node_id]
        for name, item in entry.get("inputs", {}).items():
            assert item.get("tooltip"), f"{node_id}.{name}: no tooltip to translate"


@pytest.mark.parametrize("node_id", list(PACK_NODES))
def test_help_page_names_node_and_every_input(comfy_host, node_id):
    page = host.REPO / "web" / "docs" / f"{node_id}.md"
    assert page.is_file(), f"no help page web/docs/{node_id}.md (the frontend's node help reads it)"
    text = page.read_text()
    assert text.startswith(f"# {PACK_NODES[node_id]}\n"), f"{page.name} must start with '# {PACK_NODES[node_id]}'"
    info = _pack_class(comfy_host, node_id).GET_NODE_INFO_V1()
    for section in ("required", "optional"):
        for name in info["input"].get(section) or {}:
            assert re.search(rf"\b{re.escape(name)}\b", text), f"web/docs/{node_id}.md does not describe input '{name}'"


def test_search_aliases_where_the_host_has_them(comfy_host):
    from comfy_api.latest import io

    compat = _compat(comfy_host)
    supported = "search_aliases" in inspect.signature(io.Schema).parameters
    assert compat.schema_extras(not_a_schema_field=1, search_aliases=None) == {}
    assert bool(compat.schema_extras(search_aliases=["x"])) == supported
    for node_id, words in SEARCH_ALIASES.items():
        declared = _pack_class(comfy_host, node_id).GET_NODE_INFO_V1().get("search_aliases")
        if supported:
            assert words <= set(declared or ()), f"{node_id} search_aliases: {declared}"
        else:
            assert not declared, f"{node_id}: search_aliases on a host whose schema has none: {declared}"


def _compat(comfy_host):
    """The pack's nodes.compat, as ComfyUI's loader imported it (through a node module)."""
    import sys

    return sys.modules[_pack_class(comfy_host, "ChunkedModelPatch").__module__].compat


def test_requires_comfyui_range_holds_every_test_host(comfy_host):
    spec = PYPROJECT["tool"]["comfy"]["requires-comfyui"]
    specifier = SpecifierSet(spec)
    assert len(TEST_HOSTS) >= 2, TEST_HOSTS
    for version in TEST_HOSTS:
        assert Version(version) in specifier, f"requires-comfyui '{spec}' excludes test host {version}"
    # The floor is the oldest host we test: the range claims nothing older.
    floors = [Version(s.version) for s in specifier if s.operator in (">=", ">")]
    assert floors and min(floors) == Version(TEST_HOSTS[0]), f"requires-comfyui '{spec}': floor should be {TEST_HOSTS[0]}"
    # The host this session runs on, read from its own version file.
    running = (comfy_host.path / "comfyui_version.py").read_text()
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", running)
    assert match and Version(match.group(1)) in specifier, f"running host {match and match.group(1)} not in '{spec}'"


def test_registry_publish_workflow():
    path = host.REPO / ".github" / "workflows" / "publish.yml"
    workflow = yaml.safe_load(path.read_text())
    trigger = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    assert trigger["push"]["branches"] == ["main"] and trigger["push"]["paths"] == ["pyproject.toml"], trigger
    owner = re.match(r"https://github\.com/([^/]+)/", PYPROJECT["project"]["urls"]["Repository"]).group(1)
    (job,) = workflow["jobs"].values()
    assert job["if"].replace(" ", "") in (f"${{{{github.repository_owner=='{owner}'}}}}",
                                          f"github.repository_owner=='{owner}'"), job["if"]
    steps = {step.get("uses", "").split("@")[0]: step for step in job["steps"]}
    publish = steps["Comfy-Org/publish-node-action"]
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert workflow.get("permissions") == {"contents": "read"}, "the job needs no write access"
