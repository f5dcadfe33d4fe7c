"""The dashboard in headless Chromium: the chained-job link on both job pages, the estimate in the new-job form."""

from __future__ import annotations

import json
from typing import Any

import pytest

from core.store import create_job
from tests.browser.conftest import Server, spec

pytestmark = pytest.mark.browser


def stored_job(server: Server, name: str, model: dict[str, Any] | None = None) -> str:
    body = spec(name, "sigmoid", 1e-5, server.root)
    if model is not None:
        body["model"] = {**body["model"], **model}
    with server.db.write() as s:
        job, _ = create_job(s, project="team-a", spec=body)
        return job.id


def test_both_job_pages_show_the_chain(server: Server, page: Any) -> None:
    from playwright.sync_api import expect

    source = stored_job(server, "chain-source")
    derived = stored_job(server, "chain-derived", {"from_job": source, "step": 2})
    page.goto(f"{server.url}/#/jobs/{derived}")
    link = page.locator("#source-job")
    expect(link).to_contain_text(f"{source} (checkpoint at step 2)")
    link.get_by_role("link").click()
    expect(page.locator("h1")).to_have_text("chain-source")
    expect(page.locator("#derived-jobs")).to_have_text("chain-derived (step 2)")
    page.locator("#derived-jobs").get_by_role("link").click()
    expect(page.locator("h1")).to_have_text("chain-derived")
    server.screenshot(page, "chained-job")


def test_new_job_form_shows_the_estimate(server: Server, page: Any) -> None:
    from playwright.sync_api import expect

    if server.model_dir is None:
        pytest.skip("the shared GPT-2 tokenizer is needed for a spec that validates")
    page.goto(f"{server.url}/#/new")
    good = {
        "name": "estimate-job",
        "model": str(server.model_dir),
        "dataset": {"train": str(server.root / "train.jsonl")},
        "training": {"max_steps": 5, "batch_size": 2, "max_length": 64},
    }
    page.get_by_label("Job spec (JSON)").fill(json.dumps(good, indent=2))
    page.get_by_role("button", name="Validate").click()
    estimate = page.locator("#spec-estimate")
    # the server's first dry run loads transformers and the tokenizer: slow on a busy machine
    expect(estimate).to_contain_text("Steps: 5 (6 per epoch)", timeout=90_000)
    expect(estimate).to_contain_text("Duration: unknown (no measured throughput yet)")
    # a tokenizer-only folder has no config.json: no parameter count, so no FLOPs
    expect(estimate).to_contain_text("FLOPs per step: unknown")
    server.screenshot(page, "new-job-estimate")
