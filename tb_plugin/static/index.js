// KernelWatch dashboard: the ES module TensorBoard loads into the plugin's iframe.
//
// Every name from the log (runs, layers, messages) reaches the page through textContent or
// canvas text only, never innerHTML; chart tooltips use ECharts' canvas ("richText") mode.
import * as echarts from "./static/echarts.esm.min.js";

const BASE = new URL("./", import.meta.url);
// Light enough to stand out on the dark end of the heat map.
const SEVERITY_COLOURS = { info: "#8cd17d", warning: "#f28e2b", error: "#e15759" };
const MAX_ANOMALY_ROWS = 200;

const state = { meta: null, run: null, layer: null, compare: "", step: null, cluster: "" };

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

function message(text, kind = "error") {
  return el("div", { className: `kw-message kw-${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** Show a view's record errors (malformed or newer-version data) above it. */
function errorList(errors) {
  if (!errors || !errors.length) return null;
  const shown = errors.slice(0, 5).map((e) => el("li", {}, e));
  if (errors.length > 5) shown.push(el("li", {}, `… and ${errors.length - 5} more`));
  return el("div", { className: "kw-message kw-error", role: "alert" },
    "Some KernelWatch records could not be read:", el("ul", {}, ...shown));
}

function card(id, title) {
  const body = el("div", { className: "kw-body" });
  const heading = el("h2", {}, title);
  const node = el("section", { className: "kw-card", id }, heading, body);
  return { node, body, heading };
}

async function getJSON(route, params = {}) {
  const url = new URL(route, BASE);
  for (const [key, value] of Object.entries(params)) if (value !== null && value !== undefined) url.searchParams.set(key, value);
  const response = await fetch(url);
  let body;
  try {
    body = await response.json();
  } catch {
    throw new Error(`${route}: HTTP ${response.status}, not JSON`);
  }
  if (!response.ok) throw new Error(body.error || `${route}: HTTP ${response.status}`);
  return body;
}

function chart(node) {
  const instance = echarts.getInstanceByDom(node) || echarts.init(node, null, { renderer: "canvas" });
  return instance;
}

function family(label) {
  const name = String(label).split("/")[0];
  return name in state.meta.colours ? name : "other";
}

const fixed = (x, digits = 3) => (x === null || x === undefined ? "n/a" : Number(x).toFixed(digits));

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

/** 2. Layers x snapshots, coloured by clustered fraction; anomalies as triangles. */
function drawHeatmap(node, data, anomalies, onPick) {
  const marks = marksOf(data, anomalies);
  node.replaceChildren();
  const errors = errorList(data.errors);
  if (errors) node.append(errors);
  if (!data.layers.length) {
    node.append(message("This run has no classified layers.", "info"));
    return;
  }
  if (data.sampled_layers) {
    node.append(message(`${data.sampled_layers} layer(s) show a sample of their snapshots. ` +
      `Restart TensorBoard with ${state.meta.sampling.flag} to see all.`, "warning"));
  }
  const height = Math.max(160, 16 * data.layers.length + 90);
  const box = el("div", { className: "kw-chart" });
  box.style.height = `${height}px`;
  node.append(box);
  const c = chart(box);
  const stepLabels = data.steps.map(String);
  const cells = data.values.flatMap((row, y) => row.flatMap((value, x) => (value === null ? [] : [[x, y, value]])));
  c.setOption({
    animation: false,
    tooltip: {
      renderMode: "richText",
      formatter: (p) => p.seriesIndex === 0
        ? `${data.layers[p.value[1]]}\nstep ${stepLabels[p.value[0]]}: clustered ${fixed(p.value[2])}`
        : `${data.layers[p.value[1]]}\nstep ${stepLabels[p.value[0]]}: ${p.value[3]} anomal${p.value[3] === 1 ? "y" : "ies"} (${p.value[2]})`,
    },
    grid: { left: 10, right: 20, top: 10, bottom: 70, containLabel: true },
    xAxis: { type: "category", data: stepLabels, name: "step", nameLocation: "middle", nameGap: 28, splitArea: { show: false } },
    yAxis: { type: "category", data: data.layers, inverse: true, axisLabel: { width: 220, overflow: "truncate" } },
    visualMap: {
      min: 0, max: 1, orient: "horizontal", left: "center", bottom: 0, itemHeight: 160, seriesIndex: 0,
      text: ["clustered 1", "0"], inRange: { color: ["#f7fbff", "#9ecae1", "#2171b5", "#08306b"] },
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
  box.dataset.cells = String(cells.length);
  box.dataset.marks = String(marks.length);
}

/** 1. Stacked areas of cluster proportions over snapshots; the top edge is the clustered fraction. */
function drawTimeline(node, data) {
  node.replaceChildren();
  const errors = errorList(data.errors);
  if (errors) node.append(errors);
  if (data.sampled && data.sampled.length) {
    node.append(message(`Only a sample of this layer's snapshots is shown. Restart TensorBoard with ${state.meta.sampling.flag}.`, "warning"));
  }
  const proportions = data.proportions;
  if (!proportions) {
    node.append(message("This layer has no cluster proportions (quality metrics only).", "info"));
    return;
  }
  const box = el("div", { className: "kw-chart" });
  box.style.height = "360px";
  node.append(box);
  const quality = data.quality;
  const series = Object.entries(proportions.series).map(([cluster, values]) => ({
    name: cluster, type: "line", stack: "share", symbol: "none", areaStyle: { opacity: 0.85 },
    lineStyle: { width: 0.5 }, color: state.meta.colours[cluster],
    data: proportions.steps.map((step, i) => [step, values[i]]),
  }));
  if (quality) {
    series.push({
      name: "variance entropy", type: "line", symbol: "circle", symbolSize: 3, yAxisIndex: 0,
      lineStyle: { type: "dashed", color: "#333" }, color: "#333",
      data: quality.steps.map((step, i) => [step, quality.series.variance_entropy[i]]),
    });
  }
  chart(box).setOption({
    animation: false,
    tooltip: {
      trigger: "axis", renderMode: "richText",
      formatter: (items) => [`step ${items[0].value[0]}`, ...items.map((p) => `${p.seriesName}: ${fixed(p.value[1])}`)].join("\n"),
    },
    legend: { bottom: 0, itemWidth: 14, itemGap: 8, textStyle: { fontSize: 11 } },
    grid: { left: 50, right: 20, top: 30, bottom: 84 },
    xAxis: { type: "value", name: "step", nameLocation: "middle", nameGap: 24, min: "dataMin", max: "dataMax" },
    yAxis: { type: "value", min: 0, max: (v) => Math.max(1, Math.ceil(v.max * 10) / 10), name: "share of kernels" },
    series,
  }, true);
  box.dataset.points = String(proportions.steps.length);
}

/** 3. A layer's kernels at one snapshot: slider over snapshots, cluster filter, legend. */
async function drawSprite(node, run, layer) {
  node.replaceChildren(message("Loading kernels…", "info"));
  let data;
  try {
    data = await getJSON("sprite", { run, layer, step: state.step });
  } catch (error) {
    // A step the sprite series lacks (sampled or not written then): fall back to the latest.
    try {
      data = await getJSON("sprite", { run, layer });
    } catch {
      node.replaceChildren(message(`No kernel sprite: ${error.message}`, "info"));
      return;
    }
  }
  const { layout, steps } = data;
  const scale = layout.cell_size < 32 ? 2 : 1.25;
  const slider = el("input", { type: "range", min: 0, max: steps.length - 1, value: steps.indexOf(data.step), className: "kw-slider" });
  const stepLabel = el("span", { className: "kw-step" }, `step ${data.step} (${steps.indexOf(data.step) + 1} of ${steps.length})`);
  const filter = el("select", { className: "kw-filter", title: "Show one cluster" },
    el("option", { value: "" }, "all clusters"),
    ...layout.groups.map((g) => el("option", { value: g.label, selected: g.label === state.cluster }, `${g.label} (${g.shown}/${g.count})`)));
  const image = el("img", { className: "kw-sprite", alt: `kernels of ${layer} at step ${data.step}`, width: layout.width * scale, height: layout.height * scale });
  const overlay = el("div", { className: "kw-overlay" });
  const frame = el("div", { className: "kw-sprite-frame" }, image, overlay);
  frame.style.width = `${layout.width * scale}px`;
  frame.style.height = `${layout.height * scale}px`;
  const cells = layout.cells.map((cell) => {
    const box = el("div", { className: "kw-cell", title: `channel ${cell.index}: ${cell.label}` });
    Object.assign(box.style, {
      left: `${cell.x * scale}px`, top: `${cell.y * scale}px`,
      width: `${layout.cell_size * scale}px`, height: `${layout.cell_size * scale}px`,
    });
    overlay.append(box);
    return [box, cell];
  });
  const applyFilter = () => {
    state.cluster = filter.value;
    for (const [box, cell] of cells) box.classList.toggle("kw-dim", !!state.cluster && family(cell.label) !== state.cluster);
  };
  filter.addEventListener("change", applyFilter);
  applyFilter();
  const legend = el("ul", { className: "kw-legend" }, ...layout.groups.map((g) => {
    const swatch = el("span", { className: "kw-swatch" });
    swatch.style.background = g.colour;
    return el("li", {}, swatch, `${g.label}: ${g.count} kernel${g.count === 1 ? "" : "s"}${g.shown < g.count ? ` (${g.shown} shown)` : ""}`);
  }));
  let timer = null;
  slider.addEventListener("input", () => {
    const step = steps[Number(slider.value)];
    stepLabel.textContent = `step ${step} (${Number(slider.value) + 1} of ${steps.length})`;
    clearTimeout(timer);
    timer = setTimeout(() => { state.step = step; drawSprite(node, run, layer); }, 150);
  });
  const url = new URL("sprite.png", BASE);
  for (const [k, v] of Object.entries({ run, layer, step: data.step })) url.searchParams.set(k, v);
  image.addEventListener("load", () => { frame.dataset.loaded = "1"; });
  image.addEventListener("error", () => frame.replaceWith(message("The sprite image could not be loaded.")));
  image.src = url.href;
  const notes = [];
  if (data.sampled) notes.push(message(`Only ${steps.length} sprites kept: TensorBoard sampled this series. Restart with ${state.meta.sampling.flag}.`, "warning"));
  node.replaceChildren(...notes,
    el("div", { className: "kw-controls" }, slider, stepLabel, filter),
    el("p", { className: "kw-caption" }, `${layout.n_shown} of ${layout.n_kernels} kernels, each scaled to its own max |w|: blue negative, white zero, red positive.`),
    el("div", { className: "kw-sprite-row" }, frame, legend));
}

/** 4. Every anomaly flag, newest first, each linking to its layer. */
function drawAnomalies(node, data, onPick) {
  node.replaceChildren();
  const errors = errorList(data.errors);
  if (errors) node.append(errors);
  if (data.sampled) node.append(message(`TensorBoard kept only ${data.checked_steps.length} anomaly records. Restart with ${state.meta.sampling.flag}.`, "warning"));
  if (!data.anomalies.length) {
    node.append(message(`No anomalies in ${data.checked_steps.length} checked snapshot(s).`, "info"));
    return;
  }
  const rows = data.anomalies.slice(0, MAX_ANOMALY_ROWS).map((a) => {
    const layer = a.layer === null
      ? el("span", { className: "kw-muted" }, "(run-wide)")
      : el("button", { className: "kw-link", type: "button", on: { click: () => onPick(a.layer, a.step) } }, a.layer);
    const numbers = Object.entries(a.numbers).map(([k, v]) => `${k}=${v === null ? "n/a" : typeof v === "number" ? +v.toPrecision(3) : v}`).join(", ");
    return el("tr", {},
      el("td", {}, String(a.step)),
      el("td", {}, el("span", { className: `kw-badge kw-${a.severity}` }, a.severity)),
      el("td", {}, layer), el("td", {}, a.kind), el("td", {}, a.message), el("td", { className: "kw-muted" }, numbers));
  });
  node.append(el("div", { className: "kw-table-wrap" }, el("table", { className: "kw-table" },
    el("thead", {}, el("tr", {}, ...["step", "severity", "layer", "kind", "message", "numbers"].map((h) => el("th", {}, h)))),
    el("tbody", {}, ...rows))));
  if (data.anomalies.length > MAX_ANOMALY_ROWS) node.append(message(`Showing the newest ${MAX_ANOMALY_ROWS} of ${data.anomalies.length}.`, "info"));
}

/** 5. Each spectrum strip with its labelled intervals along the code axis. */
function drawSpectra(node, run, data) {
  node.replaceChildren();
  const errors = errorList(data.errors);
  if (errors) node.append(errors);
  if (!data.spectra.length) {
    node.append(message("This run has no spectrum records.", "info"));
    return;
  }
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
    node.append(el("h3", {}, `${k}x${k} kernels — ${info.method}, ${info.n_codes} codes, threshold ${info.threshold}`),
      image, box,
      el("p", { className: "kw-caption" }, "Prototypes along the code axis; the band and the bar below colour each stretch by pattern family."));
    const series = info.intervals.map((iv) => ({
      type: "bar", stack: "code", name: iv.label, barWidth: 22,
      color: state.meta.colours[family(iv.label)],
      label: { show: iv.end - iv.start > 0.08, formatter: iv.label, fontSize: 10, overflow: "truncate" },
      data: [iv.end - iv.start],
    }));
    const percent = (px) => `${(100 * px) / strip.width}%`;
    chart(box).setOption({
      animation: false,
      tooltip: { renderMode: "richText", formatter: (p) => `${p.seriesName}\ncode ${fixed(info.intervals[p.seriesIndex].start)}–${fixed(info.intervals[p.seriesIndex].end)}` },
      grid: { left: percent(strip.band.x), right: percent(strip.width - strip.band.x - strip.band.width), top: 4, bottom: 28 },
      xAxis: { type: "value", min: 0, max: 1, name: "code", nameLocation: "middle", nameGap: 18 },
      yAxis: { type: "category", data: ["intervals"], show: false },
      series,
    }, true);
    box.dataset.intervals = String(info.intervals.length);
  }
}

// -- page -------------------------------------------------------------------------------------

const page = {};

function select(options, value, onChange, label) {
  const node = el("select", { title: label, on: { change: () => onChange(node.value) } },
    ...options.map(([v, text]) => el("option", { value: v, selected: v === value }, text)));
  return el("label", { className: "kw-select" }, `${label} `, node);
}

function drawHeader() {
  const run = state.meta.runs.find((r) => r.run === state.run);
  const runOptions = state.meta.runs.map((r) => [r.run, r.run]);
  const layers = run ? run.layers : [];
  page.header.replaceChildren(
    el("h1", {}, "KernelWatch"),
    select(runOptions, state.run, (v) => { state.run = v; state.layer = null; state.step = null; refresh(); }, "Run"),
    select(layers.map((l) => [l, l]), state.layer, (v) => pickLayer(v, null), "Layer"),
    select([["", "(none)"], ...runOptions.filter(([v]) => v !== state.run)], state.compare,
      (v) => { state.compare = v; drawCompare(); }, "Compare with"));
}

function pickLayer(layer, step) {
  state.layer = layer;
  state.step = step;
  drawHeader();
  drawLayerViews();
  drawCompare();
  page.timeline.node.scrollIntoView({ behavior: "smooth", block: "nearest" });
}

async function guarded(target, work) {
  try {
    await work();
  } catch (error) {
    target.replaceChildren(message(error.message));
  }
}

async function drawLayerViews() {
  const { run, layer } = state;
  page.timeline.heading.textContent = `Cluster timeline — ${layer ?? ""}`;
  page.sprite.heading.textContent = `Kernels — ${layer ?? ""}`;
  if (!layer) {
    page.timeline.body.replaceChildren(message("Pick a layer.", "info"));
    page.sprite.body.replaceChildren();
    return;
  }
  await Promise.all([
    guarded(page.timeline.body, async () => drawTimeline(page.timeline.body, await getJSON("timeline", { run, layer }))),
    guarded(page.sprite.body, () => drawSprite(page.sprite.body, run, layer)),
  ]);
}

/** 6. Two runs side by side: the same layer's timeline and each run's heat map. */
async function drawCompare() {
  const { body, node } = page.compare;
  node.hidden = !state.compare;
  if (!state.compare) return;
  page.compare.heading.textContent = `Side by side — ${state.run} | ${state.compare}`;
  const columns = [state.run, state.compare].map((run) => {
    const timeline = el("div", { className: "kw-compare-timeline" });
    const heatmap = el("div", { className: "kw-compare-heatmap" });
    return { run, timeline, heatmap, node: el("div", { className: "kw-column" }, el("h3", {}, run), timeline, heatmap) };
  });
  body.replaceChildren(el("div", { className: "kw-columns" }, ...columns.map((c) => c.node)));
  await Promise.all(columns.flatMap(({ run, timeline, heatmap }) => [
    guarded(timeline, async () => {
      const layers = state.meta.runs.find((r) => r.run === run)?.layers ?? [];
      if (!layers.includes(state.layer)) {
        timeline.replaceChildren(message(`Run ${run} has no layer ${state.layer ?? "(none picked)"}.`, "info"));
        return;
      }
      drawTimeline(timeline, await getJSON("timeline", { run, layer: state.layer }));
    }),
    guarded(heatmap, async () => {
      const anomalies = hasAnomalies(run) ? getJSON("anomalies", { run }).catch(() => null) : null;
      drawHeatmap(heatmap, await getJSON("heatmap", { run }), await anomalies, pickLayer);
    }),
  ]));
}

const hasAnomalies = (run) => !!state.meta.runs.find((r) => r.run === run)?.has_anomalies;

async function refresh() {
  const run = state.meta.runs.find((r) => r.run === state.run);
  if (!state.layer || !run.layers.includes(state.layer)) state.layer = run.layers[0] ?? null;
  drawHeader();
  page.notes.replaceChildren();
  const errors = errorList(run.errors);
  if (errors) page.notes.append(errors);
  // One anomalies request feeds both the list and the heat map's marks.
  const anomalies = run.has_anomalies ? getJSON("anomalies", { run: state.run }) : Promise.resolve(null);
  await Promise.all([
    guarded(page.heatmap.body, async () => drawHeatmap(page.heatmap.body, await getJSON("heatmap", { run: state.run }),
      await anomalies.catch(() => null), pickLayer)),
    drawLayerViews(),
    guarded(page.anomalies.body, async () => {
      const data = await anomalies;
      if (data) drawAnomalies(page.anomalies.body, data, pickLayer);
      else page.anomalies.body.replaceChildren(message("This run has no anomaly records.", "info"));
    }),
    guarded(page.spectrum.body, async () => drawSpectra(page.spectrum.body, state.run, await getJSON("spectrum", { run: state.run }))),
    drawCompare(),
  ]);
}

export async function render() {
  document.head.append(el("link", { rel: "stylesheet", href: new URL("static/style.css", BASE).href }));
  document.body.className = "kw";
  page.header = el("header", { className: "kw-header" });
  page.sampling = el("div");
  page.notes = el("div");
  page.heatmap = card("kw-heatmap", "Layers × snapshots — clustered fraction (click a cell to open the layer)");
  page.timeline = card("kw-timeline", "Cluster timeline");
  page.sprite = card("kw-sprite", "Kernels");
  page.anomalies = card("kw-anomalies", "Anomalies");
  page.spectrum = card("kw-spectrum", "Spectrum");
  page.compare = card("kw-compare", "Side by side");
  page.compare.node.hidden = true;
  const main = el("main", { className: "kw-grid" }, page.heatmap.node,
    el("div", { className: "kw-pair" }, page.timeline.node, page.sprite.node),
    page.compare.node,
    el("div", { className: "kw-pair" }, page.anomalies.node, page.spectrum.node));
  document.body.replaceChildren(page.header, page.sampling, page.notes, main);
  window.addEventListener("resize", () => document.querySelectorAll(".kw-chart").forEach((n) => echarts.getInstanceByDom(n)?.resize()));
  try {
    state.meta = await getJSON("runs");
  } catch (error) {
    document.body.replaceChildren(message(`KernelWatch could not load its runs: ${error.message}`));
    return;
  }
  if (!state.meta.sampling.keeps_all) {
    page.sampling.append(message(
      `TensorBoard keeps only a sample of each KernelWatch series (by default 10 sprites and anomaly records, ` +
      `100 points per figure). Start it with ${state.meta.sampling.flag} to see every snapshot.`, "warning"));
  }
  const readable = state.meta.runs.filter((r) => r.layers.length || r.spectra.length || r.has_anomalies);
  if (!readable.length) {
    const problems = state.meta.runs.flatMap((r) => r.errors.map((e) => `${r.run}: ${e}`));
    document.body.replaceChildren(el("header", { className: "kw-header" }, el("h1", {}, "KernelWatch")),
      page.sampling, message("No readable KernelWatch data in this log directory."), errorList(problems) ?? "");
    return;
  }
  state.run = readable[0].run;
  await refresh();
  document.body.dataset.ready = "1";
}
