// KernelWatch dashboard: the ES module TensorBoard loads into the plugin's iframe.
//
// Every name from the log (runs, layers, labels, messages) reaches the page through
// textContent, DOM properties or canvas text only, never innerHTML; chart tooltips use
// ECharts' canvas ("richText") mode. Names are shown with control characters escaped
// (`shown`), so a bidi override (U+202E) in a name cannot reverse what is displayed.
//
// Live: the page asks `runs` every POLL_MS (TensorBoard reloads its logs every 5 s by
// default) and when TensorBoard says it reloaded, and redraws only the runs whose newest
// record moved, keeping every selection and the scroll position. Paused while hidden.
import * as echarts from "./static/echarts.esm.min.js";

const BASE = new URL("./", import.meta.url);
// Light enough to stand out on the dark end of the heat map.
const SEVERITY_COLOURS = { info: "#8cd17d", warning: "#f28e2b", error: "#e15759" };
const MAX_ANOMALY_ROWS = 200;
/** TensorBoard's data reloads every 5 s by default (`--reload_interval`): ask at that pace. */
const POLL_MS = 5000;
const STORAGE_KEY = "kernelwatch.selection";
const GREY = "#bab0ac";

const LENS_LABELS = { weights: "weights", update: "update (W − W₀)" };
const LENS_NOTE = "Update lens: the cumulative change W − W₀ of each kernel since the run's first snapshot, " +
  "i.e. what training wrote into the kernels. The first snapshot has no update.";
const NULL_NOTE = "Chance is measured twice per layer: the shuffled null (the same kernels with their weights " +
  "spatially shuffled) and the smooth null (random kernels as smooth as the layer's, with no pattern: smooth " +
  "noise often looks like a first derivative). Structure above chance is measured against the stricter of the two.";

const BLUES = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b"];
// Orange below chance, white at chance, blue above: blue always means "more structure".
const DIVERGING = ["#b35806", "#f1a340", "#fee0b6", "#f7f7f7", "#c6dbef", "#4292c6", "#08306b"];

const ceilTo = (x, unit) => Math.ceil(x / unit - 1e-9) * unit;
const floorTo = (x, unit) => Math.floor(x / unit + 1e-9) * unit;

const known = (xs) => xs.filter((x) => x !== null && x !== undefined);
/** ``value`` less what chance gives by the stricter of the ``nulls`` (``pick``: Math.max for a
 * share, Math.min for a dissimilarity, negated with ``sign``); null when either is unknown. */
function aboveChance(value, nulls, pick, sign = 1) {
  const measured = known(nulls);
  return value === null || value === undefined || !measured.length ? null : sign * (value - pick(...measured));
}
const divergingScale = (lo, hi) => {
  const m = Math.max(0.05, ceilTo(Math.max(Math.abs(lo), Math.abs(hi)), 0.05));
  return { min: -m, max: m, colours: DIVERGING, text: [`+${num(m)}: structured`, `−${num(m)}`] };
};

/** Heat-map measures: the backend measures each asks for, how they combine, colour scale, legend. */
const MEASURES = {
  clustered_fraction: {
    label: "clustered fraction",
    fields: ["clustered_fraction"],
    value: ([fraction]) => fraction,
    scale: () => ({ min: 0, max: 1, colours: BLUES, text: ["1: all clustered", "0"] }),
    legend: "Share of the layer's kernels within the spectrum's threshold of a DoG pattern (the paper's " +
      "measure). Darker: more clustered.",
  },
  structure: {
    label: "structure above chance",
    fields: ["clustered_fraction", "null_clustered_fraction", "smooth_null_clustered_fraction"],
    value: ([fraction, ...nulls]) => aboveChance(fraction, nulls, Math.max),
    detail: ([fraction, shuffled, smooth]) => `\nclustered ${fixed(fraction)}, chance ${fixed(Math.max(...known([shuffled, smooth])))} ` +
      `(shuffled ${fixed(shuffled)}, smooth ${fixed(smooth)})`,
    scale: divergingScale,
    legend: "Clustered fraction less the stricter null's. Blue: more of the layer's kernels match a pattern than " +
      "chance gives; white: chance level.",
  },
  median_dissimilarity: {
    label: "median dissimilarity",
    fields: ["median_dissimilarity"],
    value: ([median]) => median,
    scale: (lo, hi) => {
      const min = Math.max(0, floorTo(lo, 0.1));
      const max = Math.max(min + 0.1, ceilTo(hi, 0.1));
      return { min, max, colours: [...BLUES].reverse(), text: [`${num(max)}: far from every pattern`, `${num(min)}: close`] };
    },
    legend: "Median 1 − cos between each kernel and its nearest DoG prototype. Darker: closer to the " +
      "patterns. It falls long before kernels cross the clustering threshold.",
  },
  closer: {
    label: "closer than chance",
    fields: ["median_dissimilarity", "null_median_dissimilarity", "smooth_null_median_dissimilarity"],
    value: ([median, ...nulls]) => aboveChance(median, nulls, Math.min, -1),
    detail: ([median, shuffled, smooth]) => `\nchance ${fixed(Math.min(...known([shuffled, smooth])))} ` +
      `(shuffled ${fixed(shuffled)}, smooth ${fixed(smooth)}) − median ${fixed(median)}`,
    scale: divergingScale,
    legend: "The stricter null's median dissimilarity less the layer's. Blue: the kernels are closer to the " +
      "patterns than chance puts them, long before they cross the clustering threshold; white: chance level.",
  },
};

const state = {
  meta: null, run: null, layer: null, compare: "", lens: "weights", measure: "clustered_fraction",
  step: null, // the sprite's snapshot; null follows the latest
  firstStep: null, // the first-layer card's snapshot; null follows the latest
  cluster: "",
};

// -- DOM helpers ------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

// C0/C1 controls, bidi embeddings, overrides, isolates and marks, zero-width characters.
const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]/g;

/** A name from the log as displayed: invisible and bidi control characters written as `\uXXXX`. */
function shown(name) {
  return String(name ?? "").replace(INVISIBLE, (c) => `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}`);
}

/** A name inside running text, isolated so right-to-left letters in it cannot reorder its neighbours. */
const nameNode = (name) => el("bdi", { className: "kw-name" }, shown(name));

/** A colour from a log is used only if it is a plain `#rrggbb`. */
const safeColour = (colour, fallback = GREY) => (typeof colour === "string" && /^#[0-9a-fA-F]{6}$/.test(colour) ? colour : fallback);

function message(text, kind = "error") {
  return el("div", { className: `kw-message kw-${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** Show a view's record errors (malformed or newer-version data) above it. */
function errorList(errors) {
  if (!errors || !errors.length) return null;
  const shownErrors = errors.slice(0, 5).map((e) => el("li", {}, shown(e)));
  if (errors.length > 5) shownErrors.push(el("li", {}, `… and ${errors.length - 5} more`));
  return el("div", { className: "kw-message kw-error", role: "alert" },
    "Some KernelWatch records could not be read:", el("ul", {}, ...shownErrors));
}

function card(id, title) {
  const body = el("div", { className: "kw-body" });
  const heading = el("h2", {}, title);
  const controls = el("div", { className: "kw-card-controls" });
  const node = el("section", { className: "kw-card", id }, heading, controls, body);
  return { node, body, heading, controls };
}

async function getJSON(route, params = {}) {
  const url = new URL(route, BASE);
  for (const [key, value] of Object.entries(params)) if (value !== null && value !== undefined) url.searchParams.set(key, value);
  const response = await fetch(url, { cache: "no-store" });
  let body;
  try {
    body = await response.json();
  } catch {
    throw Object.assign(new Error(`${route}: HTTP ${response.status}, not JSON`), { status: response.status });
  }
  if (!response.ok) throw Object.assign(new Error(body.error || `${route}: HTTP ${response.status}`), { status: response.status });
  return body;
}

/** The `.kw-chart` box of a view, reused across redraws so a live update does not flash. */
function chartBox(node, height) {
  const box = node.querySelector(":scope > .kw-chart") ?? el("div", { className: "kw-chart" });
  box.style.height = `${height}px`;
  return box;
}

/** The chart in a box that is in the document (ECharts measures it), sized to it. */
function chartOf(box) {
  const existing = echarts.getInstanceByDom(box);
  if (existing) {
    existing.resize();
    return existing;
  }
  return echarts.init(box, null, { renderer: "canvas" });
}

/** Replace a view's content, disposing charts it drops. */
function show(node, ...children) {
  const before = [...node.querySelectorAll(".kw-chart")];
  node.replaceChildren(...children.filter(Boolean));
  for (const box of before) if (!box.isConnected) echarts.getInstanceByDom(box)?.dispose();
}

/** The picture at ``url``, decoded, or null if it does not load: a card swaps in only loaded
 * pictures, so it never shows a blank frame. */
async function loaded(url) {
  const picture = new Image();
  picture.src = url.href;
  try {
    await picture.decode();
    return picture;
  } catch {
    return null;
  }
}

function family(label) {
  const name = String(label).split("/")[0];
  return name in state.meta.colours ? name : "other";
}

const fixed = (x, digits = 3) => (x === null || x === undefined || !Number.isFinite(Number(x)) ? "n/a" : Number(x).toFixed(digits));
/** A number with at most `digits` decimals and no trailing zeros (0.059999… → 0.06). */
const num = (x, digits = 3) => (x === null || x === undefined || !Number.isFinite(Number(x)) ? "n/a" : String(Number(Number(x).toFixed(digits))));
const integerTick = (v) => (Number.isInteger(v) ? String(v) : "");
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

/** A generation counter per view: answers to superseded requests are dropped. */
const generations = {};
function ticket(view) {
  const n = (generations[view] ?? 0) + 1;
  generations[view] = n;
  return () => generations[view] === n;
}

// -- selection --------------------------------------------------------------------------------

function saveSelection() {
  const { run, layer, compare, lens, measure, step, cluster } = state;
  try {
    sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ run, layer, compare, lens, measure, step, cluster }));
  } catch {
    // Storage may be disabled; the selection then lasts as long as the page.
  }
}

function loadSelection() {
  try {
    const saved = JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch {
    return {};
  }
}

const runOf = (name) => state.meta.runs.find((r) => r.run === name);
const readableRuns = (meta) => meta.runs.filter((r) => r.layers.length || r.spectra.length || r.has_anomalies);
const hasAnomalies = (run) => !!runOf(run)?.has_anomalies;
const lensNote = () => (state.lens === "weights" ? null : el("p", { className: "kw-caption kw-lens-note" }, LENS_NOTE));

// -- views ------------------------------------------------------------------------------------

/** Heat-map marks `[step index, layer index, worst severity, count]` from the anomaly list. */
function marksOf(data, anomalies) {
  const row = new Map(data.layers.map((layer, i) => [layer, i]));
  const column = new Map(data.steps.map((step, i) => [step, i]));
  const severities = state.meta.severities;
  const marks = new Map();
  for (const a of anomalies ? anomalies.anomalies : []) {
    if (!row.has(a.layer) || !column.has(a.step)) continue;
    const key = `${column.get(a.step)},${row.get(a.layer)}`;
    const mark = marks.get(key) ?? [column.get(a.step), row.get(a.layer), severities[0], 0];
    mark[3] += 1;
    if (severities.indexOf(a.severity) > severities.indexOf(mark[2])) mark[2] = a.severity;
    marks.set(key, mark);
  }
  return [...marks.values()];
}

/** A measure's layers x steps matrix, from one heatmap request per backend measure it needs. */
async function loadHeatmap(run, lens, measureKey) {
  const measure = MEASURES[measureKey];
  const parts = await Promise.all(measure.fields.map((field) => getJSON("heatmap", { run, lens, measure: field })));
  const [first] = parts;
  const lookups = parts.map((part) => new Map(part.layers.map((layer, i) =>
    [layer, new Map(part.steps.map((step, j) => [step, part.values[i][j]]))])));
  const steps = [...new Set(parts.flatMap((part) => part.steps))].sort((a, b) => a - b);
  const inputs = first.layers.map((layer) => steps.map((step) => lookups.map((lookup) => lookup.get(layer)?.get(step) ?? null)));
  const values = inputs.map((row) => row.map((xs) => measure.value(xs)));
  return {
    run, lens, measure: measureKey, layers: first.layers, steps, values, inputs,
    sampled_layers: Math.max(...parts.map((part) => part.sampled_layers)),
    errors: [...new Set(parts.flatMap((part) => part.errors))],
  };
}

/** 1. Layers x snapshots, coloured by the chosen measure; anomalies as triangles. */
function drawHeatmap(node, data, anomalies, onPick, { captions = true } = {}) {
  const measure = MEASURES[data.measure];
  const notes = [errorList(data.errors)];
  if (!data.layers.length) {
    const text = data.lens === "weights" ? "This run has no classified layers."
      : "This run has no update-lens records yet. The update lens starts at a run's second snapshot, " +
        "and logs written before format version 2 have none.";
    show(node, ...notes, message(text, "info"));
    return;
  }
  if (data.thinned) {
    notes.push(message(`More snapshots than columns: ${data.steps.length} steps spread over the run, ` +
      "each cell a layer's latest value since the column before.", "info"));
  } else if (data.sampled_layers) {
    notes.push(message(`${data.sampled_layers} layer(s) show a sample of their snapshots. ` +
      `Restart TensorBoard with ${state.meta.sampling.flag} to see all.`, "warning"));
  }
  const marks = marksOf(data, anomalies);
  const cells = data.values.flatMap((row, y) => row.flatMap((value, x) => (value === null ? [] : [[x, y, value]])));
  const present = cells.map((c) => c[2]);
  const scale = measure.scale(present.length ? Math.min(...present) : 0, present.length ? Math.max(...present) : 1);
  if (!cells.length) notes.push(message(`No ${measure.label} in these records (logs before format version 2 lack the structure measures).`, "info"));
  const box = chartBox(node, Math.max(160, 16 * data.layers.length + 96));
  // Early in training the clustered fraction is ~0 everywhere while structure already shows.
  const hint = data.measure === "clustered_fraction" && present.length && Math.max(...present) < 0.05
    ? " Still near 0 everywhere: “closer than chance” shows structure long before kernels cluster." : "";
  const caption = el("p", { className: "kw-caption" }, measure.legend, hint,
    measure.fields.some((f) => f.startsWith("null")) ? ` ${NULL_NOTE}` : "",
    marks.length ? " Triangles: anomaly flags, coloured by the most severe." : "");
  show(node, ...notes, box, ...(captions ? [caption, lensNote()] : []));
  const layerNames = data.layers.map(shown);
  const stepLabels = data.steps.map(String);
  const c = chartOf(box);
  // `data-painted` appears once ECharts has drawn this data (it paints on an animation frame).
  delete box.dataset.painted;
  c.off("finished");
  c.on("finished", () => { box.dataset.painted = "1"; });
  c.setOption({
    animation: false,
    tooltip: {
      renderMode: "richText",
      formatter: (p) => {
        const [x, y] = p.value;
        const where = `${layerNames[y]}\nstep ${stepLabels[x]}: `;
        if (p.seriesIndex === 1) return `${where}${plural(p.value[3], "anomaly flag")} (${p.value[2]})`;
        const detail = measure.detail ? measure.detail(data.inputs[y][x]) : "";
        return `${where}${measure.label} ${fixed(p.value[2])}${detail}`;
      },
    },
    grid: { left: 10, right: 20, top: 10, bottom: 76, containLabel: true },
    xAxis: { type: "category", data: stepLabels, name: "step", nameLocation: "middle", nameGap: 28, splitArea: { show: false } },
    yAxis: { type: "category", data: layerNames, inverse: true, axisLabel: { width: 220, overflow: "truncate" } },
    visualMap: {
      type: "continuous", min: scale.min, max: scale.max, orient: "horizontal", left: "center", bottom: 0,
      itemHeight: 180, seriesIndex: 0, text: scale.text, textStyle: { fontSize: 11 },
      inRange: { color: scale.colours }, formatter: (v) => num(v, 2),
    },
    series: [
      { type: "heatmap", data: cells, progressive: 0 },
      {
        type: "scatter", symbol: "triangle", symbolSize: 11, z: 3,
        data: marks.map(([x, y, severity, count]) => ({
          value: [x, y, severity, count], itemStyle: { color: SEVERITY_COLOURS[severity], borderColor: "#fff", borderWidth: 1 },
        })),
      },
    ],
  }, true);
  c.off("click");
  c.on("click", (p) => onPick(data.layers[p.value[1]], data.steps[p.value[0]]));
  Object.assign(box.dataset, {
    cells: String(cells.length), marks: String(marks.length), steps: String(data.steps.length),
    layerNames: JSON.stringify(data.layers), measure: data.measure, lens: data.lens,
    digest: present.reduce((sum, v) => sum + v, 0).toFixed(4),
  });
}

const hasValues = (values) => Array.isArray(values) && values.some((v) => v !== null && v !== undefined);
/** The two nulls' figures in a `clustered_fraction` series, and how their lines are drawn. */
const NULL_LINES = [
  { name: "shuffled null", prefix: "null_", type: "dashed", colour: "#212121", width: 1.5 },
  { name: "smooth null", prefix: "smooth_null_", type: "dotted", colour: "#7f2704", width: 2.5 },
];

/** Per family, at each step of ``proportions``, its share less the stricter null's share of it
 * (``nulls``: the timeline's `null_proportions`); null when the log has none (before format 3). */
function familiesAboveChance(proportions, nulls) {
  if (!nulls || !nulls.steps.length) return null;
  const at = new Map(nulls.steps.map((step, i) => [step, i]));
  return Object.fromEntries(Object.entries(proportions.series).map(([family, shares]) => [family,
    proportions.steps.map((step, i) => (at.has(step)
      ? aboveChance(shares[i], Object.values(nulls.series).map((rows) => rows[at.get(step)]?.[family]), Math.max)
      : null))]));
}

/**
 * 2. A layer over its snapshots: stacked cluster proportions (top edge = clustered fraction)
 * with both nulls' clustered fractions; each family's share above chance; median dissimilarity
 * and its nulls; variance entropy (weights lens): each on an axis of its own.
 */
function drawTimeline(node, data, { captions: withCaptions = true } = {}) {
  const notes = [errorList(data.errors)];
  if (data.thinned && data.thinned.length) {
    notes.push(message("This layer has more snapshots than a timeline shows: a sample of them, spread over the run with the latest, is drawn.", "info"));
  } else if (data.sampled && data.sampled.length) {
    notes.push(message(`Only a sample of this layer's snapshots is shown. Restart TensorBoard with ${state.meta.sampling.flag}.`, "warning"));
  }
  const { proportions, clustered_fraction: fraction, quality } = data;
  if (!proportions) {
    show(node, ...notes, message("This layer has no cluster proportions (quality metrics only).", "info"));
    return;
  }
  const figures = fraction?.series ?? {};
  const pairs = (steps, values) => steps.map((step, i) => [step, values[i] ?? null]);
  const structure = hasValues(figures.median_dissimilarity) || hasValues(figures.null_median_dissimilarity);
  const families = familiesAboveChance(proportions, data.null_proportions);
  const entropy = quality && hasValues(quality.series.variance_entropy);
  const allSteps = [proportions.steps, fraction?.steps ?? [], quality?.steps ?? []].flat();
  if (!allSteps.length) {
    show(node, ...notes, message("This layer has no snapshots yet.", "info"));
    return;
  }
  const first = Math.min(...allSteps);
  const last = Math.max(...allSteps);
  const single = proportions.steps.length === 1;

  // Grids stacked top to bottom, pixel heights; the step axis is labelled on the last only.
  const panels = [{ height: 220, name: "share of kernels" }];
  if (families) panels.push({ height: 120, name: "above chance" });
  if (structure) panels.push({ height: 120, name: "median 1 − cos" });
  if (entropy) panels.push({ height: 90, name: "var. entropy" });
  let top = 28;
  const grids = panels.map((panel, i) => {
    const grid = { left: 62, right: 24, top, height: panel.height };
    top += panel.height + (i === panels.length - 1 ? 0 : 34);
    return grid;
  });
  const legendTop = top + 40;
  const height = legendTop + 64;
  const xAxes = grids.map((_, i) => ({
    type: "value", gridIndex: i, min: first, max: last > first ? last : first + 1, minInterval: 1,
    axisLabel: { show: i === grids.length - 1, formatter: integerTick, hideOverlap: true },
    name: i === grids.length - 1 ? "step" : "", nameLocation: "middle", nameGap: 24,
  }));
  const axisName = (name) => ({ name, nameLocation: "middle", nameGap: 42, nameTextStyle: { fontSize: 11 } });
  const yAxes = [
    { type: "value", gridIndex: 0, min: 0, max: 1, ...axisName(panels[0].name) },
  ];
  const series = Object.entries(proportions.series).map(([cluster, values]) => ({
    name: cluster, type: "line", stack: "share", symbol: single ? "circle" : "none", areaStyle: { opacity: 0.85 },
    lineStyle: { width: 0.5 }, color: safeColour(state.meta.colours[cluster]), xAxisIndex: 0, yAxisIndex: 0,
    data: pairs(proportions.steps, values),
  }));
  const nullLine = (line, figure, axis) => ({
    name: `${line.name}: ${figure.replaceAll("_", " ")}`, type: "line", symbol: "none", z: 4, xAxisIndex: axis,
    yAxisIndex: axis, lineStyle: { type: line.type, width: line.width, color: line.colour }, color: line.colour,
    data: pairs(fraction.steps, figures[line.prefix + figure]),
  });
  for (const line of NULL_LINES) {
    if (fraction && hasValues(figures[`${line.prefix}clustered_fraction`])) series.push(nullLine(line, "clustered_fraction", 0));
  }
  if (families) {
    const index = yAxes.length;
    yAxes.push({
      type: "value", gridIndex: index, ...axisName(panels[index].name), axisLabel: { formatter: (v) => num(v, 2) },
      min: (v) => Math.min(-0.1, floorTo(v.min, 0.1)), max: (v) => Math.max(0.1, ceilTo(v.max, 0.1)),
    });
    for (const [family, values] of Object.entries(families)) {
      if (!hasValues(values)) continue;
      series.push({
        name: family, type: "line", symbol: single ? "circle" : "none", xAxisIndex: index, yAxisIndex: index,
        lineStyle: { width: 1.5 }, color: safeColour(state.meta.colours[family]), data: pairs(proportions.steps, values),
      });
    }
  }
  if (structure) {
    const index = yAxes.length;
    yAxes.push({
      type: "value", gridIndex: index, ...axisName(panels[index].name),
      min: (v) => Math.max(0, floorTo(v.min - 0.02, 0.1)),
      max: (v) => Math.max(floorTo(v.min - 0.02, 0.1) + 0.1, ceilTo(v.max + 0.02, 0.1)),
      axisLabel: { formatter: (v) => num(v, 2) },
    });
    series.push({
      name: "median dissimilarity", type: "line", symbol: "circle", symbolSize: 4, xAxisIndex: index, yAxisIndex: index,
      lineStyle: { width: 2, color: "#08306b" }, color: "#08306b", data: pairs(fraction.steps, figures.median_dissimilarity),
    });
    for (const line of NULL_LINES) {
      if (hasValues(figures[`${line.prefix}median_dissimilarity`])) series.push(nullLine(line, "median_dissimilarity", index));
    }
  }
  if (entropy) {
    const index = yAxes.length;
    yAxes.push({
      type: "value", gridIndex: index, min: 0, max: (v) => Math.max(1, ceilTo(v.max, 0.5)), interval: 0.5,
      ...axisName(panels[index].name), axisLabel: { formatter: (v) => num(v, 2) },
    });
    series.push({
      name: "variance entropy", type: "line", symbol: "circle", symbolSize: 3, xAxisIndex: index, yAxisIndex: index,
      lineStyle: { color: "#6a3d9a" }, color: "#6a3d9a", data: pairs(quality.steps, quality.series.variance_entropy),
    });
  }
  const box = chartBox(node, height);
  const captions = [el("p", { className: "kw-caption" },
    "Areas: each pattern family's share of the layer's kernels; their top edge is the clustered fraction.",
    families ? " Above chance: each family's share less the stricter null's share of it; which families beat chance, " +
      "smoothness included." : "",
    structure ? " Median 1 − cos: dissimilarity to the nearest DoG prototype (lower is closer to a pattern)." : "",
    entropy ? " Bottom: variance entropy (about 0.9 for a healthy trained layer, 1 and above random-like, near 0 degenerate)." : "")];
  if (structure || hasValues(figures.null_clustered_fraction)) {
    captions.push(el("p", { className: "kw-caption" }, `Dashed: the shuffled null; dotted: the smooth null. ${NULL_NOTE}`));
  }
  show(node, ...notes, box, ...(withCaptions ? captions : []));
  chartOf(box).setOption({
    animation: false,
    axisPointer: { link: [{ xAxisIndex: "all" }] },
    tooltip: {
      trigger: "axis", renderMode: "richText",
      formatter: (items) => [`step ${items[0].value[0]}`, ...items.map((p) => `${p.seriesName}: ${fixed(p.value[1])}`)].join("\n"),
    },
    legend: { top: legendTop, itemWidth: 14, itemGap: 8, textStyle: { fontSize: 11 } },
    grid: grids,
    xAxis: xAxes,
    yAxis: yAxes,
    series,
  }, true);
  Object.assign(box.dataset, {
    points: String(proportions.steps.length), lens: data.lens ?? "weights", layer: data.layer,
    series: series.map((s) => s.name).join("|"),
  });
}

/** A step card's controls, built once per card node (kept in ``cache``) and updated in place, so a
 * live update or a slider move never replaces the slider under the user's pointer: a slider and
 * its step label, then what ``build(parts)`` adds (its elements and ``parts.root``); ``choose``
 * gets the step the slider rests on. */
function stepCardParts(cache, node, title, build, choose) {
  let parts = cache.get(node);
  if (parts) return parts;
  const slider = el("input", { type: "range", min: 0, max: 0, value: 0, className: "kw-slider", title });
  const stepLabel = el("span", { className: "kw-step" });
  parts = { slider, stepLabel, notes: el("div"), steps: [], dragging: false, key: null };
  build(parts);
  followSlider(slider, stepLabel, parts, choose);
  cache.set(node, parts);
  return parts;
}

/** The sprite card's controls: slider, cluster filter, picture with its hover overlay, legend. */
const sprites = new WeakMap();

function spriteParts(node) {
  return stepCardParts(sprites, node, "Snapshot", (parts) => {
    const filter = el("select", { className: "kw-filter", title: "Show one cluster" });
    const caption = el("p", { className: "kw-caption" });
    const image = el("img", { className: "kw-sprite" });
    const overlay = el("div", { className: "kw-overlay" });
    const frame = el("div", { className: "kw-sprite-frame" }, image, overlay);
    const legend = el("ul", { className: "kw-legend" });
    const hover = el("p", { className: "kw-hover kw-muted" }, "Hover a kernel for its channel and label.");
    Object.assign(parts, { filter, caption, image, overlay, frame, legend, hover, cells: [] });
    parts.root = el("div", { className: "kw-sprite-view" }, parts.notes,
      el("div", { className: "kw-controls" }, parts.slider, parts.stepLabel, filter), caption,
      el("div", { className: "kw-sprite-row" }, el("div", {}, frame, hover), legend));
    parts.applyFilter = () => {
      for (const [box, cell] of parts.cells) box.classList.toggle("kw-dim", !!state.cluster && family(cell.label) !== state.cluster);
    };
    filter.addEventListener("change", () => {
      state.cluster = filter.value;
      saveSelection();
      parts.applyFilter();
    });
  }, (step) => {
    state.step = step;
    saveSelection();
    drawSprite(node);
  });
}

/** Wire a card's step slider: the label follows the thumb, ``parts.dragging`` holds while it is
 * held, and ``choose`` gets the step (null for the latest, which then follows new snapshots)
 * once the thumb rests for 150 ms. */
function followSlider(slider, stepLabel, parts, choose) {
  let timer = null;
  slider.addEventListener("pointerdown", () => { parts.dragging = true; });
  const release = () => { parts.dragging = false; };
  slider.addEventListener("pointerup", release);
  slider.addEventListener("change", release);
  slider.addEventListener("input", () => {
    const i = Number(slider.value);
    stepLabel.textContent = stepText(parts.steps, i);
    clearTimeout(timer);
    timer = setTimeout(() => choose(i === parts.steps.length - 1 ? null : parts.steps[i]), 150);
  });
}

const stepText = (steps, i) => `step ${steps[i]} (${i + 1} of ${steps.length}${i === steps.length - 1 ? ", latest" : ""})`;

/** A step card's record at ``step`` (null: the latest), else the latest when the series lacks
 * that step (sampled, or not written then): ``{ data, failure }``, data null if neither loads. */
async function getStepRecord(route, params, step) {
  try {
    return { data: await getJSON(route, { ...params, step }), failure: null };
  } catch (failure) {
    return { data: step === null ? null : await getJSON(route, params).catch(() => null), failure };
  }
}

/** Load a step card's picture ``file`` (decoded before anything is swapped in) and move the
 * card's slider to ``index`` of ``steps``; null when it could not be loaded (the card then says
 * ``failure``) or the card was asked for something else meanwhile. */
async function showStepPicture(node, parts, current, { key, steps, index, file, params, failure }) {
  const url = new URL(file, BASE);
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  const picture = await loaded(url);
  if (!picture) {
    if (current()) {
      parts.key = null;
      show(node, message(failure));
    }
    return null;
  }
  if (!current()) return null;
  parts.key = key;
  parts.steps = steps;
  parts.slider.max = String(steps.length - 1);
  parts.slider.disabled = steps.length < 2;
  if (!parts.dragging) {
    parts.slider.value = String(index);
    parts.stepLabel.textContent = stepText(steps, index);
  }
  return { url, picture };
}

/** 3. A layer's kernels at one snapshot: slider over snapshots, cluster filter, legend. */
async function drawSprite(node) {
  const current = ticket("sprite");
  const { run, layer, lens } = state;
  const parts = spriteParts(node);
  // Another layer's picture stays until this one is ready, but no longer counts as loaded.
  if (parts.frame.dataset.selection !== JSON.stringify([run, layer, lens])) delete parts.frame.dataset.loaded;
  const { data, failure } = await getStepRecord("sprite", { run, layer, lens }, state.step);
  if (!current()) return;
  if (!data) {
    parts.key = null;
    show(node, message(`No kernel sprite: ${shown(failure.message)}`, "info"));
    return;
  }
  const { layout, steps } = data;
  const index = steps.indexOf(data.step);
  // At the newest snapshot the card follows new ones.
  if (index === steps.length - 1) state.step = null;
  const key = JSON.stringify([run, layer, lens, data.step, steps]);
  if (key === parts.key && parts.root.isConnected) return; // nothing new to show
  const scale = layout.cell_size < 32 ? 2 : 1.25;
  const loadedPicture = await showStepPicture(node, parts, current, {
    key, steps, index, file: "sprite.png", params: { run, layer, step: data.step, lens },
    failure: "The sprite image could not be loaded.",
  });
  if (!loadedPicture) return;
  const { url } = loadedPicture;
  const { filter, caption, image, overlay, frame, legend, hover } = parts;
  filter.replaceChildren(el("option", { value: "" }, "all clusters"),
    ...layout.groups.map((g) => el("option", { value: g.label, selected: g.label === state.cluster }, `${shown(g.label)} (${g.shown}/${g.count})`)));
  filter.value = layout.groups.some((g) => g.label === state.cluster) ? state.cluster : "";
  const what = lens === "update" ? "update" : "kernel";
  caption.textContent = `${layout.n_shown} of ${layout.n_kernels} kernels${lens === "update" ? " as their updates W − W₀ since the first snapshot" : ""}, ` +
    `each ${what} scaled to its own max |w|: blue negative, white zero, red positive.`;
  Object.assign(image, { alt: `${lens === "update" ? "updates" : "kernels"} of ${shown(layer)} at step ${data.step}`, src: url.href });
  image.width = layout.width * scale;
  image.height = layout.height * scale;
  frame.style.width = `${layout.width * scale}px`;
  frame.style.height = `${layout.height * scale}px`;
  Object.assign(frame.dataset, { loaded: "1", step: String(data.step), layer, selection: JSON.stringify([run, layer, lens]) });
  parts.cells = layout.cells.map((cell) => {
    const details = [cell.dissimilarity !== undefined ? `1 − cos ${fixed(cell.dissimilarity)}` : null,
      cell.code !== undefined ? `code ${fixed(cell.code)}` : null].filter(Boolean);
    const text = `channel ${cell.index}: ${shown(cell.label)}${details.length ? ` · ${details.join(" · ")}` : ""}`;
    const box = el("div", {
      className: "kw-cell", title: text,
      on: { mouseenter: () => { hover.textContent = text; } },
    });
    Object.assign(box.style, {
      left: `${cell.x * scale}px`, top: `${cell.y * scale}px`,
      width: `${layout.cell_size * scale}px`, height: `${layout.cell_size * scale}px`,
    });
    return [box, cell];
  });
  overlay.replaceChildren(...parts.cells.map(([box]) => box));
  parts.applyFilter();
  legend.replaceChildren(...layout.groups.map((g) => {
    const swatch = el("span", { className: "kw-swatch" });
    swatch.style.background = safeColour(g.colour, safeColour(state.meta.colours[family(g.label)]));
    return el("li", {}, swatch, `${shown(g.label)}: ${plural(g.count, "kernel")}${g.shown < g.count ? ` (${g.shown} shown)` : ""}`);
  }));
  parts.notes.replaceChildren(...(data.thinned
    ? [message(`The slider holds ${steps.length} of this layer's sprites, spread over the run with the latest.`, "info")]
    : data.sampled
    ? [message(`Only ${steps.length} sprites kept: TensorBoard sampled this series. Restart with ${state.meta.sampling.flag}.`, "warning")]
    : []));
  if (!parts.root.isConnected || node.firstChild !== parts.root) show(node, parts.root);
}

/** 4. Every anomaly flag, newest first, each linking to its layer. */
function drawAnomalies(node, data, onPick) {
  const scrolled = node.querySelector(".kw-table-wrap")?.scrollTop ?? 0;
  const notes = [errorList(data.errors)];
  if (data.sampled) notes.push(message(`TensorBoard kept only ${data.checked_steps.length} anomaly records. Restart with ${state.meta.sampling.flag}.`, "warning"));
  if (!data.anomalies.length) {
    show(node, ...notes, message(`No anomalies in ${plural(data.checked_steps.length, "checked snapshot")}.`, "info"));
    return;
  }
  const rows = data.anomalies.slice(0, MAX_ANOMALY_ROWS).map((a) => {
    const layer = a.layer === null
      ? el("span", { className: "kw-muted" }, "(run-wide)")
      : el("button", { className: "kw-link kw-name", type: "button", on: { click: () => onPick(a.layer, a.step) } }, shown(a.layer));
    const numbers = Object.entries(a.numbers ?? {})
      .map(([k, v]) => `${shown(k)}=${v === null ? "n/a" : typeof v === "number" ? +v.toPrecision(3) : shown(v)}`).join(", ");
    return el("tr", {},
      el("td", {}, String(a.step)),
      el("td", {}, el("span", { className: `kw-badge kw-${a.severity}` }, shown(a.severity))),
      el("td", {}, layer), el("td", {}, nameNode(a.kind)), el("td", {}, nameNode(a.message)), el("td", { className: "kw-muted" }, numbers));
  });
  const wrap = el("div", { className: "kw-table-wrap" }, el("table", { className: "kw-table" },
    el("thead", {}, el("tr", {}, ...["step", "severity", "layer", "kind", "message", "numbers"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows)));
  show(node, ...notes, wrap,
    data.anomalies.length > MAX_ANOMALY_ROWS ? message(`Showing the newest ${MAX_ANOMALY_ROWS} of ${data.anomalies.length}.`, "info") : null);
  wrap.scrollTop = scrolled;
}

/** "a–b", or "a" when both are one number; "" without numbers (logs written before thresholds per interval). */
function thresholdRange(low, high) {
  if (!Number.isFinite(low) || !Number.isFinite(high)) return "";
  return low === high ? num(low) : `${num(low)}–${num(high)}`;
}

/** The thresholds a spectrum applies: the range over its intervals (set per family or per code),
 * else its one threshold. */
function thresholdText(info) {
  const known = info.intervals.filter((iv) => thresholdRange(iv.threshold_min, iv.threshold_max));
  if (!known.length) return `threshold ${num(info.threshold)} (1 − cos)`;
  const low = Math.min(...known.map((iv) => iv.threshold_min));
  const high = Math.max(...known.map((iv) => iv.threshold_max));
  return low === high
    ? `threshold ${num(low)} (1 − cos)`
    : `thresholds ${num(low)}–${num(high)} (1 − cos), set per pattern`;
}

/** 5. Each spectrum strip with its labelled intervals along the code axis. */
function drawSpectra(node, run, data) {
  const notes = [errorList(data.errors)];
  if (!data.spectra.length) {
    show(node, ...notes, message("This run has no spectrum records.", "info"));
    return;
  }
  show(node, ...notes);
  for (const { kernel_size: k, info } of data.spectra) {
    const { strip } = info;
    const url = new URL("spectrum.png", BASE);
    url.searchParams.set("run", run);
    url.searchParams.set("kernel_size", k);
    const image = el("img", { className: "kw-strip", alt: `${k}x${k} spectrum`, width: strip.width, height: strip.height });
    image.addEventListener("load", () => { image.dataset.loaded = "1"; });
    image.src = url.href;
    // The strip is scaled to the card; the interval bar is aligned with the strip's band.
    const box = el("div", { className: "kw-chart" });
    box.style.height = "64px";
    const codes = Number.isFinite(Number(info.n_codes)) ? Number(info.n_codes).toLocaleString("en") : shown(info.n_codes);
    node.append(el("h3", {}, `${k}x${k} kernels — ${shown(info.method)}, ${codes} codes, ${thresholdText(info)}`),
      image, box,
      el("p", { className: "kw-caption" }, "Prototypes along the code axis; the band and the bar below colour each stretch by pattern family."));
    const series = info.intervals.map((iv) => ({
      type: "bar", stack: "code", name: shown(iv.label), barWidth: 22,
      color: safeColour(state.meta.colours[family(iv.label)]),
      label: { show: iv.end - iv.start > 0.08, formatter: () => shown(iv.label), fontSize: 10, overflow: "truncate" },
      data: [iv.end - iv.start],
    }));
    const percent = (px) => `${(100 * px) / strip.width}%`;
    chartOf(box).setOption({
      animation: false,
      tooltip: { renderMode: "richText", formatter: (p) => {
        const iv = info.intervals[p.seriesIndex];
        const within = thresholdRange(iv.threshold_min, iv.threshold_max);
        return `${p.seriesName}\ncode ${fixed(iv.start)}–${fixed(iv.end)}` + (within ? `\nthreshold ${within}` : "");
      } },
      grid: { left: percent(strip.band.x), right: percent(strip.width - strip.band.x - strip.band.width), top: 4, bottom: 28 },
      xAxis: { type: "value", min: 0, max: 1, name: "code", nameLocation: "middle", nameGap: 18 },
      yAxis: { type: "category", data: ["intervals"], show: false },
      series,
    }, true);
    box.dataset.intervals = String(info.intervals.length);
  }
}

/** 7. The stem's first-layer lens: its filters at a snapshot (slider), the energy profile
 * against the whitening prediction at a few snapshots (log-log), the reflections over time. */
const FIRST_LAYER_NOTE = "Energy profile: the share of the stem filters' energy along each principal component of " +
  "the input patches (largest variance first). A whitening filter bank puts its energy where the patches vary " +
  "least (dashed: the whitening prediction); random filters are flat. Whitening score: 0 flat, 1 the prediction.";
const CHANNEL_COLOURS = ["#e15759", "#59a14f", "#4e79a7"];
const firstLayers = new WeakMap();

function firstLayerParts(node) {
  return stepCardParts(firstLayers, node, "First-layer snapshot", (parts) => {
    const image = el("img", { className: "kw-sprite kw-filter-grid" });
    const figures = el("p", { className: "kw-caption kw-first-figures" });
    const profile = el("div", { className: "kw-chart kw-profile" });
    profile.style.height = "300px";
    const reflections = el("div", { className: "kw-chart kw-reflections" });
    reflections.style.height = "330px";
    Object.assign(parts, { image, figures, profile, reflections });
    parts.root = el("div", { className: "kw-first-layer-view" }, parts.notes,
      el("div", { className: "kw-controls" }, parts.slider, parts.stepLabel), figures,
      el("div", { className: "kw-first-row" }, el("div", {}, image), profile), reflections,
      el("p", { className: "kw-caption" }, FIRST_LAYER_NOTE, " Reflections: what the filters say of the data " +
        "(higher sharpness for sharper images, higher noise for noisier ones, a higher colour value for a stronger channel)."));
  }, (step) => {
    state.firstStep = step;
    drawFirstLayer(node);
  });
}

/** A colour from light to dark blue for the i-th of n snapshots (the latest darkest). */
const stepColour = (i, n) => BLUES[Math.min(BLUES.length - 1, 1 + Math.round((i / Math.max(n - 1, 1)) * (BLUES.length - 2)))];

async function drawFirstLayer(node) {
  const current = ticket("first_layer");
  const run = state.run;
  const layer = runOf(run)?.first_layer?.[0] ?? null;
  page.firstLayer.node.hidden = layer === null;
  if (layer === null) {
    show(node);
    return;
  }
  page.firstLayer.heading.replaceChildren("First layer — ", nameNode(layer));
  const parts = firstLayerParts(node);
  const { data, failure } = await getStepRecord("first_layer", { run, layer }, state.firstStep);
  if (!current()) return;
  if (!data) {
    parts.key = null;
    show(node, message(`No first-layer record: ${shown(failure.message)}`, "info"));
    return;
  }
  const { steps, report } = data;
  const index = steps.indexOf(data.step);
  if (index === steps.length - 1) state.firstStep = null;
  const key = JSON.stringify([run, layer, data.step, steps, data.timeline.steps]);
  if (key === parts.key && parts.root.isConnected) return;
  const loadedPicture = await showStepPicture(node, parts, current, {
    key, steps, index, file: "first_layer.png", params: { run, layer, step: data.step },
    failure: "The filter picture could not be loaded.",
  });
  if (!loadedPicture) return;
  const { url, picture: preload } = loadedPicture;
  const { image, figures } = parts;
  Object.assign(image, { alt: `filters of ${shown(layer)} at step ${data.step}`, src: url.href });
  image.width = preload.naturalWidth * 2;
  image.height = preload.naturalHeight * 2;
  Object.assign(image.dataset, { loaded: "1", step: String(data.step) });
  const r = report.reflections;
  const grid = report.grid ? `${report.grid.n_shown} of ${report.grid.n_filters} filters` : "filters";
  const colourText = r.colour.map((c, i) => `${report.in_channels === 3 ? "RGB"[i] : `channel ${i}`} ${num(c)}`).join(", ");
  figures.textContent = `Step ${data.step}: ${grid} (${report.kernel_size.join("×")}, ${report.in_channels} channels; ` +
    `${report.in_channels === 3 ? "as RGB" : "channel mean, grey"}, each scaled to its own max |w|, grey 0). ` +
    `Whitening ${num(report.whitening)} against ${report.source === "data" ? `${report.n_patches} sampled input patches` : "the natural-image prior"}; ` +
    `sharpness ${num(r.sharpness)}, noise ${num(r.noise)}, colour ${colourText}.`;
  parts.notes.replaceChildren(...[errorList(data.errors),
    data.thinned ? message(`The slider holds ${steps.length} of the stem's records and the figures over time ${data.timeline.steps.length}, spread over the run with the latest.`, "info")
      : data.sampled ? message(`Only ${steps.length} first-layer records kept: TensorBoard sampled this series. Restart with ${state.meta.sampling.flag}.`, "warning") : null,
  ].filter(Boolean));
  if (!parts.root.isConnected || node.firstChild !== parts.root) show(node, parts.root);
  drawProfiles(parts.profile, data.profiles);
  drawReflections(parts.reflections, data.timeline, report.in_channels);
}

const positive = (xs, values) => xs.map((x, i) => [x, values[i]]).filter(([, v]) => v !== null && v > 0);

function drawProfiles(box, profiles) {
  const n = profiles.length;
  const series = profiles.flatMap((p, i) => [
    { name: `step ${p.step}`, type: "line", symbol: "none", lineStyle: { width: 2, color: stepColour(i, n) }, color: stepColour(i, n),
      data: positive(p.component, p.energy_profile) },
    { name: `whitening prediction, step ${p.step}`, type: "line", symbol: "none", z: 1,
      lineStyle: { width: 1.2, type: "dashed", color: i === n - 1 ? "#212121" : "#9e9e9e" }, color: i === n - 1 ? "#212121" : "#9e9e9e",
      data: positive(p.component, p.whitening_prediction) },
  ]);
  const c = chartOf(box);
  delete box.dataset.painted;
  c.off("finished");
  c.on("finished", () => { box.dataset.painted = "1"; });
  c.setOption({
    animation: false,
    title: { text: "energy profile (log-log), coloured by step", left: "center", textStyle: { fontSize: 12, fontWeight: "normal" } },
    tooltip: { trigger: "axis", renderMode: "richText",
      formatter: (items) => [`component ${items[0].value[0]}`, ...items.map((p) => `${p.seriesName}: ${Number(p.value[1]).toExponential(2)}`)].join("\n") },
    legend: { bottom: 0, type: "scroll", textStyle: { fontSize: 10 }, data: series.filter((s, i) => i % 2 === 0 || i === series.length - 1).map((s) => s.name) },
    grid: { left: 64, right: 16, top: 30, bottom: 56 },
    xAxis: { type: "log", name: "principal component", nameLocation: "middle", nameGap: 24, minorSplitLine: { show: false } },
    yAxis: { type: "log", name: "energy share", nameLocation: "middle", nameGap: 48, axisLabel: { formatter: (v) => Number(v).toExponential(0) } },
    series,
  }, true);
  Object.assign(box.dataset, { profiles: String(n), points: String(series.reduce((sum, s) => sum + s.data.length, 0)) });
}

function drawReflections(box, timeline, channels) {
  const pairs = (values) => timeline.steps.map((step, i) => [step, values[i]]);
  const colour = (c) => timeline.colour.map((values) => values[c] ?? null);
  const series = [
    { name: "whitening", type: "line", symbol: "circle", symbolSize: 4, xAxisIndex: 0, yAxisIndex: 0, color: "#6a3d9a", data: pairs(timeline.whitening) },
    { name: "sharpness", type: "line", symbol: "circle", symbolSize: 4, xAxisIndex: 1, yAxisIndex: 1, color: "#212121", data: pairs(timeline.sharpness) },
    { name: "noise", type: "line", symbol: "circle", symbolSize: 4, xAxisIndex: 1, yAxisIndex: 1, color: "#f28e2b", data: pairs(timeline.noise) },
    ...Array.from({ length: channels }, (_, c) => ({
      name: channels === 3 ? `colour ${"RGB"[c]}` : `colour ${c}`, type: "line", symbol: "none", xAxisIndex: 2, yAxisIndex: 2,
      lineStyle: { type: "dashed" }, color: channels === 3 ? CHANNEL_COLOURS[c] : GREY, data: pairs(colour(c)),
    })),
  ];
  const steps = timeline.steps;
  const first = steps.length ? Math.min(...steps) : 0;
  const last = steps.length ? Math.max(...steps) : 1;
  const grids = [{ left: 62, right: 24, top: 12, height: 70 }, { left: 62, right: 24, top: 110, height: 80 }, { left: 62, right: 24, top: 218, height: 60 }];
  const c = chartOf(box);
  c.setOption({
    animation: false,
    axisPointer: { link: [{ xAxisIndex: "all" }] },
    tooltip: { trigger: "axis", renderMode: "richText",
      formatter: (items) => [`step ${items[0].value[0]}`, ...items.map((p) => `${p.seriesName}: ${fixed(p.value[1])}`)].join("\n") },
    legend: { bottom: 0, itemWidth: 14, textStyle: { fontSize: 11 } },
    grid: grids,
    xAxis: grids.map((_, i) => ({ type: "value", gridIndex: i, min: first, max: last > first ? last : first + 1, minInterval: 1,
      axisLabel: { show: i === grids.length - 1, formatter: integerTick, hideOverlap: true } })),
    yAxis: [["whitening", null], ["sharpness, noise", null], ["colour", null]].map(([name], i) => ({
      type: "value", gridIndex: i, scale: true, splitNumber: 2, name, nameLocation: "middle", nameGap: 42, nameTextStyle: { fontSize: 11 },
      axisLabel: { formatter: (v) => num(v, 2) } })),
    series,
  }, true);
  Object.assign(box.dataset, { points: String(steps.length), series: series.map((s) => s.name).join("|") });
}

// -- page -------------------------------------------------------------------------------------

const page = {};

function select(options, value, onChange, label) {
  const node = el("select", { title: label, on: { change: () => onChange(node.value) } },
    ...options.map(([v, text, props = {}]) => el("option", { value: v, selected: v === value, ...props }, text)));
  return el("label", { className: "kw-select" }, `${label} `, node);
}

/** What the header's options depend on: it is rebuilt only when this changes (a live update
 * must not close a drop-down the user has open). */
function headerKey() {
  const run = runOf(state.run);
  return JSON.stringify([state.meta.runs.map((r) => r.run), run?.layers, run?.lenses, state.run, state.layer, state.lens, state.compare]);
}

function drawHeader() {
  const run = runOf(state.run);
  const runOptions = readableRuns(state.meta).map((r) => [r.run, shown(r.run)]);
  const layers = run ? run.layers : [];
  const lenses = state.meta.lenses ?? ["weights", "update"];
  page.headerKey = headerKey();
  page.header.replaceChildren(
    el("h1", {}, "KernelWatch"),
    select(runOptions, state.run, (v) => {
      state.run = v;
      state.layer = null;
      state.step = null;
      state.firstStep = null;
      saveSelection();
      refresh();
    }, "Run"),
    select(layers.map((l) => [l, shown(l)]), state.layer, (v) => pickLayer(v, null, { scroll: false }), "Layer"),
    select(lenses.map((lens) => [lens, `${LENS_LABELS[lens] ?? lens}${run && !run.lenses.includes(lens) ? " (none in this run)" : ""}`]),
      state.lens, (v) => {
        state.lens = v;
        saveSelection();
        drawHeader();
        drawLensViews();
      }, "Lens"),
    select([["", "(none)"], ...runOptions.filter(([v]) => v !== state.run)], state.compare, (v) => {
      state.compare = v;
      saveSelection();
      drawHeader();
      drawCompare();
    }, "Compare with"),
    page.live);
}

function drawLive(error = null) {
  const run = runOf(state.run);
  page.live.classList.toggle("kw-live-error", !!error);
  if (error) {
    page.live.textContent = `Live updates failing: ${shown(error.message)}`;
    return;
  }
  if (!run) {
    page.live.textContent = "Live · waiting for readable KernelWatch data";
    return;
  }
  const when = run.updated ? new Date(run.updated * 1000).toLocaleTimeString() : "n/a";
  page.live.textContent = `Live · newest record step ${run.max_step}, written ${when}`;
  page.live.dataset.maxStep = String(run.max_step);
}

/** Open a layer (at a step: null follows the latest); from a heat-map cell or an anomaly, which
 * lie away from the layer's views, also scroll to them. */
function pickLayer(layer, step, { scroll = true } = {}) {
  state.layer = layer;
  state.step = step;
  saveSelection();
  drawHeader();
  drawLayerViews();
  drawCompare();
  if (scroll) page.timeline.node.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

/** Run a view's work; an error becomes its message unless a newer request superseded it. */
async function guarded(target, current, work) {
  try {
    await work();
  } catch (error) {
    if (!current()) return;
    // A lens or layer without records is a state, not a failure.
    show(target, message(shown(error.message), error.status === 404 ? "info" : "error"));
  }
}

/** The measure selector (built once, so a live redraw never closes it) and the card's title. */
function drawHeatmapControls() {
  if (!page.heatmap.controls.firstChild) {
    page.heatmap.controls.append(select(Object.entries(MEASURES).map(([key, m]) => [key, m.label]), state.measure, (v) => {
      state.measure = v;
      saveSelection();
      drawMainHeatmap();
      drawCompare();
    }, "Measure"));
  }
  page.heatmap.controls.querySelector("select").value = state.measure;
  const lens = state.lens === "weights" ? "" : `, ${state.lens} lens`;
  page.heatmap.heading.textContent = `Layers × snapshots — ${MEASURES[state.measure].label}${lens} (click a cell to open the layer)`;
}

async function drawMainHeatmap() {
  const current = ticket("heatmap");
  const { run, lens, measure } = state;
  drawHeatmapControls();
  await guarded(page.heatmap.body, current, async () => {
    const [data, anomalies] = await Promise.all([loadHeatmap(run, lens, measure), anomaliesOf(run).catch(() => null)]);
    if (current()) drawHeatmap(page.heatmap.body, data, anomalies, pickLayer);
  });
}

/** The anomalies of a run, one request shared by the list and the heat maps' marks. */
let anomalyRequest = null;
function anomaliesOf(run) {
  if (!hasAnomalies(run)) return Promise.resolve(null);
  if (!anomalyRequest || anomalyRequest.run !== run || anomalyRequest.signature !== runSignature(runOf(run))) {
    const promise = getJSON("anomalies", { run });
    promise.catch(() => null); // handled by each caller
    anomalyRequest = { run, signature: runSignature(runOf(run)), promise };
  }
  return anomalyRequest.promise;
}

async function drawLayerViews() {
  const { run, layer, lens } = state;
  const suffix = lens === "weights" ? "" : ` · ${lens} lens`;
  page.timeline.heading.replaceChildren("Cluster timeline — ", nameNode(layer ?? ""), suffix);
  page.sprite.heading.replaceChildren(lens === "weights" ? "Kernels — " : "Kernel updates — ", nameNode(layer ?? ""), suffix);
  if (!layer) {
    ticket("timeline");
    ticket("sprite");
    show(page.timeline.body, message("Pick a layer.", "info"));
    show(page.sprite.body);
    return;
  }
  const current = ticket("timeline");
  await Promise.all([
    guarded(page.timeline.body, current, async () => {
      const data = await getJSON("timeline", { run, layer, lens });
      if (current()) drawTimeline(page.timeline.body, data);
    }),
    guarded(page.sprite.body, () => true, () => drawSprite(page.sprite.body)),
  ]);
}

/** 6. Two runs side by side: the same layer's timeline and each run's heat map. */
async function drawCompare() {
  const { body, node } = page.compare;
  const current = ticket("compare");
  node.hidden = !state.compare;
  if (!state.compare) {
    show(body);
    return;
  }
  page.compare.heading.replaceChildren("Side by side — ", nameNode(state.run), " | ", nameNode(state.compare));
  // Reuse the columns (and their charts) when the same two runs are shown again.
  const key = JSON.stringify([state.run, state.compare]);
  if (body.dataset.key !== key || !body.querySelector(".kw-columns")) {
    body.dataset.key = key;
    show(body, el("div", { className: "kw-columns" }, ...[state.run, state.compare].map((run) => el("div", { className: "kw-column" },
      el("h3", {}, nameNode(run)), el("div", { className: "kw-compare-timeline" }), el("div", { className: "kw-compare-heatmap" })))));
  }
  const columns = [...body.querySelectorAll(".kw-column")].map((column, i) => ({
    run: [state.run, state.compare][i],
    timeline: column.querySelector(".kw-compare-timeline"),
    heatmap: column.querySelector(".kw-compare-heatmap"),
  }));
  const { layer, lens, measure } = state;
  await Promise.all(columns.flatMap(({ run, timeline, heatmap }) => [
    guarded(timeline, current, async () => {
      const layers = runOf(run)?.layers ?? [];
      if (!layers.includes(layer)) {
        show(timeline, message(`Run ${shown(run)} has no layer ${layer === null ? "(none picked)" : shown(layer)}.`, "info"));
        return;
      }
      const data = await getJSON("timeline", { run, layer, lens });
      if (current()) drawTimeline(timeline, data, { captions: false });
    }),
    guarded(heatmap, current, async () => {
      const [data, anomalies] = await Promise.all([loadHeatmap(run, lens, measure),
        hasAnomalies(run) ? getJSON("anomalies", { run }).catch(() => null) : null]);
      if (current()) drawHeatmap(heatmap, data, anomalies, pickLayer, { captions: false });
    }),
  ]));
}

/** The lens changed: everything that shows a lens. */
function drawLensViews() {
  drawMainHeatmap();
  drawLayerViews();
  drawCompare();
}

async function drawAnomalyList() {
  const current = ticket("anomalies");
  const run = state.run;
  await guarded(page.anomalies.body, current, async () => {
    const data = await anomaliesOf(run);
    if (!current()) return;
    if (data) drawAnomalies(page.anomalies.body, data, pickLayer);
    else show(page.anomalies.body, message("This run has no anomaly records.", "info"));
  });
}

async function drawSpectrumCard() {
  const current = ticket("spectrum");
  const run = state.run;
  page.spectrumKey = JSON.stringify([run, runOf(run)?.spectra]);
  await guarded(page.spectrum.body, current, async () => {
    const data = await getJSON("spectrum", { run });
    if (current()) drawSpectra(page.spectrum.body, run, data);
  });
}

/** Draw every view of the selected run; `live` redraws in place, keeping heights while it works. */
async function refresh({ live = false } = {}) {
  const run = runOf(state.run);
  if (!run) return;
  if (!state.layer || !run.layers.includes(state.layer)) state.layer = run.layers[0] ?? null;
  if (!live || page.headerKey !== headerKey()) drawHeader();
  drawLive();
  show(page.notes, errorList(run.errors));
  const spectrumKey = JSON.stringify([state.run, run.spectra]);
  const work = () => Promise.all([
    drawMainHeatmap(),
    drawLayerViews(),
    drawAnomalyList(),
    !live || page.spectrumKey !== spectrumKey ? drawSpectrumCard() : null,
    guarded(page.firstLayer.body, () => true, () => drawFirstLayer(page.firstLayer.body)),
    drawCompare(),
  ]);
  await (live ? keepingView(work) : work());
}

/**
 * Redraw without moving what the reader looks at: each card keeps its height while it
 * redraws, and the card at the top of the view is put back where it was (content above it,
 * such as a heat map with a new layer, may have grown).
 */
async function keepingView(work) {
  const cards = [...document.querySelectorAll(".kw-card")].filter((card) => card.offsetParent !== null);
  const anchor = cards.find((card) => card.getBoundingClientRect().bottom > 0);
  const top = anchor?.getBoundingClientRect().top;
  const bodies = cards.map((card) => card.querySelector(":scope > .kw-body"));
  for (const body of bodies) body.style.minHeight = `${body.getBoundingClientRect().height}px`;
  try {
    await work();
  } finally {
    for (const body of bodies) body.style.minHeight = "";
    const moved = anchor ? anchor.getBoundingClientRect().top - top : 0;
    if (Math.abs(moved) >= 1) window.scrollBy(0, moved);
  }
}

// -- live updates -----------------------------------------------------------------------------

/** What makes a run worth redrawing: a new record, a new layer or lens, new errors. */
const runSignature = (run) => (run ? JSON.stringify([run.max_step, run.updated, run.layers, run.lenses, run.spectra, run.has_anomalies, run.errors]) : "");

let pollTimer = null;
let polling = null;
let reloads = 0; // times TensorBoard said it reloaded its data

function schedulePoll() {
  clearTimeout(pollTimer);
  if (!document.hidden) pollTimer = setTimeout(poll, POLL_MS);
}

/** Ask `runs` and redraw what moved. One at a time; not while the page is hidden. */
function poll() {
  if (document.hidden || !page.polls) return Promise.resolve();
  if (!polling) {
    polling = pollOnce()
      .catch((error) => drawLive(error))
      .finally(() => {
        polling = null;
        schedulePoll();
      });
  }
  return polling;
}

async function pollOnce() {
  const before = state.meta;
  const meta = await getJSON("runs");
  state.meta = meta;
  drawSampling();
  if (!page.started) {
    await start();
    return;
  }
  if (!runOf(state.run)) {
    // The selected run went away (its logs were moved): open the freshest one.
    state.run = defaultRun();
    state.layer = null;
    state.step = null;
    state.firstStep = null;
    if (!state.run) {
      showEmpty();
      return;
    }
    await refresh();
    return;
  }
  if (state.compare && !runOf(state.compare)) {
    state.compare = "";
    drawCompare();
  }
  const old = new Map((before?.runs ?? []).map((r) => [r.run, runSignature(r)]));
  const moved = new Set(meta.runs.filter((r) => old.get(r.run) !== runSignature(r)).map((r) => r.run));
  if (page.headerKey !== headerKey()) drawHeader();
  drawLive();
  if (moved.has(state.run)) await refresh({ live: true });
  else if (state.compare && moved.has(state.compare)) await keepingView(drawCompare);
}

/** TensorBoard's host page tells plugin iframes when it reloaded its data (its reload button and
 * its periodic reload). Ask for that over the plugin message channel; polling works without it. */
function listenToTensorBoard() {
  if (window.parent === window || typeof MessageChannel === "undefined") return;
  const channel = new MessageChannel();
  channel.port1.onmessage = (event) => {
    let msg;
    try {
      msg = JSON.parse(event.data);
    } catch {
      return;
    }
    if (!msg || typeof msg !== "object" || msg.isReply) return;
    if (msg.type === "experimental.DataReloaded") {
      reloads += 1;
      document.body.dataset.tensorboardReloads = String(reloads);
      poll();
    } else if (msg.type === "experimental.RunsChanged" && page.started) {
      poll();
    }
    // The host waits for a reply to every message it sends.
    channel.port1.postMessage(JSON.stringify({ type: msg.type, id: msg.id, payload: null, error: null, isReply: true }));
  };
  try {
    window.parent.postMessage("experimental.bootstrap", window.location.origin, [channel.port2]);
  } catch {
    // A host on another origin: polling alone.
  }
}

// -- start ------------------------------------------------------------------------------------

function drawSampling() {
  const flag = state.meta.sampling.flag;
  const key = JSON.stringify(state.meta.sampling);
  if (page.samplingKey === key) return;
  page.samplingKey = key;
  show(page.sampling, state.meta.sampling.keeps_all ? null : message(
    `TensorBoard keeps only a sample of each KernelWatch series (by default 10 sprites and anomaly records, ` +
    `100 points per figure). Start it with ${flag} to see every snapshot.`, "warning"));
}

/** The run to open with no selection: the one written to most recently. */
function defaultRun() {
  const readable = readableRuns(state.meta);
  if (!readable.length) return null;
  return readable.reduce((best, r) => ((r.updated ?? 0) > (best.updated ?? 0) ? r : best)).run;
}

function showEmpty() {
  page.started = false;
  page.main.hidden = true;
  const problems = state.meta.runs.flatMap((r) => r.errors.map((e) => `${r.run}: ${e}`));
  drawLive();
  // Polls repeat this: redraw only when it changed, so what the reader looks at stays put.
  const key = JSON.stringify([state.meta.runs.length, problems]);
  if (page.emptyKey === key && !page.empty.hidden) return;
  page.emptyKey = key;
  page.header.replaceChildren(el("h1", {}, "KernelWatch"), page.live);
  show(page.empty, message(state.meta.runs.length ? "No readable KernelWatch data in this log directory."
    : "No KernelWatch data in this log directory yet. This page shows runs as soon as TensorBoard loads them."),
  errorList(problems));
  page.empty.hidden = false;
  document.body.dataset.empty = "1";
}

async function start() {
  const readable = readableRuns(state.meta);
  if (!readable.length) {
    showEmpty();
    return;
  }
  page.started = true;
  page.main.hidden = false;
  page.empty.hidden = true;
  delete document.body.dataset.empty;
  const saved = loadSelection();
  const names = new Set(readable.map((r) => r.run));
  if (!names.has(state.run)) {
    if (names.has(saved.run)) Object.assign(state, saved, { compare: names.has(saved.compare) ? saved.compare : "" });
    else state.run = defaultRun();
  }
  if (!(state.measure in MEASURES)) state.measure = "clustered_fraction";
  if (!(state.meta.lenses ?? ["weights"]).includes(state.lens)) state.lens = "weights";
  await refresh();
  document.body.dataset.ready = "1";
}

export async function render() {
  document.head.append(el("link", { rel: "stylesheet", href: new URL("static/style.css", BASE).href }));
  document.body.className = "kw";
  page.header = el("header", { className: "kw-header" });
  page.live = el("span", { className: "kw-live", role: "status", title: `Checks for new snapshots every ${POLL_MS / 1000} s, and whenever TensorBoard reloads; paused while this tab is hidden.` });
  page.sampling = el("div");
  page.notes = el("div");
  page.empty = el("div");
  page.heatmap = card("kw-heatmap", "Layers × snapshots");
  page.timeline = card("kw-timeline", "Cluster timeline");
  page.sprite = card("kw-sprite", "Kernels");
  page.anomalies = card("kw-anomalies", "Anomalies");
  page.spectrum = card("kw-spectrum", "Spectrum");
  page.firstLayer = card("kw-first-layer", "First layer");
  page.firstLayer.node.hidden = true;
  page.compare = card("kw-compare", "Side by side");
  page.compare.node.hidden = true;
  page.main = el("main", { className: "kw-grid" }, page.heatmap.node,
    el("div", { className: "kw-pair" }, page.timeline.node, page.sprite.node),
    page.compare.node,
    el("div", { className: "kw-pair" }, page.anomalies.node, page.spectrum.node),
    page.firstLayer.node);
  page.main.hidden = true;
  page.header.append(el("h1", {}, "KernelWatch"), page.live);
  document.body.replaceChildren(page.header, page.sampling, page.notes, page.empty, page.main);
  window.addEventListener("resize", () => document.querySelectorAll(".kw-chart").forEach((n) => echarts.getInstanceByDom(n)?.resize()));
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) clearTimeout(pollTimer);
    else poll();
  });
  listenToTensorBoard();
  try {
    state.meta = await getJSON("runs");
  } catch (error) {
    show(page.empty, message(`KernelWatch could not load its runs: ${shown(error.message)}`));
    page.polls = true;
    schedulePoll();
    return;
  }
  drawSampling();
  await start();
  page.polls = true; // from now on TensorBoard's reloads, visibility and the timer may poll
  schedulePoll();
}
