// Jobs list: status filter, cursor pages, auto-refresh, checkboxes to compare runs.

import { api } from "./api.js";
import { STATUSES, describeJob, fmtDuration, fmtNumber, fmtTime, h, progressBar, statusBadge } from "./util.js";

const REFRESH_MS = 2000;
const PAGE = 20;
const selected = new Set(); // kept across refreshes and pages

export function renderList(main, params) {
  const status = params.get("status") || "";
  const cursors = [null]; // cursor of each page seen: Previous goes back one
  let page = 0;
  let timer = null;
  let alive = true;

  const filter = h(
    "select",
    { id: "status-filter", name: "status" },
    h("option", { value: "", text: "All" }),
    STATUSES.map((s) => h("option", { value: s, text: s, selected: s === status })),
  );
  filter.addEventListener("change", () => {
    location.hash = filter.value ? `#/?status=${filter.value}` : "#/";
  });
  const compareBtn = h("button", { type: "button", id: "compare-selected", disabled: true });
  compareBtn.addEventListener("click", () => {
    location.hash = `#/compare?ids=${[...selected].join(",")}&metric=loss`;
  });
  const prevBtn = h("button.ghost", { type: "button", id: "prev-page", text: "← Previous", disabled: true });
  const nextBtn = h("button.ghost", { type: "button", id: "next-page", text: "Next →", disabled: true });
  const pageLabel = h("span.page-label", { "aria-live": "polite" });
  const tbody = h("tbody", {});
  const updated = h("span.muted", { id: "list-updated" });
  const table = h(
    "table.jobs",
    { id: "jobs-table" },
    h("caption.sr-only", { text: "Jobs, newest first" }),
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["Compare", "Name", "Status", "Progress", "Loss", "Accuracy", "Margin", "Created", "Duration"].map((t) =>
          h("th", { scope: "col", text: t }),
        ),
      ),
    ),
    tbody,
  );

  function updateCompare() {
    compareBtn.textContent = `Compare selected (${selected.size})`;
    compareBtn.disabled = selected.size < 2;
  }

  function row(job) {
    const m = job.metrics || {};
    const box = h("input", {
      type: "checkbox",
      "aria-label": `Select ${job.name} to compare`,
      "data-compare": job.id,
      checked: selected.has(job.id),
    });
    box.addEventListener("change", () => {
      if (box.checked) selected.add(job.id);
      else selected.delete(job.id);
      updateCompare();
    });
    const { loss } = describeJob(job);
    return h(
      "tr",
      { "data-job-id": job.id, "data-status": job.status },
      h("td", {}, box),
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, text: job.name }), h("div.muted.small", { text: `${loss} · ${job.id}` })),
      h("td", {}, statusBadge(job.status, job.cancel_requested)),
      h("td", {}, progressBar(job.progress)),
      h("td.num", { text: fmtNumber(m.loss) }),
      h("td.num", { text: fmtNumber(m["rewards/accuracies"], 3) }),
      h("td.num", { text: fmtNumber(m["rewards/margins"]) }),
      h("td", { text: fmtTime(job.created_at) }),
      h("td", { text: fmtDuration(job.started_at, job.finished_at) }),
    );
  }

  async function load() {
    if (!alive) return;
    clearTimeout(timer);
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (status) q.set("status", status);
    if (cursors[page]) q.set("after", cursors[page]);
    try {
      const data = await api(`/v1/jobs?${q}`);
      if (!alive) return;
      tbody.replaceChildren(
        ...(data.data.length
          ? data.data.map(row)
          : [h("tr", {}, h("td", { colspan: 9, class: "muted", text: "No jobs here yet." }))]),
      );
      cursors[page + 1] = data.next_cursor;
      nextBtn.disabled = !data.next_cursor;
      prevBtn.disabled = page === 0;
      pageLabel.textContent = `Page ${page + 1}`;
      updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
      main.querySelector(".list-error")?.remove();
    } catch (err) {
      if (!alive) return;
      if (!main.querySelector(".list-error")) main.prepend(h("p.error.list-error", { role: "alert", text: `Could not load jobs: ${err.message}` }));
    }
    timer = setTimeout(load, REFRESH_MS);
  }

  nextBtn.addEventListener("click", () => {
    if (cursors[page + 1]) {
      page += 1;
      load();
    }
  });
  prevBtn.addEventListener("click", () => {
    if (page > 0) {
      page -= 1;
      load();
    }
  });

  main.replaceChildren(
    h(
      "div.toolbar",
      {},
      h("h1", { text: "Jobs" }),
      h("label", { for: "status-filter", text: "Status" }),
      filter,
      compareBtn,
      updated,
    ),
    h("div.table-wrap", {}, table),
    h("div.pager", {}, prevBtn, pageLabel, nextBtn),
  );
  updateCompare();
  load();
  return () => {
    alive = false;
    clearTimeout(timer);
  };
}
