// LightCache frontend extension: shows what the cache did, on the nodes themselves.
//
// Data flow (no custom server messages):
//  * while sampling, the Python side calls PromptServer.send_progress_text(text, node_id);
//    the frontend shows that text under the node natively ("$$node-text-preview" widget);
//  * after a run, LightCacheSampler returns ui={"lightcache_report": [report dict]} and
//    SlicedVAEDecode returns ui={"lightcache_decode": [decode dict]}; the frontend hands
//    that output to node.onExecuted(output), which we chain.
//
// What is shown, in one DOM widget per node (node.addDOMWidget), so it renders the same
// with Nodes 2.0 (Vue nodes) on, where the frontend mounts the element inside the node,
// and off, where the frontend positions it over the LiteGraph canvas. LiteGraph drawing
// hooks (onDrawForeground, LGraphBadge, canvas widgets) are not used: Vue nodes never run them.
//  * LightCache Sampler: a badge "⚡ <speedup>x est. · <reused>/<evaluations> evals reused",
//    a line with evaluations computed and reused (by kind), a timeline strip (one cell per
//    model evaluation, one row per CFG branch, one strip per stage of a two-stage run,
//    coloured by decision), a colour key with counts, and what the cache held and where;
//  * Sliced VAE Decode: a badge with the slices used and the peak memory, and a detail line.
//
// The report dict grows over time (the caching engine adds keys), so every key is read
// defensively and unknown ones are ignored. Current conventions only: app/api come from
// window.comfyAPI (no script imports), no build step, no dependencies.
// A debug hook for tests and for curious users: node.__lightcache and window.__lightcache.

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const EXTENSION = "LightCache.RunReport";
const SAMPLER_TYPES = new Set(["LightCacheSampler"]);
const DECODE_TYPES = new Set(["SlicedVAEDecode"]);
const REPORT_WIDGET = "$$lightcache-report";
const CSS_CLASS = "lightcache-report";

// One colour per timeline code (lightcache_core.report.GRANULARITY_CODES).
const CODE_COLORS = {
  C: "#6b7280", // computed (full model evaluation)
  S: "#22c55e", // step reuse (whole-model residual)
  G: "#06b6d4", // cfg reuse (negative branch rebuilt from the cached difference)
  B: "#f59e0b", // block reuse (middle transformer blocks)
  D: "#a855f7", // deepcache (UNet deep features)
};
const UNKNOWN_COLOR = "#3f3f46";
const CODE_NAMES = { C: "computed", S: "step", G: "cfg", B: "block", D: "deepcache" };
const GRANULARITY_TO_CODE = { full: "C", compute: "C", step: "S", cfg: "G", block: "B", deepcache: "D" };

// Fixed pixel heights, so the widget can tell the LiteGraph layout its height up front.
const PAD = 4;
const BADGE_H = 20;
const LINE_H = 15;
const ROW_H = 10;
const ROW_GAP = 2;
const STAGE_LABEL_H = 13;
const GAP = 4;
const MARGIN = 8; // the DOM widget's inset inside the node (LiteGraph mode)
const MAX_NOTES = 2;

const trackedNodes = new Set();

// ---------------------------------------------------------------- small helpers

const isObject = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const asArray = (v) => (Array.isArray(v) ? v : []);

function finiteNumber(v) {
  const n = typeof v === "string" && v.trim() !== "" ? Number(v) : v;
  return typeof n === "number" && Number.isFinite(n) ? n : null;
}

function formatBytes(value) {
  let n = finiteNumber(value) ?? 0;
  if (Math.abs(n) < 1024) return `${Math.round(n)} B`;
  for (const unit of ["KiB", "MiB", "GiB", "TiB"]) {
    n /= 1024;
    if (Math.abs(n) < 1024 || unit === "TiB") return `${n.toFixed(1)} ${unit}`;
  }
  return `${n.toFixed(1)} TiB`;
}

function formatSeconds(value) {
  const s = finiteNumber(value);
  if (s === null) return null;
  return s < 10 ? `${s.toFixed(2)} s` : `${s.toFixed(1)} s`;
}

function codeOf(cell) {
  if (!isObject(cell)) return "?";
  if (typeof cell.g === "string" && cell.g) return cell.g;
  if (typeof cell.code === "string" && cell.code) return cell.code;
  if (cell.decision === "compute") return "C";
  return GRANULARITY_TO_CODE[cell.granularity] ?? "?";
}

const isReuseCode = (code) => code !== "C" && code !== "?";

// ---------------------------------------------------------------- report -> view model

// Rows per CFG branch, in order of first appearance; one cell per evaluation.
function stripOf(timeline, label) {
  const rows = new Map();
  const counts = {};
  for (const cell of timeline) {
    const branch = String(cell?.branch ?? "all");
    if (!rows.has(branch)) rows.set(branch, []);
    const code = codeOf(cell);
    rows.get(branch).push(code);
    counts[code] = (counts[code] ?? 0) + 1;
  }
  return { label, rows: [...rows.entries()].map(([branch, codes]) => ({ branch, codes })), cells: timeline.length, counts };
}

function stageLabel(stage, index) {
  for (const key of ["name", "label", "stage", "model"]) {
    if (typeof stage?.[key] === "string" && stage[key]) return stage[key];
  }
  return `stage ${index + 1}`;
}

function sumOver(items, key) {
  let total = null;
  for (const item of items) {
    const n = finiteNumber(item?.[key]);
    if (n !== null) total = (total ?? 0) + n;
  }
  return total;
}

// Per-granularity byte tables the report may carry (e.g. bytes stored / read per kind of reuse),
// under names we may not know yet: any {granularity: bytes} object whose key says bytes and
// stored/written/read.
function byteTables(report) {
  const out = [];
  const seen = new Set();
  for (const source of [report, report.cache_stats]) {
    if (!isObject(source)) continue;
    for (const [key, value] of Object.entries(source)) {
      if (!isObject(value) || seen.has(key)) continue;
      const k = key.toLowerCase();
      if (!k.includes("byte")) continue;
      const verb = k.includes("read") ? "read" : k.includes("stor") || k.includes("writ") ? "stored" : null;
      if (!verb) continue;
      const parts = Object.entries(value)
        .filter(([, v]) => finiteNumber(v) !== null && finiteNumber(v) > 0)
        .map(([g, v]) => `${g} ${formatBytes(v)}`);
      if (!parts.length) continue;
      seen.add(key);
      out.push({ key, verb, text: `${verb}: ${parts.join(", ")}` });
    }
  }
  return out;
}

function samplerView(report) {
  const stages = asArray(report.stages).filter(isObject);
  const topTimeline = asArray(report.timeline).length ? asArray(report.timeline) : asArray(report.records);
  let strips;
  if (stages.some((s) => asArray(s.timeline).length)) {
    strips = stages.map((s, i) => stripOf(asArray(s.timeline), stageLabel(s, i)));
  } else {
    strips = topTimeline.length ? [stripOf(topTimeline, null)] : [];
  }
  const cellCount = strips.reduce((n, s) => n + s.cells, 0);
  const counts = {};
  for (const strip of strips) for (const [code, n] of Object.entries(strip.counts)) counts[code] = (counts[code] ?? 0) + n;
  const countedReuse = Object.entries(counts).filter(([c]) => isReuseCode(c)).reduce((n, [, v]) => n + v, 0);

  const evaluations = finiteNumber(report.evaluations) ?? sumOver(stages, "evaluations") ?? cellCount;
  const reused = finiteNumber(report.reused) ?? sumOver(stages, "reused") ?? countedReuse;
  const computed = finiteNumber(report.computed) ?? sumOver(stages, "computed") ?? Math.max(evaluations - reused, 0);
  const totalSteps = finiteNumber(report.total_steps) ?? sumOver(stages, "total_steps");
  const counted = finiteNumber(report.counted);
  const mode = typeof report.mode === "string" ? report.mode : null;

  // Reuse by kind: the report's own table if it has one, else the timeline's codes.
  let byKind = [];
  if (isObject(report.reused_by_granularity)) {
    byKind = Object.entries(report.reused_by_granularity)
      .map(([g, n]) => [g, finiteNumber(n)])
      .filter(([, n]) => n);
  } else {
    byKind = Object.entries(counts).filter(([c]) => isReuseCode(c)).map(([c, n]) => [CODE_NAMES[c] ?? c, n]);
  }
  byKind.sort((a, b) => b[1] - a[1]);

  const speedup = finiteNumber(report.estimated_speedup);
  let speedupText = null;
  if (speedup !== null) speedupText = `${speedup.toFixed(2)}x est.`;
  else if (report.estimated_speedup === null && reused > 0 && computed === 0) speedupText = "∞ est.";

  let badge;
  if (mode === "off" || (!evaluations && !reused)) {
    badge = `LightCache ${mode ?? "off"}: nothing reused`;
  } else {
    badge = `⚡ ${speedupText ? speedupText + " · " : ""}${reused}/${evaluations} evals reused`;
  }

  const parts = [`computed ${computed}`, `reused ${reused}${byKind.length ? ` (${byKind.map(([g, n]) => `${g} ${n}`).join(", ")})` : ""}`];
  if (counted !== null && counted !== evaluations) parts.push(`${counted} counted`);
  if (totalSteps !== null) parts.push(`${totalSteps} steps`);
  if (mode) parts.push(mode);
  const countsLine = parts.join(" · ");

  const legend = Object.keys(CODE_COLORS)
    .filter((code) => counts[code])
    .map((code) => ({ code, color: CODE_COLORS[code], text: `${CODE_NAMES[code]} ${counts[code]}` }));
  if (counts["?"]) legend.push({ code: "?", color: UNKNOWN_COLOR, text: `other ${counts["?"]}` });

  const info = [];
  const stats = isObject(report.cache_stats) ? report.cache_stats : null;
  if (stats) {
    const offloaded = Math.max(finiteNumber(stats.bytes_to_host) ?? 0, finiteNumber(stats.host_bytes) ?? 0);
    let line = `cache: ${formatBytes(offloaded)} offloaded to CPU`;
    const peak = finiteNumber(stats.peak_device_bytes);
    if (peak) line += ` · device peak ${formatBytes(peak)}`;
    const entries = finiteNumber(stats.entries);
    if (entries) line += ` · ${entries} entries`;
    info.push(line);
  }
  for (const table of byteTables(report)) info.push(`cache ${table.text}`);
  const notes = asArray(report.notes).filter((n) => typeof n === "string" && n).map((n) => `note: ${n}`);

  return { kind: "sampler", badge, countsLine, strips, legend, info, notes: notes.slice(0, MAX_NOTES),
           cellCount, counts, evaluations, computed, reused, speedupText };
}

function decodeView(report) {
  const slices = finiteNumber(report.slices);
  const frames = finiteNumber(report.frames_per_slice);
  const peak = finiteNumber(report.peak_bytes);
  const path = typeof report.path === "string" ? report.path : null;
  // The path only when it is not the normal sliced one (e.g. a tiled fallback).
  const pathText = path && !path.includes("slice") ? ` (${path})` : "";
  const sliceText = slices === null ? "? slices" : `${slices} slice${slices === 1 ? "" : "s"}`;
  const badge = `${sliceText}${frames ? ` × ${frames} fr` : ""} · peak ${peak === null ? "?" : formatBytes(peak)}${pathText}`;
  const details = [];
  const seconds = formatSeconds(report.seconds);
  if (seconds) details.push(seconds);
  if (path) details.push(`path ${path}`);
  const info = details.length ? [`decode: ${details.join(" · ")}`] : [];
  const notes = asArray(report.notes).filter((n) => typeof n === "string" && n).map((n) => `note: ${n}`);
  return { kind: "decode", badge, countsLine: null, strips: [], legend: [], info, notes: notes.slice(0, MAX_NOTES),
           cellCount: 0, counts: {} };
}

// ---------------------------------------------------------------- view model -> DOM

function el(tag, style, text) {
  const e = document.createElement(tag);
  if (style) Object.assign(e.style, style);
  if (text != null) e.textContent = text;
  return e;
}

const TEXT_COLOR = "var(--descrip-text, #a1a1aa)";

function textLine(role, text) {
  const line = el("div", {
    height: `${LINE_H}px`, lineHeight: `${LINE_H}px`, fontSize: "11px", color: TEXT_COLOR,
    whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
  }, text);
  line.dataset.role = role;
  line.title = text;
  return line;
}

function viewHeight(view) {
  if (!view) return 0;
  let h = 2 * PAD + BADGE_H;
  if (view.countsLine) h += GAP + LINE_H;
  for (const strip of view.strips) {
    h += GAP + (strip.label ? STAGE_LABEL_H : 0) + Math.max(strip.rows.length, 1) * (ROW_H + ROW_GAP);
  }
  if (view.legend.length) h += LINE_H;
  h += (view.info.length + view.notes.length) * LINE_H;
  return h;
}

function renderStrip(strip) {
  const box = el("div", { marginTop: `${GAP}px` });
  box.dataset.role = "timeline";
  if (strip.label) {
    const label = el("div", { height: `${STAGE_LABEL_H}px`, lineHeight: `${STAGE_LABEL_H}px`, fontSize: "10px", color: TEXT_COLOR }, strip.label);
    label.dataset.role = "stage";
    box.appendChild(label);
  }
  const labelled = strip.rows.length > 1;
  for (const row of strip.rows) {
    const line = el("div", { display: "flex", alignItems: "center", height: `${ROW_H}px`, marginBottom: `${ROW_GAP}px` });
    line.dataset.branch = row.branch;
    if (labelled) {
      line.appendChild(el("span", { width: "40px", flex: "none", fontSize: "9px", lineHeight: `${ROW_H}px`, color: TEXT_COLOR, overflow: "hidden" }, row.branch.slice(0, 7)));
    }
    const cells = el("div", { display: "flex", flex: "1", height: "100%", gap: row.codes.length <= 120 ? "1px" : "0", minWidth: "0" });
    for (const code of row.codes) {
      const cell = el("i", { flex: "1", minWidth: "0", height: "100%", background: CODE_COLORS[code] ?? UNKNOWN_COLOR, borderRadius: "1px" });
      cell.dataset.code = code;
      cells.appendChild(cell);
    }
    line.appendChild(cells);
    box.appendChild(line);
  }
  return box;
}

function render(state) {
  const root = state.element;
  const view = state.view;
  root.replaceChildren();
  root.dataset.state = view ? (state.stale ? "stale" : "ready") : "empty";
  root.style.display = view ? "block" : "none";
  if (!view) return;
  root.style.opacity = state.stale ? "0.45" : "1";

  const badge = el("div", {
    display: "inline-block", maxWidth: "100%", boxSizing: "border-box", height: `${BADGE_H}px`, lineHeight: `${BADGE_H}px`,
    padding: "0 8px", borderRadius: "10px", fontSize: "12px", fontWeight: "600", color: "#ffffff",
    background: state.kind === "decode" ? "#1e3a5f" : "#14532d",
    whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis",
  }, view.badge);
  badge.dataset.role = "badge";
  badge.title = view.badge;
  root.appendChild(badge);

  if (view.countsLine) {
    const counts = textLine("counts", view.countsLine);
    counts.style.marginTop = `${GAP}px`;
    root.appendChild(counts);
  }
  for (const strip of view.strips) root.appendChild(renderStrip(strip));
  if (view.legend.length) {
    const legend = el("div", { display: "flex", gap: "10px", height: `${LINE_H}px`, alignItems: "center", overflow: "hidden", fontSize: "10px", color: TEXT_COLOR, whiteSpace: "nowrap" });
    legend.dataset.role = "legend";
    for (const item of view.legend) {
      const entry = el("span", { display: "inline-flex", alignItems: "center", gap: "3px" });
      entry.dataset.code = item.code;
      entry.appendChild(el("i", { width: "8px", height: "8px", background: item.color, display: "inline-block", borderRadius: "1px" }));
      entry.appendChild(document.createTextNode(item.text));
      legend.appendChild(entry);
    }
    root.appendChild(legend);
  }
  for (const line of view.info) root.appendChild(textLine("info", line));
  for (const line of view.notes) root.appendChild(textLine("note", line));
}

// ---------------------------------------------------------------- node hooks

function chain(object, name, fn) {
  const original = object[name];
  object[name] = function (...args) {
    const r = original?.apply(this, args);
    fn.apply(this, args);
    return r;
  };
}

function newState(kind, element) {
  return {
    kind, // "sampler" | "decode"
    element, // the DOM widget's element
    widget: null,
    report: null, // the last report dict from the node's UI output
    view: null, // what is shown, derived from the report (see samplerView / decodeView)
    stale: false, // a new run started; the old report is shown dimmed
    renders: 0, // how often the element was rebuilt (for tests)
  };
}

function applyReport(node, report) {
  const state = node.__lightcache;
  state.report = report;
  state.stale = false;
  try {
    state.view = state.kind === "sampler" ? samplerView(report) : decodeView(report);
  } catch (error) {
    console.warn(`[LightCache] could not read the ${state.kind} report of node ${node.id}:`, error);
    state.view = { kind: state.kind, badge: "LightCache: report unreadable (see the browser console)", countsLine: null,
                   strips: [], legend: [], info: [], notes: [], cellCount: 0, counts: {} };
  }
  state.element.dataset.lightcacheNode = String(node.id);
  render(state);
  state.renders += 1;
  // LiteGraph mode: the layout grows the node to the widget's new minimum height on the next
  // frame; Vue nodes size themselves from the DOM.
  node.setDirtyCanvas?.(true, true);
  app.canvas?.setDirty?.(true, true);
}

function setupNode(node, kind) {
  if (node.__lightcache) return;
  if (typeof node.addDOMWidget !== "function") {
    // A frontend without DOM widgets: the report output and progress text still show it.
    console.info("[LightCache] this frontend has no node.addDOMWidget; the run report is shown only as text.");
    return;
  }
  // contain: inline-size, so long lines never widen the node (they end in an ellipsis instead).
  const element = el("div", { boxSizing: "border-box", width: "100%", minWidth: "0", contain: "inline-size",
                               padding: `${PAD}px 2px`, overflow: "hidden", pointerEvents: "none", display: "none",
                               fontFamily: "var(--font-inter, sans-serif)" });
  element.className = CSS_CLASS;
  element.dataset.kind = kind;
  element.dataset.state = "empty";
  const state = newState(kind, element);
  node.__lightcache = state;
  trackedNodes.add(node);

  const widget = node.addDOMWidget(REPORT_WIDGET, "lightcache_report", element, {
    serialize: false, // not saved in the workflow, not sent with the prompt
    hideOnZoom: true,
    margin: MARGIN,
    getValue: () => "",
    setValue: () => {},
    getMinHeight: () => (state.view ? viewHeight(state.view) + 2 * MARGIN : 0),
    getMaxHeight: () => (state.view ? viewHeight(state.view) + 2 * MARGIN : 0),
  });
  widget.serialize = false; // workflow persistence (widgets_values)
  state.widget = widget;

  chain(node, "onExecuted", function (output) {
    if (!this.__lightcache || !output) return;
    const key = kind === "sampler" ? "lightcache_report" : "lightcache_decode";
    const value = output[key];
    const report = Array.isArray(value) ? value[value.length - 1] : value;
    if (!isObject(report)) return;
    applyReport(this, report);
  });

  chain(node, "onRemoved", function () {
    trackedNodes.delete(this);
    this.__lightcache = null;
  });
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    // A new run: keep the last report visible, dimmed, until the new one arrives.
    api.addEventListener("execution_start", () => {
      for (const node of trackedNodes) {
        const state = node.__lightcache;
        if (state?.view && !state.stale) {
          state.stale = true;
          render(state);
        }
      }
    });
  },

  nodeCreated(node) {
    const type = node.comfyClass ?? node.type;
    if (SAMPLER_TYPES.has(type)) setupNode(node, "sampler");
    else if (DECODE_TYPES.has(type)) setupNode(node, "decode");
  },
});

// For tests and debugging in the browser console.
window.__lightcache = { version: 2, extension: EXTENSION, widgetName: REPORT_WIDGET, cssClass: CSS_CLASS,
                        codeColors: CODE_COLORS, codeNames: CODE_NAMES, trackedNodes, samplerView, decodeView };
