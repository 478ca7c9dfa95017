"""Every bundled workflow is a valid UI-format file, uses known nodes, has consistent links,
and (converted to API format and pointed at the tiny fixtures) executes through ComfyUI."""
from __future__ import annotations

import json

import pytest

from harness import fixtures, motion_modules, third_party, workflow

FILES = sorted(p.name for p in workflow.WORKFLOWS_DIR.glob("*.json"))
FAMILY = {  # which tiny fixture family each workflow runs on
    "lightcache_wan21_t2v_1.3B.json": "wan",
    "lightcache_wan21_t2v_14B.json": "wan",
    "lightcache_wan22_ti2v_5B.json": "wan",
    "lightcache_hunyuan_video_t2v.json": "hunyuan_video",
    "lightcache_svd_xt_img2vid.json": "svd",
    "lightcache_wan22_t2v_a14b_two_stage.json": "wan_two_stage",
    # tiny SD1.5 UNet + tiny motion module through the real AnimateDiff-Evolved (skipped when its tarball is absent)
    "lightcache_animatediff_lightning.json": "animatediff",
}
PACK_TYPES = {"ChunkedModelPatch", "SlicedVAEDecode"}
CACHE_TYPES = {"LightCacheSampler", "LightCacheModelPatch"}  # the sampler, or the patch on each expert of a two-stage run


def test_every_workflow_is_listed():
    assert set(FILES) == set(FAMILY)
    for name in FILES:
        assert (workflow.WORKFLOWS_DIR / name.replace(".json", ".jpg")).exists(), f"{name} has no template thumbnail"


@pytest.mark.parametrize("name", FILES)
def test_workflow_is_ui_format_with_known_nodes_and_consistent_links(comfy_host, name):
    data = json.loads((workflow.WORKFLOWS_DIR / name).read_text())
    for key in ("last_node_id", "last_link_id", "nodes", "links", "version"):
        assert key in data, f"{name}: UI-format key {key} missing"
    nodes = {n["id"]: n for n in data["nodes"]}
    assert len(nodes) == len(data["nodes"]), "duplicate node ids"
    assert data["last_node_id"] >= max(nodes)
    types = {n["type"] for n in nodes.values()}
    assert PACK_TYPES <= types and types & CACHE_TYPES, f"{name} must use all three LightCache nodes"
    assert "Note" in types, f"{name} needs a note explaining the settings"
    for t in types - workflow.FRONTEND_ONLY_NODES:
        assert t in comfy_host.nodes.NODE_CLASS_MAPPINGS or workflow.missing_pack(t), f"{name}: unknown node type {t}"
    for link_id, src, src_slot, dst, dst_slot, link_type in data["links"]:
        assert link_id in nodes[src]["outputs"][src_slot]["links"], f"link {link_id} missing on its source"
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id, f"link {link_id} missing on its target"
        assert nodes[src]["outputs"][src_slot]["type"] == link_type
    assert data["last_link_id"] >= max(lk[0] for lk in data["links"])
    # Converting to API format keeps every executable node and resolves every link.
    api = workflow.ui_to_api(data)
    assert len(api) == len([n for n in nodes.values() if n["type"] not in workflow.FRONTEND_ONLY_NODES])


@pytest.mark.parametrize("name", FILES)
def test_workflow_executes_on_tiny_fixtures(runner, models_dir, name):
    data = workflow.load(name)
    if FAMILY[name] in workflow.ANIMATEDIFF:
        if third_party.skip_reason(third_party.ADE):
            pytest.skip(third_party.skip_reason(third_party.ADE))
        assert not workflow.missing_pack("ADE_UseEvolvedSampling"), f"{third_party.ADE} is here but did not load"
        motion_modules.ensure(models_dir)
    missing = sorted({p for n in data["nodes"] if (p := workflow.missing_pack(n["type"]))})
    if missing:
        pytest.skip(f"{name} needs {', '.join(missing)}, which is not installed here")
    family = FAMILY[name]
    if family in workflow.TWO_EXPERTS:
        fixtures.ensure_fixtures(models_dir, which=(fixtures.WAN_T2V_LARGE,))
    size = dict(width=64, height=64, length=4) if family == "svd" else dict(width=64, height=64, length=9)
    api = workflow.adapt_for_fixtures(workflow.ui_to_api(data), family, steps=4, **size)
    result = runner.run(api)
    saved = [k for k, v in api.items() if v["class_type"] == "SaveAnimatedWEBP"]
    assert saved and result.ui.get(saved[0], {}).get("images"), f"{name}: nothing saved"
    sampler = next((k for k, v in api.items() if v["class_type"] == "LightCacheSampler"), None)
    if sampler is not None:
        report = result.output(sampler, 1)
        assert isinstance(report, str) and report
    else:  # a two-stage run: each stage's report goes under its own sampler node
        stages = [k for k, v in api.items() if v["class_type"] == "KSamplerAdvanced"]
        assert len(stages) == 2 and all(any("LightCache" in t for t in result.progress_texts(k)) for k in stages)
