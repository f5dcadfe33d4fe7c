"""The dashboard in headless Chromium: a job page's eval generations, latest step first, a step picker, text kept as text."""

from __future__ import annotations

from typing import Any

import pytest

from core.store import add_generations, create_job
from tests.browser.conftest import Server, spec

pytestmark = pytest.mark.browser


def test_job_page_shows_prompt_chosen_and_completion_per_step(server: Server, page: Any) -> None:
    from playwright.sync_api import expect

    with server.db.write() as s:
        job, _ = create_job(s, project="team-a", spec=spec("gen-job", "sigmoid", 1e-5, server.root))
        for step, word in ((2, "early"), (4, "late")):
            samples = [
                {"prompt": f"Question {i}?", "chosen": f" Answer {i}.", "completion": f" {word} {i}"}
                for i in range(3)
            ]
            samples[0]["completion"] = f"<b>{word}</b> & <script>"  # shown as text, not markup
            add_generations(s, job.id, step, samples)
    page.goto(f"{server.url}/#/jobs/{job.id}")
    table = page.locator("#generations")
    expect(table.locator("tbody tr")).to_have_count(3)
    first = table.locator("tbody tr").first
    expect(first.locator("pre.prompt")).to_have_text("Question 0?")
    expect(first.locator("pre.chosen")).to_have_text(" Answer 0.")
    expect(first.locator("pre.completion")).to_have_text("<b>late</b> & <script>")
    assert first.locator("pre.completion b").count() == 0
    picker = page.locator("#generation-step")
    expect(picker).to_have_value("4")
    picker.select_option("2")
    expect(table.locator("tbody tr").nth(1).locator("pre.completion")).to_have_text(" early 1")
    server.screenshot(page, "job-generations")


def test_a_job_without_generations_says_so(server: Server, page: Any) -> None:
    from playwright.sync_api import expect

    with server.db.write() as s:
        job, _ = create_job(s, project="team-a", spec=spec("no-gen-job", "sigmoid", 1e-5, server.root))
    page.goto(f"{server.url}/#/jobs/{job.id}")
    expect(page.locator("#generations-note")).to_contain_text("No eval generations")
    expect(page.locator("#generations")).to_be_hidden()
