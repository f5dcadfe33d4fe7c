// One job: live charts fed by the SSE stream, events log, checkpoints, eval generations, spec, error, cancel.

import { api, followEvents } from "./api.js";
import { LineChart } from "./charts.js";
import { generationsPanel } from "./generations.js";
import { TERMINAL, describeJob, fmtDuration, fmtNumber, fmtTime, flash, h, progressBar, statusBadge } from "./util.js";

export const CHARTS = [
  ["loss", "Loss", [["loss", "train"], ["eval/loss", "eval"]]],
  ["rewards", "Rewards", [["rewards/chosen", "chosen"], ["rewards/rejected", "rejected"], ["rewards/margins", "margins"]]],
  ["accuracies", "Accuracy and MinorDPO gate", [["rewards/accuracies", "accuracy"], ["eval/rewards/accuracies", "eval accuracy"], ["minor_dpo/reject_gate_off_frac", "reject gate off"]]],
  ["logps", "Log-probs (summed)", [["logps/chosen", "chosen"], ["logps/rejected", "rejected"]]],
  ["lr", "Learning rate", [["learning_rate", "learning rate"]]],
  ["throughput", "Throughput (pairs/s)", [["pairs_per_second", "pairs per second"]]],
];
const MAX_EVENTS = 500;

export function renderJob(main, jobId) {
  let job = null;
  let alive = true;
  const charts = CHARTS.map(
    ([id, title, series]) => new LineChart(title, series.map(([key, label]) => ({ key, label })), { id }),
  );
  const title = h("h1", { text: jobId });
  const badge = h("span", { id: "job-status", "aria-live": "polite" });
  const live = h("span.live", { id: "stream-state", text: "connecting…" });
  const cancelBtn = h("button.danger", { type: "button", id: "cancel-job", text: "Cancel job", disabled: true });
  const summary = h("dl.summary", { id: "job-summary" });
  const errorBox = h("div.error", { id: "job-error", role: "alert", hidden: true });
  const eventsList = h("ol.events", { id: "events-log", "aria-live": "off" });
  const checkpoints = h("tbody", {});
  const specPre = h("pre.spec", { id: "job-spec", tabindex: 0 });
  const derived = h("span", { id: "derived-jobs", text: "none" });
  const generations = generationsPanel(jobId);

  function showJob(data) {
    job = data;
    title.textContent = data.name;
    badge.replaceChildren(statusBadge(data.status, data.cancel_requested));
    const terminal = TERMINAL.has(data.status);
    cancelBtn.hidden = terminal; // an ended job has nothing to cancel
    cancelBtn.disabled = terminal || data.cancel_requested;
    cancelBtn.textContent = data.cancel_requested && !terminal ? "Cancel requested" : "Cancel job";
    const { loss, lr } = describeJob(data);
    const m = data.metrics || {};
    const items = [
      ["Id", data.id],
      ["Loss function", loss],
      ["Learning rate", fmtNumber(lr)],
      ["Progress", progressBar(data.progress)],
      ["Latest loss", fmtNumber(m.loss)],
      ["Created", fmtTime(data.created_at)],
      ["Duration", fmtDuration(data.started_at, data.finished_at)],
      ["Attempt", String(data.attempt || 0)],
    ];
    if (data.source_job) {
      const from = data.source_step == null ? "final model" : `checkpoint at step ${data.source_step}`;
      items.push(["Started from", h("span", { id: "source-job" }, h("a", { href: `#/jobs/${data.source_job}`, text: data.source_job }), ` (${from})`)]);
    }
    items.push(["Chained jobs", derived]);
    if (data.queue_position) items.push(["Queue position", String(data.queue_position)]);
    if (data.queue_reason) items.push(["Waiting for", data.queue_reason]);
    summary.replaceChildren(...items.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
    errorBox.hidden = !data.error;
    if (data.error) {
      errorBox.replaceChildren(h("strong", { text: `Failed (${data.error.code}): ` }), data.error.message);
    }
    specPre.textContent = JSON.stringify(data.spec, null, 2);
  }

  async function refreshJob() {
    try {
      const data = await api(`/v1/jobs/${jobId}`);
      if (alive) showJob(data);
    } catch (err) {
      if (alive && err.status === 404) main.replaceChildren(h("p.error", { role: "alert", text: `No job ${jobId} (or it belongs to another project).` }));
    }
  }

  // Progress and latest metrics follow the stream, at most every 2 s.
  let refreshTimer = null;
  function refreshSoon() {
    if (refreshTimer === null) refreshTimer = setTimeout(() => { refreshTimer = null; refreshJob(); }, 2000);
  }

  async function refreshCheckpoints() {
    try {
      const data = await api(`/v1/jobs/${jobId}/checkpoints`);
      if (!alive) return;
      checkpoints.replaceChildren(
        ...(data.data.length
          ? data.data.map((c) => h("tr", {}, h("td.num", { text: c.step }), h("td", {}, h("code", { text: c.path })), h("td", { text: fmtTime(c.created_at) })))
          : [h("tr", {}, h("td", { colspan: 3, class: "muted", text: "No checkpoints yet." }))]),
      );
    } catch {
      /* shown by the job refresh */
    }
  }

  async function refreshDerived() {
    try {
      const data = await api(`/v1/jobs/${jobId}/derived`);
      if (!alive || !data.data.length) return;
      derived.replaceChildren(
        ...data.data.flatMap((d, i) => [
          ...(i ? [", "] : []),
          h("a", { href: `#/jobs/${d.id}`, text: d.name }),
          d.source_step == null ? "" : ` (step ${d.source_step})`,
        ]),
      );
    } catch {
      /* shown by the job refresh */
    }
  }

  function logEvent(message) {
    const when = new Date(message.time * 1000).toLocaleTimeString();
    const kind = message.type === "status" ? `status → ${message.status}` : message.kind;
    eventsList.append(h("li", { "data-kind": message.kind || "status" }, h("time", { text: when }), h("span.kind", { text: kind }), h("span", { text: message.message || "" })));
    while (eventsList.children.length > MAX_EVENTS) eventsList.firstElementChild.remove();
    eventsList.scrollTop = eventsList.scrollHeight;
  }

  const stream = followEvents(`/v1/jobs/${jobId}/events`, {
    isFinal: (m) => m.type === "status" && TERMINAL.has(m.status),
    onState: (state) => {
      live.textContent = state === "live" ? "● live" : state;
      live.dataset.state = state;
    },
    onMessage: (message) => {
      if (message.type === "metrics") {
        for (const chart of charts) chart.addRow(message.step, message.values);
        refreshSoon();
        // generations are stored at eval steps only, right after that step's eval metrics
        if (Object.keys(message.values || {}).some((k) => k.startsWith("eval/"))) generations.refreshSoon();
        return;
      }
      logEvent(message);
      if (message.type === "status" || message.kind === "cancel_requested") refreshJob();
      if (message.type === "status" && TERMINAL.has(message.status)) generations.refresh();
      if (message.kind === "checkpoint") refreshCheckpoints();
    },
  });

  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    try {
      showJob(await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }));
      flash(`Cancellation requested for ${job ? job.name : jobId}`);
    } catch (err) {
      flash(`Cancel failed: ${err.message}`);
      cancelBtn.disabled = false;
    }
  });

  main.replaceChildren(
    h("div.toolbar", {}, h("a.back", { href: "#/", text: "← Jobs" }), title, badge, live, cancelBtn),
    errorBox,
    summary,
    h("section.charts", { "aria-label": "Metrics" }, charts.map((c) => c.element)),
    h(
      "div.columns",
      {},
      h("section.panel", { "aria-labelledby": "events-title" }, h("h2", { id: "events-title", text: "Events" }), eventsList),
      h(
        "section.panel",
        { "aria-labelledby": "ckpt-title" },
        h("h2", { id: "ckpt-title", text: "Checkpoints" }),
        h("table.jobs", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Step", "Path", "Saved"].map((t) => h("th", { scope: "col", text: t })))), checkpoints),
      ),
    ),
    generations.element,
    h("section.panel", { "aria-labelledby": "spec-title" }, h("h2", { id: "spec-title", text: "Spec" }), specPre),
  );
  for (const chart of charts) chart.schedule();
  refreshJob();
  refreshCheckpoints();
  refreshDerived();
  generations.refresh();
  return () => {
    alive = false;
    generations.close();
    stream.close();
    clearTimeout(refreshTimer);
    charts.forEach((c) => c.destroy());
  };
}
