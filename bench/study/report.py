"""The study's outputs: results.json (raw), results.md (table, settings, what it shows) and the PNG plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.study.jobs import EVAL_NAMES

COLUMNS = dict(
    zip(EVAL_NAMES, ("held-out reward acc.", "logps/chosen", "logps/rejected", "margin"), strict=True)
)


def aggregate(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, float], dict[str, tuple[float, float | None, int]]]:
    """(loss, lr) -> metric -> (mean, sample std over seeds or None with one seed, seeds counted)."""
    cells: dict[tuple[str, float], dict[str, list[float]]] = {}
    for row in rows:
        cell = cells.setdefault((row["loss"], row["lr"]), {name: [] for name in EVAL_NAMES})
        for name in EVAL_NAMES:
            value = (row.get("final") or {}).get(name)
            if value is not None and math.isfinite(value):
                cell[name].append(value)
    return {
        key: {
            name: (
                statistics.fmean(v) if v else math.nan,
                statistics.stdev(v) if len(v) > 1 else None,
                len(v),
            )
            for name, v in cell.items()
        }
        for key, cell in cells.items()
    }


def _cell(mean: float, spread: float | None) -> str:
    return f"{mean:.3f}" if spread is None else f"{mean:.3f} ± {spread:.3f}"


def table(agg: dict[tuple[str, float], dict[str, tuple[float, float | None, int]]]) -> str:
    """A markdown table, one row per loss × learning rate."""
    head = ["loss", "learning rate", "seeds", *COLUMNS.values()]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (loss, lr), metrics in agg.items():
        n = max(count for _, _, count in metrics.values())
        cells = [_cell(mean, spread) for mean, spread, _ in metrics.values()]
        lines.append(f"| `{loss}` | {lr:g} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(
    result: dict[str, Any], agg: dict[tuple[str, float], dict[str, tuple[float, float | None, int]]]
) -> str:
    """What the numbers say, computed from them: held-out logps/chosen at the highest LR against the SFT model's."""
    top = max(lr for _, lr in agg)
    start = result["sft"]["after"].get("eval/logps/chosen")
    parts = [
        f"`{loss}` {m['eval/logps/chosen'][0]:.1f} (accuracy {m['eval/rewards/accuracies'][0]:.2f})"
        for (loss, lr), m in agg.items()
        if lr == top
    ]
    begin = f"from the SFT model's {start:.1f} " if start is not None else ""
    return (
        f"At the highest learning rate ({top:g}), held-out `logps/chosen` went {begin}to: "
        + "; ".join(parts)
        + "."
    )


def write_json(out: Path, result: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def plot(
    out: Path,
    result: dict[str, Any],
    agg: dict[tuple[str, float], dict[str, tuple[float, float | None, int]]],
) -> list[str]:
    """metrics_vs_lr.png (each held-out metric against LR, a line per loss) and logps_chosen_vs_step.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = list(dict.fromkeys(loss for loss, _ in agg))
    fig, axes = plt.subplots(1, len(EVAL_NAMES), figsize=(4.2 * len(EVAL_NAMES), 3.6))
    for ax, name in zip(axes, EVAL_NAMES, strict=True):
        for loss in losses:
            points = sorted((lr, m[name]) for (lo, lr), m in agg.items() if lo == loss)
            lrs = [lr for lr, _ in points]
            means = [mean for _, (mean, _, _) in points]
            errs = [spread or 0.0 for _, (_, spread, _) in points]
            ax.errorbar(lrs, means, yerr=errs, marker="o", capsize=3, label=loss)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(f"held-out {COLUMNS[name].removeprefix('held-out ')}")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "metrics_vs_lr.png", dpi=110)
    plt.close(fig)

    top = max(lr for _, lr in agg)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for row in result["jobs"]:
        if row["lr"] == top and row["logps_chosen"]:
            steps, values = zip(*row["logps_chosen"], strict=True)
            ax.plot(steps, values, label=f"{row['loss']} seed {row['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("logps/chosen (training batch)")
    ax.set_title(f"logps/chosen per step at learning rate {top:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "logps_chosen_vs_step.png", dpi=110)
    plt.close(fig)
    return ["metrics_vs_lr.png", "logps_chosen_vs_step.png"]


CAVEATS = """\
What it does not show: this is a {params} random-init Llama, SFT'd for {sft_steps} steps on
{n_train} HH-RLHF (harmless-base test file) chosen answers, then {sweep_steps} preference steps per point,
with {n_eval} held-out pairs and {seeds} seed(s). It is not the paper's setting (pretrained 7B-class
models, full HH-RLHF or UltraFeedback, thousands of steps); it shows how these losses move
`logps/chosen` on this service's training loop at these learning rates, not how well any of them aligns
a real model. {seed_note}"""


def write_markdown(
    out: Path,
    result: dict[str, Any],
    agg: dict[tuple[str, float], dict[str, tuple[float, float | None, int]]],
    plots: list[str],
) -> None:
    """results.md: when, where and how it ran, the SFT NLL, the table, the plots, what it shows and not."""
    s, sft = result["settings"], result["sft"]
    seeds = len(s["seeds"])
    seed_note = (
        "With one seed there is no spread: a difference between neighbouring cells may be noise."
        if seeds == 1
        else f"± is the sample standard deviation over {seeds} seeds."
    )
    text = [
        "# Learning-rate study: sigmoid DPO, MinorDPO, DPO-Positive and IPO",
        "",
        f"- date: {result['date']} (wall time {result['wall_s'] / 60:.1f} min)",
        f"- machine: {result['machine']}",
        f"- command: `{result['command']}`",
        f"- settings (batch sizes are per worker): `{json.dumps(s)}`",
        f"- model: `{s['model_size']}` preset, {result['params']:,} parameters, random init, GPT-2 tokenizer",
        f"- SFT job `{sft['job_id']}`: held-out NLL per token {_fmt(sft['before'].get('eval/nll'))} before "
        f"(the random-init model, a 1-step job at a negligible LR) → {_fmt(sft['after'].get('eval/nll'))} "
        f"after {s['sft_steps']} steps; held-out `logps/chosen` {_fmt(sft['after'].get('eval/logps/chosen'))}",
        "",
        "Every sweep job starts from the SFT job's final model (`model.from_job`), trains on the same "
        "training pairs at a constant learning rate and reports the held-out metrics at its last step.",
        "",
        table(agg),
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
        "What it shows: " + findings(result, agg),
        "",
        CAVEATS.format(
            params=f"{result['params'] / 1e6:.1f}M-parameter",
            sft_steps=s["sft_steps"],
            n_train=s["n_train"],
            sweep_steps=s["sweep_steps"],
            n_eval=s["n_eval"],
            seeds=seeds,
            seed_note=seed_note,
        ),
        "",
    ]
    (out / "results.md").write_text("\n".join(text), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
