// Dashboard entry: token prompt, hash router (#/, #/jobs/<id>, #/compare, #/new).

import { auth } from "./api.js";
import { renderCompare } from "./compare.js";
import { renderJob } from "./job.js";
import { renderList } from "./list.js";
import { renderNewJob } from "./newjob.js";
import { flash, parseHash } from "./util.js";

const main = document.getElementById("main");
const panel = document.getElementById("token-panel");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
const tokenReason = document.getElementById("token-reason");
const tokenButton = document.getElementById("token-button");
let cleanup = () => {};

function showTokenPrompt(reason) {
  tokenReason.textContent = reason
    ? `${reason}. Enter an API token; it is kept in this tab only (sessionStorage).`
    : "This server asks for a bearer token. It is kept in this tab only (sessionStorage).";
  panel.hidden = false;
  tokenInput.focus();
}

function route() {
  cleanup();
  cleanup = () => {};
  const { path, params } = parseHash();
  let view = "list";
  if (auth.required && !auth.token) {
    main.replaceChildren();
    showTokenPrompt("");
    return;
  }
  const job = path.match(/^\/jobs\/([^/]+)$/);
  if (job) {
    view = "job";
    cleanup = renderJob(main, decodeURIComponent(job[1]));
  } else if (path === "/compare") {
    view = "compare";
    cleanup = renderCompare(main, params);
  } else if (path === "/new") {
    view = "new";
    cleanup = renderNewJob(main);
  } else {
    cleanup = renderList(main, params);
  }
  document.body.dataset.view = view;
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (link.dataset.nav === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

auth.onUnauthorized((reason) => {
  showTokenPrompt(auth.token ? `The token was not accepted (${reason})` : reason);
});

tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  auth.token = tokenInput.value.trim();
  tokenInput.value = "";
  panel.hidden = true;
  flash("Token saved for this tab");
  route();
});
document.getElementById("token-forget").addEventListener("click", () => {
  auth.token = "";
  flash("Token forgotten");
  route();
});
tokenButton.addEventListener("click", () => {
  panel.hidden = !panel.hidden;
  if (!panel.hidden) tokenInput.focus();
});

async function start() {
  try {
    const response = await fetch("/dashboard/config.json", { cache: "no-store" });
    auth.required = Boolean((await response.json()).auth);
  } catch {
    auth.required = false;
  }
  tokenButton.hidden = !auth.required;
  window.addEventListener("hashchange", route);
  route();
}

start();
