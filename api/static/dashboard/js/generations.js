// The job page's "Generations" panel: at one eval step (the latest unless picked), each eval prompt, its
// chosen answer and the model's greedy completion side by side. Text goes in as textContent only.

import { api } from "./api.js";
import { h } from "./util.js";

const REFRESH_MS = 15000; // after an eval step's metrics: its decode and the stored row come after them

export function generationsPanel(jobId) {
  let alive = true;
  let picked = null; // a step the user chose; null follows the latest
  let timer = null;
  const picker = h("select", { id: "generation-step", "aria-label": "Eval step", hidden: true });
  const rows = h("tbody", {});
  const note = h("p.muted", { id: "generations-note", text: "No eval generations (training.eval_generations)." });
  const table = h(
    "table.jobs.generations",
    { id: "generations", hidden: true },
    h("thead", {}, h("tr", {}, ["#", "Prompt", "Chosen answer", "Model completion"].map((t) => h("th", { scope: "col", text: t })))),
    rows,
  );

  function show(data) {
    note.hidden = data.step !== null;
    table.hidden = picker.hidden = data.step === null;
    picker.replaceChildren(...data.steps.map((s) => h("option", { value: s, text: `step ${s}`, selected: s === data.step })));
    rows.replaceChildren(
      ...data.data.map((g) =>
        h(
          "tr",
          { "data-index": g.index },
          h("td.num", { text: g.index + 1 }),
          h("td", {}, h("pre.gen.prompt", { text: g.prompt })),
          h("td", {}, h("pre.gen.chosen", { text: g.chosen })),
          h("td", {}, h("pre.gen.completion", { text: g.completion })),
        ),
      ),
    );
  }

  async function refresh() {
    try {
      const query = picked === null ? "" : `?step=${picked}`;
      const data = await api(`/v1/jobs/${jobId}/generations${query}`);
      if (alive) show(data);
    } catch {
      /* shown by the job refresh */
    }
  }

  picker.addEventListener("change", () => {
    const step = Number(picker.value);
    const options = [...picker.options];
    picked = options.length && step === Number(options[options.length - 1].value) ? null : step;
    refresh();
  });

  const element = h(
    "section.panel",
    { "aria-labelledby": "generations-title" },
    h("div.toolbar", {}, h("h2", { id: "generations-title", text: "Generations" }), picker),
    note,
    table,
  );
  return {
    element,
    refresh,
    refreshSoon() {
      if (timer === null) timer = setTimeout(() => { timer = null; refresh(); }, REFRESH_MS);
    },
    close() {
      alive = false;
      clearTimeout(timer);
    },
  };
}
