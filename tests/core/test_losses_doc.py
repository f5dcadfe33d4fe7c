"""docs/losses.md against the code: its test vectors, metric values and loss settings must hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.loss_names import LOSS_NAMES
from core.losses import LOSSES, METRIC_NAMES, WeightedLoss, pair_metrics
from core.spec import LossSpec

DOC = Path(__file__).resolve().parents[2] / "docs" / "losses.md"
EMPTY = {"", "—"}


def _table(marker: str) -> list[dict[str, str]]:
    """Rows of the Markdown table between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``."""
    text = DOC.read_text(encoding="utf-8")
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    assert begin in text and end in text, f"docs/losses.md lost its {marker} table"
    lines = [ln.strip() for ln in text.split(begin, 1)[1].split(end, 1)[0].splitlines() if ln.strip()]
    cells = [[c.strip().strip("`") for c in ln.strip("|").split("|")] for ln in lines]
    header, rows = cells[0], cells[2:]
    assert rows, f"the {marker} table has no rows"
    assert all(len(r) == len(header) for r in rows), f"ragged row in the {marker} table"
    return [dict(zip(header, r, strict=True)) for r in rows]


def _num(cell: str) -> float:
    return float(cell.replace("−", "-"))


def _settings(cell: str) -> dict[str, float]:
    if cell in EMPTY:
        return {}
    return {k.strip(): _num(v) for k, v in (kv.split("=") for kv in cell.split(","))}


VECTORS = _table("loss-vectors")
CASES = {r["case"]: tuple(_num(r[k]) for k in ("pc", "pr", "rc", "rr", "β")) for r in VECTORS}


def _lengths(lc: str, lr: str) -> dict[str, torch.Tensor]:
    if lc in EMPTY:
        return {}
    return {
        "chosen_lengths": torch.tensor([_num(lc)], dtype=torch.float64),
        "rejected_lengths": torch.tensor([_num(lr)], dtype=torch.float64),
    }


def test_cases_have_one_set_of_inputs():
    for row in VECTORS:
        assert CASES[row["case"]] == tuple(_num(row[k]) for k in ("pc", "pr", "rc", "rr", "β")), row


def test_every_registry_loss_has_a_vector():
    assert {row["loss.type"] for row in VECTORS} == set(LOSS_NAMES)


@pytest.mark.parametrize("row", VECTORS, ids=lambda r: f"{r['case']}-{r['loss.type']}")
def test_loss_vector(row):
    pc, pr, rc, rr, beta = (
        torch.tensor([_num(row[k])], dtype=torch.float64) for k in ("pc", "pr", "rc", "rr", "β")
    )
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    fn = LOSSES[row["loss.type"]]
    loss = fn(
        pc, pr, rc, rr, beta=beta.item(), **_lengths(row["lc"], row["lr"]), **_settings(row["other settings"])
    )
    loss.sum().backward()
    assert loss.item() == pytest.approx(_num(row["loss"]), abs=1e-9)
    for grad, column in ((pc.grad, "∂L/∂pc"), (pr.grad, "∂L/∂pr")):
        if row[column] not in EMPTY:
            got = 0.0 if grad is None else grad.item()
            assert got == pytest.approx(_num(row[column]), abs=1e-9), column


@pytest.mark.parametrize("row", _table("loss-batch-vectors"), ids=lambda r: f"{r['cases']}-{r['loss.type']}")
def test_batch_vector(row):
    cases = [CASES[c.strip()] for c in row["cases"].split(",")]
    pc, pr, rc, rr = (torch.tensor([c[i] for c in cases], dtype=torch.float64) for i in range(4))
    names = tuple(n.strip() for n in row["loss.type"].split(","))
    weights = (
        (1.0,) * len(names)
        if row["loss.weights"] in EMPTY
        else tuple(map(_num, row["loss.weights"].split(",")))
    )
    lc, lr = ("—", "—") if row["lc, lr"] in EMPTY else row["lc, lr"].split(",")
    lengths = _lengths(lc.strip(), lr.strip()) or {"chosen_lengths": None, "rejected_lengths": None}
    combo = WeightedLoss(names, weights, _num(row["β"]), {})
    got = combo(pc, pr, rc, rr, **lengths).mean().item()
    assert got == pytest.approx(_num(row["mean loss"]), abs=1e-9)


def test_metric_vectors_match_pair_metrics():
    rows = _table("metric-vectors")
    columns = [k for k in rows[0] if k != "metric"]
    pc, pr, rc, rr = (torch.tensor([CASES[c][i] for c in columns], dtype=torch.float64) for i in range(4))
    beta = CASES[columns[0]][4]
    losses = LOSSES["minor_dpo"](pc, pr, rc, rr, beta=beta)
    zeros = torch.zeros(len(columns), dtype=torch.float64)
    got = pair_metrics(
        losses, pc, pr, rc, rr, beta=beta, chosen_logits_mean=zeros, rejected_logits_mean=zeros
    )
    for row in rows:
        assert got[row["metric"]].tolist() == pytest.approx([_num(row[c]) for c in columns], abs=1e-9), row


def test_doc_names_every_metric():
    text = DOC.read_text(encoding="utf-8")
    missing = [name for name in METRIC_NAMES if f"`{name}`" not in text]
    assert not missing, f"docs/losses.md does not describe {missing}"


def test_settings_table_matches_loss_spec():
    rows = {r["field"]: r["default"] for r in _table("loss-settings")}
    assert set(rows) == {f"loss.{f}" for f in LossSpec.model_fields}
    defaults = LossSpec()
    for field, shown in rows.items():
        value = getattr(defaults, field.removeprefix("loss."))
        if value is None:
            assert shown == "none", field
        elif isinstance(value, str):
            assert shown == value, field
        else:
            assert _num(shown) == value, field
