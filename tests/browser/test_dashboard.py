"""The dashboard in headless Chromium against a real server: list, live job page, compare, new-job form, cancel."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from core.store import add_checkpoint, append_event, append_metrics, create_job, transition
from tests.browser.conftest import TOKEN, Console, Server, spec

pytestmark = pytest.mark.browser
expect: Any = None


@pytest.fixture(autouse=True)
def _expect() -> None:
    global expect
    from playwright.sync_api import expect as pw_expect

    pw_expect.set_options(timeout=10_000)
    expect = pw_expect


def make_job(
    server: Server,
    name: str,
    loss: str = "minor_dpo",
    lr: float = 5e-6,
    *,
    running: bool = False,
    group: str | None = None,
) -> str:
    with server.db.write() as s:
        job, _ = create_job(s, project="team-a", spec=spec(name, loss, lr, server.root), group_id=group)
        if running:
            transition(s, job.id, "running")
        return job.id


def write_metrics(server: Server, job_id: str, steps: range, *, shift: float = 0.0) -> None:
    rows = []
    for step in steps:
        loss = 0.69 * 0.97**step + shift
        rows.append(
            {
                "step": step,
                "values": {
                    "loss": loss,
                    "rewards/chosen": 0.02 * step,
                    "rewards/rejected": -0.03 * step - shift,
                    "rewards/margins": 0.05 * step + shift,
                    "rewards/accuracies": min(1.0, 0.5 + 0.03 * step),
                    "logps/chosen": -40.0 + 0.2 * step - 10 * shift,
                    "logps/rejected": -42.0 - 0.5 * step,
                    "learning_rate": 5e-6 * min(1.0, step / 5),
                    "pairs_per_second": 30.0 + (step % 3),
                    "minor_dpo/reject_gate_off_frac": 0.1 + 0.01 * step,
                },
            }
        )
    with server.db.write() as s:
        append_metrics(s, job_id, rows)


def test_list_shows_jobs_and_follows_status_changes(server: Server, page: Any) -> None:
    first = make_job(server, "list-sigmoid", "sigmoid", 1e-4)
    second = make_job(server, "list-minor", "minor_dpo", 5e-6)
    page.goto(f"{server.url}/#/")
    row = page.locator(f"tr[data-job-id='{first}']")
    expect(row).to_contain_text("list-sigmoid")
    expect(row.locator(".badge")).to_have_text("queued")
    expect(page.locator(f"tr[data-job-id='{second}']")).to_contain_text("minor_dpo")
    with server.db.write() as s:
        transition(s, first, "running")
    write_metrics(server, first, range(1, 4))
    expect(row).to_have_attribute("data-status", "running")
    expect(row.locator(".badge")).to_have_text("running")
    expect(row).to_contain_text("3")  # progress step
    server.screenshot(page, "jobs-list")
    page.get_by_label("Status").select_option("running")
    expect(page).to_have_url(re.compile(r"#/\?status=running$"))
    expect(page.locator(f"tr[data-job-id='{first}']")).to_be_visible()
    expect(page.locator(f"tr[data-job-id='{second}']")).to_have_count(0)
    with server.db.write() as s:
        transition(s, first, "succeeded")
    expect(page.locator(f"tr[data-job-id='{first}']")).to_have_count(0)  # no longer running


def test_list_pages_with_next_cursor(server: Server, page: Any) -> None:
    for i in range(21):
        make_job(server, f"page-{i:02d}")
    page.goto(f"{server.url}/#/?status=queued")
    expect(page.locator("#jobs-table tbody tr")).to_have_count(20)
    page.get_by_role("button", name="Next →").click()
    expect(page.locator(".page-label")).to_have_text("Page 2")
    expect(page.locator("#jobs-table tbody tr").first).to_be_visible()
    page.get_by_role("button", name="← Previous").click()
    expect(page.locator(".page-label")).to_have_text("Page 1")


def test_job_page_charts_grow_with_new_points(server: Server, page: Any) -> None:
    job = make_job(server, "live-minor", running=True)
    write_metrics(server, job, range(1, 6))
    page.goto(f"{server.url}/#/jobs/{job}")
    expect(page.locator("h1")).to_have_text("live-minor")
    loss = page.locator("figure[data-chart='loss']")
    expect(loss).to_have_attribute("data-points", "5")
    expect(page.locator("#stream-state")).to_contain_text("live")
    for chart in ("rewards", "accuracies", "logps", "lr", "throughput"):
        expect(page.locator(f"figure[data-chart='{chart}']")).to_have_attribute("data-points", "5")
    write_metrics(server, job, range(6, 13))
    with server.db.write() as s:
        add_checkpoint(s, job, 10, str(server.root / "ckpt-10"), {"loss": 0.5})
        append_event(s, job, "warning", "padding waste 41%", {"waste": 0.41})
    expect(loss).to_have_attribute("data-points", "12")
    expect(page.locator("#events-log")).to_contain_text("padding waste 41%")
    expect(page.locator("#checkpoints")).to_contain_text("ckpt-10")
    expect(page.locator("#job-spec")).to_contain_text('"minor_dpo"')
    server.screenshot(page, "job-live")
    with server.db.write() as s:
        transition(s, job, "failed", error=("nan_loss", "NaN loss at step 12: lower the learning rate"))
    expect(page.locator("#job-status .badge")).to_have_text("failed")
    expect(page.locator("#job-error")).to_contain_text("NaN loss at step 12")
    expect(page.locator("#stream-state")).to_have_text("ended")
    expect(page.locator("#cancel-job")).to_be_hidden()  # an ended job offers no cancel
    server.screenshot(page, "job-failed")


def test_compare_overlays_two_jobs(server: Server, page: Any) -> None:
    a = make_job(server, "cmp-sigmoid", "sigmoid", 1e-4, running=True)
    b = make_job(server, "cmp-minor", "minor_dpo", 5e-6, running=True)
    write_metrics(server, a, range(1, 21), shift=0.3)
    write_metrics(server, b, range(1, 21))
    page.goto(f"{server.url}/#/")
    page.get_by_label("Select cmp-sigmoid to compare").check()
    page.get_by_label("Select cmp-minor to compare").check()
    page.get_by_role("button", name=re.compile(r"Compare selected")).click()
    expect(page).to_have_url(re.compile(r"#/compare\?ids=.+&metric=loss$"))
    chart = page.locator("figure[data-chart='compare']")
    expect(chart).to_have_attribute("data-series", "2")
    expect(chart).to_have_attribute("data-points", "20")
    page.goto(f"{server.url}/#/compare?ids={a},{b}&metric=logps/chosen")
    expect(page.get_by_label("Metric")).to_have_value("logps/chosen")
    expect(chart).to_have_attribute("data-points", "20")
    legend = page.locator("#compare-legend li")
    expect(legend).to_have_count(2)
    expect(legend.nth(0)).to_contain_text("cmp-sigmoid")
    expect(legend.nth(0)).to_contain_text("loss sigmoid, learning rate 0.0001")
    expect(legend.nth(1)).to_contain_text("loss minor_dpo, learning rate 0.000005")
    expect(page.locator(".u-legend")).to_contain_text("cmp-minor · minor_dpo · lr 5.00e-6")
    server.screenshot(page, "compare")


def test_compare_a_sweep_group_by_its_link(server: Server, page: Any) -> None:
    ids = [
        make_job(server, f"grp-{i}", "sigmoid", 10.0**-i, running=True, group="sweep-x") for i in (4, 5, 6)
    ]
    make_job(server, "not-in-group", running=True)
    for shift, job_id in enumerate(ids):
        write_metrics(server, job_id, range(1, 11), shift=0.1 * shift)
    page.goto(f"{server.url}/#/compare?group=sweep-x&metric=loss")  # the link `minordpo sweep` prints
    expect(page.locator("#compare-group")).to_have_text("Group sweep-x")
    chart = page.locator("figure[data-chart='compare']")
    expect(chart).to_have_attribute("data-series", "3")
    legend = page.locator("#compare-legend li")
    expect(legend).to_have_count(3)
    expect(page.locator("#compare-legend")).not_to_contain_text("not-in-group")
    expect(page.locator("#compare-ids")).to_have_value(",".join(ids))  # oldest first


def test_new_job_form_shows_field_errors_then_submits(server: Server, page: Any, console: Console) -> None:
    if server.model_dir is None:
        pytest.skip("the shared GPT-2 tokenizer is needed for a spec that validates")
    console.expect_error(r"Failed to load resource: .*status of 422")  # the bad spec, on purpose
    page.goto(f"{server.url}/#/new")
    editor = page.get_by_label("Job spec (JSON)")
    expect(editor).to_have_value(re.compile(r'"name"'))
    good = {
        "name": "form-job",
        "model": str(server.model_dir),
        "dataset": {"train": str(server.root / "train.jsonl"), "eval_fraction": 0.2},
        "loss": {"type": "minor_dpo", "beta": 0.1},
        "training": {"max_steps": 5, "batch_size": 2, "max_length": 64, "learning_rate": 1e-5},
    }
    bad = {**good, "training": {**good["training"], "learning_rate": -1}}
    editor.fill(json.dumps(bad, indent=2))
    page.get_by_role("button", name="Validate").click()
    errors = page.locator("#spec-errors")
    expect(errors).to_contain_text("training › learning_rate")
    expect(errors).to_contain_text("greater than 0")
    expect(editor).to_have_attribute("aria-invalid", "true")
    server.screenshot(page, "new-job-error")
    editor.fill("{ not json")
    page.get_by_role("button", name="Submit job").click()
    expect(errors).to_contain_text("JSON syntax")
    editor.fill(json.dumps(good, indent=2))
    page.get_by_role("button", name="Validate").click()
    expect(page.locator("#spec-report")).to_contain_text("Spec is valid")
    expect(errors).to_be_empty()
    page.get_by_role("button", name="Submit job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/job_"))
    expect(page.locator("h1")).to_have_text("form-job")
    expect(page.locator("#job-status .badge")).to_have_text("queued")
    server.screenshot(page, "new-job-submitted")


def test_cancel_button(server: Server, page: Any) -> None:
    queued = make_job(server, "cancel-queued")
    page.goto(f"{server.url}/#/jobs/{queued}")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status .badge")).to_have_text("cancelled")
    expect(page.locator("#events-log")).to_contain_text("cancelled")
    expect(page.locator("#cancel-job")).to_be_hidden()  # an ended job offers no cancel
    page.reload()
    expect(page.locator("#job-status .badge")).to_have_text("cancelled")
    expect(page.locator("#cancel-job")).to_be_hidden()
    running = make_job(server, "cancel-running", running=True)
    page.goto(f"{server.url}/#/jobs/{running}")
    expect(page.locator("#job-status .badge")).to_have_text("running")
    page.get_by_role("button", name="Cancel job").click()
    expect(page.locator("#job-status .badge")).to_have_text("running (cancel requested)")
    expect(page.get_by_role("button", name="Cancel requested")).to_be_disabled()
    expect(page.locator("#events-log")).to_contain_text("cancellation requested")
    server.screenshot(page, "job-cancel-requested")


def test_a_rejected_token_brings_back_the_prompt(server: Server, page: Any, console: Console) -> None:
    console.expect_error(r"Failed to load resource: .*status of 401")  # the wrong token, on purpose
    page.goto(f"{server.url}/#/")
    page.evaluate("sessionStorage.setItem('minordpo.token', 'tok-wrong')")
    page.reload()
    panel = page.locator("#token-panel")
    expect(panel).to_be_visible()
    expect(page.locator("#token-reason")).to_contain_text("not accepted")
    expect(page.get_by_label("Token", exact=True)).to_be_focused()
    page.keyboard.type(TOKEN)
    page.keyboard.press("Enter")
    expect(panel).to_be_hidden()
    expect(page.locator("#jobs-table tbody tr").first).to_be_visible()
