// Small DOM and formatting helpers shared by the views.

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

// h("tag.class", {attr: value, onclick: fn}, ...children) -> Element
export function h(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "text") el.textContent = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function statusBadge(status, cancelRequested = false) {
  const label = cancelRequested && status === "running" ? "running (cancel requested)" : status;
  return h(`span.badge.s-${status}`, { "data-status": status, text: label });
}

export function fmtNumber(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2);
  return String(Number(value.toPrecision(digits)));
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function fmtDuration(startIso, endIso) {
  if (!startIso) return "–";
  const start = new Date(startIso).getTime();
  const end = endIso ? new Date(endIso).getTime() : Date.now();
  let s = Math.max(0, Math.round((end - start) / 1000));
  const hours = Math.floor(s / 3600);
  s -= hours * 3600;
  const minutes = Math.floor(s / 60);
  s -= minutes * 60;
  if (hours) return `${hours}h ${minutes}m`;
  if (minutes) return `${minutes}m ${s}s`;
  return `${s}s`;
}

export function progressText(progress) {
  if (!progress) return "–";
  return progress.total_steps ? `${progress.step} / ${progress.total_steps}` : `${progress.step}`;
}

export function progressBar(progress) {
  const total = progress && progress.total_steps;
  const step = (progress && progress.step) || 0;
  const wrap = h("span.progress", {});
  wrap.append(h("span.progress-text", { text: progressText(progress) }));
  if (total) {
    const pct = Math.min(100, Math.round((100 * step) / total));
    wrap.append(h("progress", { max: 100, value: pct, "aria-label": `${pct}% of steps done` }));
  }
  return wrap;
}

// "hash" routes: #/path?query -> {path, params}
export function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  return { path, params: new URLSearchParams(query) };
}

export function describeJob(job) {
  const spec = job.spec || {};
  const loss = (spec.loss && spec.loss.type) || "?";
  const lr = spec.training && spec.training.learning_rate;
  return { loss, lr, label: `${job.name} · ${loss} · lr ${lr === undefined ? "?" : fmtNumber(lr)}` };
}

export function flash(text) {
  const el = document.getElementById("flash");
  el.textContent = text;
  if (text) setTimeout(() => { if (el.textContent === text) el.textContent = ""; }, 3000);
}
