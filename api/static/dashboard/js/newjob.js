// New-job form: a JSON spec editor, checked by POST /v1/jobs:validate, then POST /v1/jobs.

import { api } from "./api.js";
import { fmtNumber, h } from "./util.js";

const FALLBACK = {
  name: "hh-minordpo",
  model: "var/models/tiny-llama",
  dataset: { train: "examples/data/hh-rlhf/harmless-base-test.jsonl.gz", eval_fraction: 0.05 },
  loss: { type: "minor_dpo", beta: 0.1 },
  training: { max_steps: 50, batch_size: 8, learning_rate: 5e-6, max_length: 512 },
  resources: { num_workers: 2, use_gpu: false, cpus_per_worker: 1 },
};
let draft = null; // the editor's text, kept while the tab lives

async function example() {
  try {
    const doc = await api("/openapi.json");
    const schema = doc.components.schemas.JobSpec;
    return (schema.examples && schema.examples[0]) || schema.example || FALLBACK;
  } catch {
    return FALLBACK;
  }
}

// "training.learning_rate" -> "training › learning_rate", plus the editor line where the key sits.
function readable(loc, text) {
  const parts = String(loc || "(body)").split(".");
  let line = null;
  const lastKey = [...parts].reverse().find((p) => !/^\d+$/.test(p));
  if (lastKey) {
    const idx = text.search(new RegExp(`"${lastKey.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}"\\s*:`));
    if (idx >= 0) line = text.slice(0, idx).split("\n").length;
  }
  return { path: parts.join(" › "), line };
}

// The server's estimate; each figure's basis is its tooltip, and duration is "unknown" without history.
function estimateList(e) {
  const duration = e.duration_s == null ? "unknown (no measured throughput yet)" : `${fmtNumber(e.duration_s)} s`;
  return h(
    "ul",
    { id: "spec-estimate", "aria-label": "Estimate" },
    h("li", { title: e.basis.tokens, text: `Tokens: ${e.train_tokens} train, ${e.eval_tokens} eval per pass; ${e.total_train_tokens} trained` }),
    h("li", { title: e.basis.steps, text: `Steps: ${e.steps} (${e.steps_per_epoch} per epoch)` }),
    h("li", { title: e.basis.flops, text: `FLOPs per step: ${e.flops_per_step == null ? "unknown" : fmtNumber(e.flops_per_step)}` }),
    h("li", { title: e.basis.duration, text: `Duration: ${duration}` }),
  );
}

export function renderNewJob(main) {
  const editor = h("textarea", {
    id: "spec-editor",
    name: "spec",
    rows: 24,
    spellcheck: "false",
    "aria-describedby": "spec-errors spec-help",
  });
  const errors = h("div.field-errors", { id: "spec-errors", role: "alert", "aria-live": "assertive" });
  const report = h("div.report", { id: "spec-report", "aria-live": "polite" });
  const validateBtn = h("button.ghost", { type: "button", id: "validate-spec", text: "Validate" });
  const submitBtn = h("button", { type: "submit", id: "submit-spec", text: "Submit job" });

  function showErrors(list) {
    errors.replaceChildren();
    editor.removeAttribute("aria-invalid");
    if (!list.length) return;
    editor.setAttribute("aria-invalid", "true");
    errors.append(
      h("h2", { text: list.length === 1 ? "1 problem" : `${list.length} problems` }),
      h(
        "ul",
        {},
        list.map((e) => {
          const { path, line } = readable(e.loc, editor.value);
          return h(
            "li",
            { "data-loc": e.loc },
            h("code.loc", { text: path }),
            line ? h("span.muted", { text: ` (line ${line})` }) : null,
            h("span", { text: `: ${e.msg}` }),
          );
        }),
      ),
    );
  }

  function parse() {
    try {
      return JSON.parse(editor.value);
    } catch (err) {
      showErrors([{ loc: "(JSON syntax)", msg: err.message }]);
      return undefined;
    }
  }

  async function validate() {
    report.replaceChildren();
    const spec = parse();
    if (spec === undefined) return null;
    try {
      const out = await api("/v1/jobs:validate", { method: "POST", body: spec });
      showErrors([]);
      const ds = out.dataset || {};
      report.replaceChildren(
        h("p.ok", { text: "Spec is valid." }),
        h(
          "ul",
          {},
          h("li", { text: `Rows used: ${ds.rows_used ?? "?"} (train ${ds.train_rows ?? "?"}, eval ${ds.eval_rows ?? "?"})` }),
          ds.truncated_rows !== undefined ? h("li", { text: `Truncated rows: ${fmtNumber(ds.truncated_rows)}` }) : null,
          (out.warnings || []).map((w) => h("li.warn", { text: `Warning: ${w}` })),
        ),
        out.estimate ? estimateList(out.estimate) : null,
      );
      return spec;
    } catch (err) {
      const list = err.body && err.body.errors ? err.body.errors : [{ loc: "(request)", msg: err.message }];
      showErrors(list);
      return null;
    }
  }

  validateBtn.addEventListener("click", () => validate());
  const form = h(
    "form.newjob",
    { id: "new-job-form", novalidate: true },
    h(
      "div.editor",
      {},
      h("label", { for: "spec-editor", text: "Job spec (JSON)" }),
      h("p.muted.small", { id: "spec-help", text: "Paths must lie under the server's allowed roots; dataset ids (ds_…) name uploaded files." }),
      editor,
      h("div.actions", {}, validateBtn, submitBtn),
    ),
    h("aside.side", { "aria-label": "Validation" }, errors, report),
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    submitBtn.disabled = true;
    try {
      const spec = await validate();
      if (!spec) return;
      const job = await api("/v1/jobs", { method: "POST", body: spec });
      draft = null;
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      showErrors(err.body && err.body.errors ? err.body.errors : [{ loc: "(request)", msg: err.message }]);
    } finally {
      submitBtn.disabled = false;
    }
  });
  editor.addEventListener("input", () => {
    draft = editor.value;
  });
  editor.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") form.requestSubmit();
  });

  main.replaceChildren(h("h1", { text: "New job" }), form);
  if (draft !== null) editor.value = draft;
  else example().then((spec) => {
    if (draft === null) editor.value = JSON.stringify(spec, null, 2);
  });
  return () => {};
}
