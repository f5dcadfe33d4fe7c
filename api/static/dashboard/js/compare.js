// Compare view: one metric overlaid for several jobs (#/compare?ids=a,b&metric=loss, or ?group=<sweep group>).

import { api } from "./api.js";
import { COLORS, LineChart } from "./charts.js";
import { CHARTS } from "./job.js";
import { TERMINAL, describeJob, h, statusBadge } from "./util.js";

const REFRESH_MS = 4000;
const KNOWN = CHARTS.flatMap(([, , series]) => series.map(([key]) => key));

export function renderCompare(main, params) {
  let ids = (params.get("ids") || "").split(",").map((s) => s.trim()).filter(Boolean);
  const group = params.get("group");
  const metric = params.get("metric") || "loss";
  let alive = true;
  let timer = null;

  const idsInput = h("input", { id: "compare-ids", name: "ids", value: ids.join(","), size: 60, placeholder: "job_…,job_…" });
  const metricSelect = h(
    "select",
    { id: "compare-metric", name: "metric" },
    [...new Set([...KNOWN, metric])].map((m) => h("option", { value: m, text: m, selected: m === metric })),
  );
  const form = h(
    "form.toolbar",
    { id: "compare-form" },
    h("label", { for: "compare-ids", text: "Job ids" }),
    idsInput,
    h("label", { for: "compare-metric", text: "Metric" }),
    metricSelect,
    h("button", { type: "submit", text: "Show" }),
  );
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const list = idsInput.value.split(",").map((s) => s.trim()).filter(Boolean).join(",");
    location.hash = `#/compare?ids=${list}&metric=${encodeURIComponent(metricSelect.value)}`;
  });
  metricSelect.addEventListener("change", () => form.requestSubmit());

  const chart = new LineChart(metric, [], { height: 320, id: "compare" });
  const legend = h("ul.legend", { id: "compare-legend" });
  const note = h("p.muted", { id: "compare-note" });

  async function load() {
    if (!alive || (!ids.length && !group)) return;
    clearTimeout(timer);
    try {
      if (!ids.length) {
        const page = await api(`/v1/jobs?${new URLSearchParams({ group, limit: "100" })}`);
        ids = page.data.map((j) => j.id).reverse();
        idsInput.value = ids.join(",");
        if (!ids.length) {
          note.textContent = `No jobs in group ${group}.`;
          return;
        }
      }
      const q = new URLSearchParams({ names: metric, max_points: "2000" });
      const results = await Promise.all(
        ids.map(async (id) => {
          const [job, series] = await Promise.all([api(`/v1/jobs/${id}`), api(`/v1/jobs/${id}/metrics?${q}`)]);
          return { job, rows: series.data };
        }),
      );
      if (!alive) return;
      const steps = [...new Set(results.flatMap((r) => r.rows.map((row) => row.step)))].sort((a, b) => a - b);
      const at = new Map(steps.map((s, i) => [s, i]));
      const values = results.map((r) => {
        const arr = new Array(steps.length).fill(null);
        for (const row of r.rows) arr[at.get(row.step)] = row[metric] ?? null;
        return arr;
      });
      const series = results.map((r, i) => ({ key: r.job.id, label: describeJob(r.job).label, color: COLORS[i % COLORS.length] }));
      const sameShape = chart.series.length === series.length && chart.series.every((s, i) => s.label === series[i].label);
      if (sameShape) {
        chart.steps = steps;
        chart.values = values;
        chart.index = new Map(steps.map((st, i) => [st, i]));
        chart.schedule();
      } else {
        chart.setSeries(series, steps, values);
      }
      legend.replaceChildren(
        ...results.map((r, i) => {
          const { loss, lr } = describeJob(r.job);
          return h(
            "li",
            { "data-job-id": r.job.id },
            h("span.swatch", { style: `background:${COLORS[i % COLORS.length]}`, "aria-hidden": "true" }),
            h("a", { href: `#/jobs/${r.job.id}`, text: r.job.name }),
            h("span", { text: ` loss ${loss}, learning rate ${lr ?? "?"} ` }),
            statusBadge(r.job.status, r.job.cancel_requested),
          );
        }),
      );
      note.textContent = `${metric} for ${results.length} jobs, ${steps.length} steps`;
      if (results.some((r) => !TERMINAL.has(r.job.status))) timer = setTimeout(load, REFRESH_MS);
    } catch (err) {
      note.textContent = `Could not load: ${err.message}`;
    }
  }

  main.replaceChildren(
    h("h1", { text: "Compare jobs" }),
    form,
    ids.length || group
      ? h("div", {}, group ? h("p", { id: "compare-group", text: `Group ${group}` }) : null, note, chart.element, h("h2", { text: "Legend" }), legend)
      : h("p.muted", { text: "Select two or more jobs on the Jobs page, or enter their ids above." }),
  );
  load();
  return () => {
    alive = false;
    clearTimeout(timer);
    chart.destroy();
  };
}
