// LightCache frontend extension: shows what the cache did, on the nodes themselves.
//
// Data flow (no custom server messages):
//  * while sampling, the Python side calls PromptServer.send_progress_text(text, node_id);
//    the frontend shows that text under the node natively ("$$node-text-preview" widget);
//  * after a run, LightCacheSampler returns ui={"lightcache_report": [RunReport.to_dict()]}
//    and SlicedVAEDecode returns ui={"lightcache_decode": [DecodeReport.to_dict()]}; the
//    frontend hands that dict to node.onExecuted(output), which we chain.
//
// What is drawn:
//  * LightCache Sampler: a badge over the title "<speedup>x est · <n>/<steps> steps reused"
//    (a step counts when at least one of its evaluations reused), a compact timeline
//    strip (one cell per model evaluation, one row per CFG branch, coloured by decision),
//    a colour key with counts, and the cache bytes offloaded to CPU RAM (+ the compute-device peak);
//  * Sliced VAE Decode: a badge with the slices used and the peak memory.
//
// Badges are native LGraphBadge objects (node.badges); where the frontend has none, a
// chained onDrawForeground draws the same pill. The timeline lives in a canvas widget
// without a value (serialize: false), so it reserves its own rows in the node and the
// native progress-text widget, which fills the node's bottom, never covers it.
//
// Current conventions only: app/api come from window.comfyAPI (no script imports), no
// build step, no dependencies. Drawing is cheap: everything is precomputed in onExecuted.
// A debug hook for tests and for curious users: node.__lightcache (see newState()).

const { app } = window.comfyAPI.app;
const { api } = window.comfyAPI.api;

const EXTENSION = "LightCache.RunReport";
const SAMPLER_TYPES = new Set(["LightCacheSampler"]);
const DECODE_TYPES = new Set(["SlicedVAEDecode"]);
const TIMELINE_WIDGET = "$$lightcache-timeline";

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
const GRANULARITY_TO_CODE = { full: "C", step: "S", cfg: "G", block: "B", deepcache: "D" };

const ROW_HEIGHT = 10;
const ROW_GAP = 2;
const STRIP_MARGIN = 15;
const INFO_LINE_HEIGHT = 13;
const LABEL_WIDTH = 38;

const trackedNodes = new Set();

function formatBytes(n) {
  n = Number(n) || 0;
  if (Math.abs(n) < 1024) return `${Math.round(n)} B`;
  for (const unit of ["KiB", "MiB", "GiB", "TiB"]) {
    n /= 1024;
    if (Math.abs(n) < 1024 || unit === "TiB") return `${n.toFixed(1)} ${unit}`;
  }
  return `${n.toFixed(1)} TiB`;
}

function newState(kind) {
  return {
    kind, // "sampler" | "decode"
    report: null, // the last report dict from the node's UI output
    badge: null, // badge text, null before the first run
    info: null, // summary lines drawn under the timeline (sampler only)
    rows: [], // [{branch, cells: [colour, ...]}] precomputed for drawing
    legend: [], // [{color, text}] one entry per decision present, with its count
    timelineCells: 0, // number of evaluation cells in the strip
    stale: false, // a new run started; the old report is drawn dimmed
    drawn: { badge: 0, timeline: 0 }, // frames that actually painted them (for tests)
    _badgeObj: null,
    _badgeKey: null,
  };
}

// ---------------------------------------------------------------- report -> view model

function codeOf(cell) {
  if (!cell || typeof cell !== "object") return "?";
  if (typeof cell.g === "string") return cell.g;
  if (cell.decision === "compute") return "C";
  return GRANULARITY_TO_CODE[cell.granularity] ?? "?";
}

function applySamplerReport(state, report) {
  state.report = report;
  state.stale = false;
  const timeline = Array.isArray(report.timeline)
    ? report.timeline
    : Array.isArray(report.records) ? report.records : [];

  // Rows per CFG branch, in order of first appearance; one cell per evaluation.
  const rowsByBranch = new Map();
  const steps = new Map(); // step -> {evals, reused}
  for (const cell of timeline) {
    const branch = String(cell?.branch ?? "all");
    if (!rowsByBranch.has(branch)) rowsByBranch.set(branch, []);
    const code = codeOf(cell);
    rowsByBranch.get(branch).push(CODE_COLORS[code] ?? UNKNOWN_COLOR);
    const s = steps.get(cell?.step) ?? { evals: 0, reused: 0 };
    s.evals += 1;
    if (code !== "C") s.reused += 1;
    steps.set(cell?.step, s);
  }
  state.rows = [...rowsByBranch.entries()].map(([branch, cells]) => ({ branch, cells }));
  state.timelineCells = timeline.length;
  const counts = {};
  for (const cell of timeline) counts[codeOf(cell)] = (counts[codeOf(cell)] ?? 0) + 1;
  state.legend = Object.keys(CODE_COLORS)
    .filter((code) => counts[code])
    .map((code) => ({ color: CODE_COLORS[code], text: `${CODE_NAMES[code]} ${counts[code]}` }));

  const evaluations = report.evaluations ?? timeline.length;
  const reused = report.reused ?? timeline.filter((c) => codeOf(c) !== "C").length;
  const totalSteps = report.total_steps ?? steps.size;
  // A step counts as reused when at least one of its evaluations reused cached work.
  const stepsReused = [...steps.values()].filter((s) => s.reused > 0).length;
  const speedup = report.estimated_speedup;
  const speedupText = typeof speedup === "number" && isFinite(speedup) ? `${speedup.toFixed(2)}x` : speedup === null && reused > 0 ? "∞" : "1.00x";

  if (report.mode === "off" || (!timeline.length && !reused)) {
    state.badge = `LightCache ${report.mode ?? "off"}: nothing reused`;
  } else {
    state.badge = `⚡ ${speedupText} est · ${stepsReused}/${totalSteps} steps reused`;
  }

  state.info = [];
  if (report.cache_stats) {
    const stats = report.cache_stats;
    const offloaded = Math.max(Number(stats.bytes_to_host) || 0, Number(stats.host_bytes) || 0);
    let line = `cache: ${formatBytes(offloaded)} offloaded to CPU`;
    if (stats.peak_device_bytes) line += ` · device peak ${formatBytes(stats.peak_device_bytes)}`;
    state.info.push(line);
  }
}

function applyDecodeReport(state, report) {
  state.report = report;
  state.stale = false;
  state.rows = [];
  state.legend = [];
  state.timelineCells = 0;
  const slices = report.slices ?? "?";
  const frames = report.frames_per_slice;
  const peak = report.peak_bytes;
  // The path only when it is not the normal sliced one (e.g. a tiled fallback).
  const path = report.path && !String(report.path).includes("slice") ? ` (${report.path})` : "";
  state.badge = `${slices} slice${slices === 1 ? "" : "s"}${frames ? ` × ${frames} fr` : ""} · peak ${peak == null ? "?" : formatBytes(peak)}${path}`;
  state.info = null;
}

// ---------------------------------------------------------------- drawing

function badgeFor(state) {
  const text = state?.badge ?? "";
  const key = `${text}|${state?.stale ? 1 : 0}`;
  if (state._badgeObj && state._badgeKey === key) return state._badgeObj;
  const Badge = window.LGraphBadge;
  const badge = new Badge({
    text,
    fgColor: state.stale ? "#a1a1aa" : "#ffffff",
    bgColor: state.kind === "decode" ? "#1e3a5f" : "#14532d",
  });
  const draw = badge.draw;
  badge.draw = function (...args) {
    if (this.visible) state.drawn.badge += 1;
    return draw.apply(this, args);
  };
  state._badgeObj = badge;
  state._badgeKey = key;
  return badge;
}

function attachBadge(node) {
  // Native node badges (drawn above the title bar by LGraphNode.drawBadges); the
  // callback is evaluated every frame and returns a cached LGraphBadge.
  if (!window.LGraphBadge || !Array.isArray(node.badges)) return false;
  const state = node.__lightcache;
  if (!node.__lightcacheBadgeFn) node.__lightcacheBadgeFn = () => badgeFor(state);
  if (!node.badges.includes(node.__lightcacheBadgeFn)) node.badges.push(node.__lightcacheBadgeFn);
  return true;
}

// Fallback when the frontend has no LGraphBadge: a pill above the title, from onDrawForeground.
function drawFallbackBadge(ctx, node, state) {
  if (!state.badge) return;
  const titleH = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  ctx.save();
  ctx.font = "12px sans-serif";
  const w = ctx.measureText(state.badge).width + 12;
  const x = node.size[0] - w;
  const y = -titleH - 22;
  ctx.fillStyle = state.kind === "decode" ? "#1e3a5f" : "#14532d";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, 20, 5);
  else ctx.rect(x, y, w, 20);
  ctx.fill();
  ctx.fillStyle = state.stale ? "#a1a1aa" : "#ffffff";
  ctx.textBaseline = "middle";
  ctx.fillText(state.badge, x + 6, y + 11);
  ctx.restore();
  state.drawn.badge += 1;
}

function timelineHeight(state) {
  if (!state.report) return 0;
  const rows = Math.max(state.rows.length, 1);
  const lines = (state.info?.length ?? 0) + (state.legend.length ? 1 : 0);
  return 6 + rows * (ROW_HEIGHT + ROW_GAP) + lines * INFO_LINE_HEIGHT + 4;
}

// The info lines shortened to fit the node; recomputed only when the width or text changes.
function fitLines(ctx, state, width) {
  if (state._fit && state._fit.width === width && state._fit.info === state.info) return state._fit.lines;
  const lines = state.info.map((line) => {
    let text = line;
    while (text.length > 8 && ctx.measureText(text).width > width) text = text.slice(0, -2);
    return text === line ? line : text.slice(0, -1) + "…";
  });
  state._fit = { width, info: state.info, lines };
  return lines;
}

function drawTimeline(ctx, node, width, y, state) {
  if (!state.report) return;
  const labelW = state.rows.length > 1 ? LABEL_WIDTH : 0;
  const x0 = STRIP_MARGIN + labelW;
  const w = Math.max(width - 2 * STRIP_MARGIN - labelW, 10);
  ctx.save();
  ctx.globalAlpha = state.stale ? 0.4 : 1;
  ctx.font = "9px sans-serif";
  ctx.textBaseline = "middle";
  ctx.textAlign = "left";
  const textColor = window.LiteGraph?.WIDGET_SECONDARY_TEXT_COLOR ?? "#aaaaaa";
  let rowY = y + 6;
  if (!state.rows.length) {
    ctx.fillStyle = UNKNOWN_COLOR;
    ctx.fillRect(x0, rowY, w, ROW_HEIGHT);
    rowY += ROW_HEIGHT + ROW_GAP;
  }
  const maxCells = state.rows.reduce((m, r) => Math.max(m, r.cells.length), 1);
  const cellW = w / maxCells;
  const gap = cellW >= 4 ? 1 : 0;
  for (const row of state.rows) {
    if (labelW) {
      ctx.fillStyle = textColor;
      ctx.fillText(row.branch.slice(0, 6), STRIP_MARGIN, rowY + ROW_HEIGHT / 2);
    }
    for (let i = 0; i < row.cells.length; i++) {
      ctx.fillStyle = row.cells[i];
      ctx.fillRect(x0 + i * cellW, rowY, Math.max(cellW - gap, 0.5), ROW_HEIGHT);
    }
    rowY += ROW_HEIGHT + ROW_GAP;
  }
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  const textW = width - 2 * STRIP_MARGIN;
  if (state.legend.length) {
    // Colour key with counts: "■ computed 14  ■ step 18".
    let x = STRIP_MARGIN;
    for (const item of state.legend) {
      const itemW = 11 + ctx.measureText(item.text).width;
      if (x + itemW > STRIP_MARGIN + textW) break;
      ctx.fillStyle = item.color;
      ctx.fillRect(x, rowY + 3, 8, 8);
      ctx.fillStyle = textColor;
      ctx.fillText(item.text, x + 11, rowY + 2);
      x += itemW + 10;
    }
    rowY += INFO_LINE_HEIGHT;
  }
  if (state.info?.length) {
    ctx.fillStyle = textColor;
    for (const text of fitLines(ctx, state, textW)) {
      ctx.fillText(text, STRIP_MARGIN, rowY + 2);
      rowY += INFO_LINE_HEIGHT;
    }
  }
  ctx.restore();
  state.drawn.timeline += 1;
}

// A canvas widget that reserves room for the timeline in the node's widget stack (so
// the native progress-text widget, which fills the node's bottom, never covers it).
function addTimelineWidget(node) {
  if (node.widgets?.some((w) => w.name === TIMELINE_WIDGET)) return;
  const state = node.__lightcache;
  const widget = {
    name: TIMELINE_WIDGET,
    type: "lightcache_timeline",
    value: "",
    serialize: false,
    options: { serialize: false },
    draw(ctx, n, width, y) {
      drawTimeline(ctx, n, width, y, state);
    },
    computeSize(width) {
      return [width ?? 0, timelineHeight(state)];
    },
  };
  node.addCustomWidget(widget);
}

function growToFit(node) {
  // Make room for a timeline that just appeared (never shrink what the user sized).
  try {
    const size = node.computeSize?.();
    if (size && node.size[1] < size[1]) node.setSize([Math.max(node.size[0], size[0]), size[1]]);
  } catch (e) {
    /* sizing is cosmetic */
  }
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

function setupNode(node, kind) {
  if (node.__lightcache) return;
  node.__lightcache = newState(kind);
  trackedNodes.add(node);
  if (kind === "sampler") addTimelineWidget(node);
  const native = attachBadge(node);

  chain(node, "onExecuted", function (output) {
    const state = this.__lightcache;
    if (!state || !output) return;
    const key = state.kind === "sampler" ? "lightcache_report" : "lightcache_decode";
    const value = output[key];
    const report = Array.isArray(value) ? value[value.length - 1] : value;
    if (!report || typeof report !== "object") return;
    if (state.kind === "sampler") applySamplerReport(state, report);
    else applyDecodeReport(state, report);
    attachBadge(this); // re-attach if something replaced node.badges
    if (state.kind === "sampler") growToFit(this);
    this.setDirtyCanvas?.(true, true);
  });

  if (!native) {
    chain(node, "onDrawForeground", function (ctx) {
      const state = this.__lightcache;
      if (state && !this.flags?.collapsed) drawFallbackBadge(ctx, this, state);
    });
  }

  chain(node, "onRemoved", function () {
    trackedNodes.delete(this);
    if (Array.isArray(this.badges) && this.__lightcacheBadgeFn) {
      this.badges = this.badges.filter((b) => b !== this.__lightcacheBadgeFn);
    }
    this.__lightcache = null;
  });
}

app.registerExtension({
  name: EXTENSION,

  async setup() {
    // A new run: keep the last report visible, dimmed, until the new one arrives.
    api.addEventListener("execution_start", () => {
      for (const node of trackedNodes) {
        if (node.__lightcache?.report) {
          node.__lightcache.stale = true;
          node.setDirtyCanvas?.(true, false);
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
window.__lightcache = { version: 1, extension: EXTENSION, codeColors: CODE_COLORS, codeNames: CODE_NAMES, trackedNodes };
