"""Does packing several pairs per row pay on this machine? Score HH-RLHF batches with each row layout, in one process.

Workloads (batch 8, max_length 512, the bench model of bench/train_vs_trl.py): ``train`` = forward and
backward of the DPO loss on length-grouped batches (the training loop's order); ``eval`` = no-grad
scoring of batches in file order (the eval pass); ``reference`` = no-grad scoring of batches sorted by
width (the reference pass). Layouts take turns within each repetition; the median time per layout is
reported with its ratio to ``pairs_per_row`` 1 measured in the same run, both as wall-clock time and
as this process's CPU time (steadier than wall-clock time on a machine shared with other work).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "bench" / "out" / "model"
HH_FILE = REPO / "examples" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = REPO / "examples" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
BATCH, MAX_LENGTH = 8, 512
LAYOUTS = {"1": 1, "2": 2, "auto": None}


def batches(pairs: list, workload: str) -> list[list[int]]:
    from core.data import LengthGroupedBatches

    if workload == "train":
        return LengthGroupedBatches([p.length for p in pairs], BATCH, seed=0).epoch(0)
    order = list(range(len(pairs)))
    if workload == "reference":
        order.sort(
            key=lambda i: -(len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids))
        )
    return [order[k : k + BATCH] for k in range(0, len(order), BATCH)]


def run_once(scorer, pairs: list, plan: list[list[int]], layout, workload: str) -> tuple[float, float, float]:
    """Wall-clock and CPU seconds for one pass over ``plan``, and the padding fraction of its rows."""
    from core.losses import WeightedLoss

    loss_fn = WeightedLoss(("sigmoid",), (1.0,), 0.1, {})
    tokens = slots = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    for idx in plan:
        batch = layout.pack([pairs[i] for i in idx], idx)
        tokens, slots = tokens + batch.num_tokens, slots + batch.segments.numel()
        if workload == "train":
            scores = scorer(batch)
            zeros = torch.zeros(batch.num_pairs)
            lengths = {"chosen_lengths": batch.chosen_lengths, "rejected_lengths": batch.rejected_lengths}
            loss_fn(scores.chosen_logps, scores.rejected_logps, zeros, zeros, **lengths).mean().backward()
        else:
            with torch.no_grad():
                scorer(batch)
    return time.perf_counter() - started, time.process_time() - cpu_started, 1.0 - tokens / slots


def main() -> None:
    from core.data import prepare_data
    from core.models import load_model, load_tokenizer, make_tiny_model
    from core.packing import RowLayout
    from core.scoring import PairScorer
    from core.spec import DatasetSpec

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=64, help="HH-RLHF pairs per workload pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="+", default=["train", "eval", "reference"])
    args = parser.parse_args()
    if not (MODEL_DIR / "config.json").exists():
        make_tiny_model(MODEL_DIR, tokenizer=GPT2, size="small", seed=0)
    tok = load_tokenizer(str(MODEL_DIR))
    pairs = prepare_data(DatasetSpec(train=str(HH_FILE), max_rows=args.pairs), tok, MAX_LENGTH, seed=0).train
    scorer = PairScorer(load_model(str(MODEL_DIR)).train())
    results = {"pairs": len(pairs), "threads": torch.get_num_threads(), "workloads": {}}
    for workload in args.workloads:
        plan = batches(pairs, workload)
        wall: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        cpu: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        padding: dict[str, float] = {}
        run_once(scorer, pairs, plan[:2], RowLayout(), workload)  # warm-up
        for _ in range(args.repeats):
            for name, per_row in LAYOUTS.items():
                layout = RowLayout(per_row, MAX_LENGTH)
                seconds, cpu_seconds, padding[name] = run_once(scorer, pairs, plan, layout, workload)
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
        results["workloads"][workload] = {
            name: {
                "pairs_per_second": round(len(pairs) / statistics.median(wall[name]), 2),
                "speedup_vs_1": round(statistics.median(wall["1"]) / statistics.median(wall[name]), 3),
                "cpu_speedup_vs_1": round(statistics.median(cpu["1"]) / statistics.median(cpu[name]), 3),
                "padding_fraction": round(padding[name], 3),
                "rows": sum(
                    len(RowLayout(per_row, MAX_LENGTH).rows([pairs[i] for i in idx])) for idx in plan
                ),
                "seconds": [round(s, 2) for s in wall[name]],
                "cpu_seconds": [round(s, 2) for s in cpu[name]],
            }
            for name, per_row in LAYOUTS.items()
        }
        print(workload, json.dumps(results["workloads"][workload]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
