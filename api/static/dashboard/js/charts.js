// Line charts over uPlot (vendored, MIT): x = step; the point count is exposed as data-points.

import { h } from "./util.js";

// Okabe-Ito: distinguishable with the common colour-vision deficiencies.
export const COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];
const DASHES = [[], [6, 3], [2, 3], [8, 3, 2, 3]];

// Y tick labels that stay distinct for tiny values (learning rates) and large ones.
export function tickLabels(splits) {
  const top = Math.max(...splits.map((v) => Math.abs(v)));
  if (top !== 0 && (top < 1e-2 || top >= 1e5)) return splits.map((v) => (v === 0 ? "0" : v.toExponential(1)));
  return splits.map((v) => String(Number(v.toPrecision(6))));
}

export class LineChart {
  // series: [{key, label}]; rows are added by step, in any order.
  constructor(title, series, { height = 200, id } = {}) {
    this.title = title;
    this.series = series;
    this.height = height;
    this.steps = [];
    this.values = series.map(() => []);
    this.index = new Map();
    this.plot = null;
    this.pending = false;
    this.empty = h("p.chart-empty", { text: "No data yet" });
    this.body = h("div.chart-body", {});
    this.element = h(
      "figure.chart",
      { "data-chart": id || title, "data-points": 0, "data-series": series.length },
      h("figcaption", { text: title }),
      this.body,
      this.empty,
    );
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.element);
  }

  // Add or update one step; values: {key: number|null}. Ignored if it holds none of this chart's keys.
  addRow(step, values) {
    if (!this.series.some((s) => s.key in values)) return;
    let at = this.index.get(step);
    if (at === undefined) {
      at = this.steps.length;
      if (at > 0 && step < this.steps[at - 1]) {
        this.insertSorted(step, values);
        return;
      }
      this.steps.push(step);
      this.values.forEach((arr) => arr.push(null));
      this.index.set(step, at);
    }
    this.series.forEach((s, i) => {
      if (s.key in values) this.values[i][at] = values[s.key];
    });
    this.schedule();
  }

  insertSorted(step, values) {
    const rows = this.steps.map((st, i) => [st, this.values.map((arr) => arr[i])]);
    rows.push([step, this.series.map((s) => (s.key in values ? values[s.key] : null))]);
    rows.sort((a, b) => a[0] - b[0]);
    this.steps = rows.map((r) => r[0]);
    this.values = this.series.map((_, i) => rows.map((r) => r[1][i]));
    this.index = new Map(this.steps.map((st, i) => [st, i]));
    this.schedule();
  }

  setSeries(series, steps, values) {
    this.series = series;
    this.steps = steps;
    this.values = values;
    this.index = new Map(steps.map((st, i) => [st, i]));
    this.element.dataset.series = series.length;
    if (this.plot) {
      this.plot.destroy();
      this.plot = null;
    }
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  width() {
    return Math.max(240, this.body.clientWidth || this.element.clientWidth - 16 || 400);
  }

  draw() {
    const data = [this.steps, ...this.values];
    this.element.dataset.points = String(this.steps.length);
    this.empty.hidden = this.steps.length > 0;
    if (!this.plot) {
      if (!this.element.isConnected) return;
      const opts = {
        width: this.width(),
        height: this.height,
        scales: { x: { time: false } },
        axes: [{ label: "step" }, { size: 64, values: (u, splits) => tickLabels(splits) }],
        cursor: { drag: { x: true, y: false } },
        series: [
          { label: "step" },
          ...this.series.map((s, i) => ({
            label: s.label,
            stroke: s.color || COLORS[i % COLORS.length],
            dash: s.dash || DASHES[Math.floor(i / COLORS.length) % DASHES.length],
            width: 2,
            spanGaps: true,
            points: { show: this.steps.length < 60 },
          })),
        ],
      };
      this.plot = new uPlot(opts, data, this.body);
      return;
    }
    this.plot.setData(data);
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: this.width(), height: this.height });
    else if (this.element.isConnected) this.schedule();
  }

  destroy() {
    this.observer.disconnect();
    if (this.plot) this.plot.destroy();
  }
}
