"""Benchmark our DPO training loop against TRL's DPOTrainer on HH-RLHF: pairs/s, peak RSS, last-step loss."""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
DATA = REPO / "examples" / "data"
HH_FILE = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = DATA / "tokenizers" / "gpt2" / "tokenizer.json"
MODEL_DIR = OUT / "model"
ROWS = OUT / "rows.jsonl"  # the selected pairs, in HH file order (our loop's input)
TRL_ROWS = (
    OUT / "rows_trl_order.jsonl"
)  # the same pairs in our loop's batch order (TRL reads them sequentially)
BATCH, MAX_LENGTH, BETA, LR, SEED = 8, 512, 0.1, 5e-6, 0
CONFIGS = ("trl_default", "trl_fastest", "ours_sigmoid", "ours_minor_dpo", "ours_live_ref")
OURS: dict[str, dict[str, Any]] = {
    "ours_sigmoid": {"loss": "sigmoid", "precompute": True},
    "ours_minor_dpo": {"loss": "minor_dpo", "precompute": True},
    "ours_live_ref": {"loss": "sigmoid", "precompute": False},
}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fresh_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


# ----- data and model, prepared once -------------------------------------------------------------
def prepare(steps: int) -> dict[str, Any]:
    """Make the model, pick steps*8 untruncated HH pairs whose token boundaries are stable, write both orders."""
    from core.data import LengthGroupedBatches, encode_batch, normalise, prepare_data, read_rows
    from core.models import load_tokenizer, make_tiny_model
    from core.spec import DatasetSpec

    if not (MODEL_DIR / "config.json").exists():
        make_tiny_model(MODEL_DIR, tokenizer=GPT2, size="small", seed=SEED)
    tok = load_tokenizer(str(MODEL_DIR))
    need, texts, skipped = steps * BATCH, [], {"truncated": 0, "boundary": 0, "bad_row": 0}
    for _, row in read_rows(HH_FILE):
        try:
            text = normalise(row, "implicit_prompt")
        except Exception:  # noqa: BLE001 - RowError: a row our loader would skip
            skipped["bad_row"] += 1
            continue
        [(pair, _)] = encode_batch([text], tok, MAX_LENGTH)
        if isinstance(pair, Exception) or pair.truncated:
            skipped["truncated"] += 1
            continue
        # TRL tokenises prompt+completion in one go: keep rows where that gives the same ids as ours
        joint_c = tok(text.prompt + text.chosen)["input_ids"] + [tok.eos_token_id]
        joint_r = tok(text.prompt + text.rejected)["input_ids"] + [tok.eos_token_id]
        if joint_c != pair.prompt_ids + pair.chosen_ids or joint_r != pair.prompt_ids + pair.rejected_ids:
            skipped["boundary"] += 1
            continue
        texts.append(text)
        if len(texts) == need:
            break
    if len(texts) < need:
        raise SystemExit(f"only {len(texts)} usable pairs for {steps} steps of {BATCH}")
    rows = [{"prompt": t.prompt, "chosen": t.chosen, "rejected": t.rejected} for t in texts]
    ROWS.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DatasetSpec(train=str(ROWS), format="standard", max_rows=need)
    data = prepare_data(spec, tok, MAX_LENGTH, SEED)  # exactly what our loop will see
    assert len(data.train) == need and not any(p.truncated for p in data.train)
    plan = LengthGroupedBatches([p.length for p in data.train], BATCH, SEED).epoch(0)
    order = [i for batch in plan for i in batch]
    TRL_ROWS.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    prompt = sum(len(p.prompt_ids) for p in data.train) / need
    completion = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in data.train) / (2 * need)
    return {
        "pairs": need,
        "skipped": skipped,
        "mean_prompt_tokens": prompt,
        "mean_completion_tokens": completion,
    }


# ----- our loop ---------------------------------------------------------------------------------
class TimingReporter:
    """Records when the step loop starts and each step's end time and loss."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.step_times: list[float] = []
        self.losses: list[float] = []

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "started":
            self.started = time.perf_counter()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self.step_times.append(time.perf_counter())
            self.losses.append(values["loss"])

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def run_ours(name: str, steps: int) -> dict[str, Any]:
    import core.training as training
    from core.spec import JobSpec

    precompute_s = 0.0
    original = training.build_reference

    def timed_reference(*args: Any, **kwargs: Any) -> Any:  # the whole reference phase (hash, pass, cache)
        nonlocal precompute_s
        t0 = time.perf_counter()
        source = original(*args, **kwargs)
        if OURS[name]["precompute"]:
            precompute_s += time.perf_counter() - t0  # live: only a model load, excluded like TRL's ref load
        return source

    training.build_reference = timed_reference
    cfg, run_dir = OURS[name], fresh_dir(OUT / "runs" / name)
    spec = JobSpec(
        name=f"bench-{name}",
        model=str(MODEL_DIR),
        dataset={"train": str(ROWS), "format": "standard", "max_rows": steps * BATCH},
        loss={"type": cfg["loss"], "beta": BETA},
        training={
            "max_steps": steps,
            "batch_size": BATCH,
            "learning_rate": LR,
            "lr_scheduler": "linear",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "adam_epsilon": 1e-8,
            "max_grad_norm": 1.0,
            "max_length": MAX_LENGTH,
            "seed": SEED,
            "precompute_ref_logps": cfg["precompute"],
        },
    )
    rep = TimingReporter()
    options = training.RunOptions(output_dir=run_dir, cache_dir=fresh_dir(run_dir / "ref-cache"))
    result = training.train(spec, options, rep)
    assert rep.started is not None and len(rep.losses) == result.step == steps
    seconds = precompute_s + rep.step_times[-1] - rep.started
    return {"seconds": seconds, "precompute_s": precompute_s, "losses": rep.losses, "steps": result.step}


# ----- TRL --------------------------------------------------------------------------------------
def run_trl(name: str, steps: int) -> dict[str, Any]:
    import datasets
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from core.models import load_tokenizer

    precompute_s, step_times, losses = [0.0], [], []
    began: list[float] = []

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            precompute_s[0] += time.perf_counter() - t0
            return out

        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            loss = super().training_step(*args, **kwargs)
            losses.append(float(loss))
            return loss

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            began.append(time.perf_counter())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_times.append(time.perf_counter())

    run_dir = fresh_dir(OUT / "runs" / name)
    common: dict[str, Any] = {
        # the experiment, identical for every configuration (not performance settings)
        "output_dir": str(run_dir),
        "per_device_train_batch_size": BATCH,
        "max_steps": steps,
        "learning_rate": LR,
        "beta": BETA,
        "max_length": MAX_LENGTH,
        "loss_type": ["sigmoid"],
        "seed": SEED,
        "train_sampling_strategy": "sequential",  # rows are already in our loop's batch order
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "use_cpu": True,  # see README: without it the bf16 default refuses to start on this CPU machine
    }
    if name == "trl_fastest":
        common |= {"bf16": False, "precompute_ref_log_probs": True, "gradient_checkpointing": False}
    args = DPOConfig(**common)
    rows = [json.loads(line) for line in TRL_ROWS.read_text().splitlines()]
    trainer = TimedDPOTrainer(
        model=str(MODEL_DIR),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(str(MODEL_DIR)),
        callbacks=[Clock()],
    )
    trainer.train()
    assert len(losses) == len(step_times) == steps
    seconds = precompute_s[0] + step_times[-1] - began[0]
    extra = {
        "bf16": args.bf16,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optim": str(args.optim),
    }
    return {"seconds": seconds, "precompute_s": precompute_s[0], "losses": losses, "steps": steps, **extra}


# ----- orchestration ----------------------------------------------------------------------------
def child(name: str, steps: int) -> None:
    os.chdir(REPO)
    if name == "prepare":
        result = prepare(steps)
    else:
        result = run_trl(name, steps) if name.startswith("trl") else run_ours(name, steps)
        result["pairs_per_s"] = steps * BATCH / result["seconds"]
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, steps: int) -> dict[str, Any]:
    log = OUT / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["HF_DATASETS_CACHE"] = str(fresh_dir(OUT / "hf-datasets-cache" / name))  # no cached ref log-probs
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", name, "--steps", str(steps)]
    started = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); see {log}")
    result = json.loads(lines[-1][len("RESULT ") :])
    (OUT / "logs" / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(f"  {name}: done in {time.perf_counter() - started:.0f}s wall", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--steps",
        type=int,
        default=8,
        help="optimizer steps per configuration (pairs = 8x); TRL takes ~1 min/step here",
    )
    parser.add_argument("--run", help="internal: run one configuration in this process and print its RESULT")
    parser.add_argument(
        "--only", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to run"
    )
    a = parser.parse_args()
    if a.run:
        return child(a.run, a.steps)
    info = spawn("prepare", a.steps)
    print(
        f"data: {info['pairs']} HH-RLHF pairs, mean prompt {info['mean_prompt_tokens']:.0f} tokens, "
        f"mean completion {info['mean_completion_tokens']:.0f} tokens; skipped {info['skipped']}"
    )
    results = {name: spawn(name, a.steps) for name in a.only}
    print(
        f"\n{'configuration':<16} {'pairs/s':>8} {'peak RSS MiB':>13} {'last loss':>10} {'ref s':>6} {'steps':>6}"
    )
    for name, r in results.items():
        print(
            f"{name:<16} {r['pairs_per_s']:>8.2f} {r['peak_rss_mib']:>13.0f} {r['losses'][-1]:>10.6f} "
            f"{r['precompute_s']:>6.1f} {r['steps']:>6}"
        )
    if "ours_sigmoid" in results and "trl_fastest" in results:
        ours, theirs = results["ours_sigmoid"]["losses"][-1], results["trl_fastest"]["losses"][-1]
        first = abs(results["ours_sigmoid"]["losses"][0] - results["trl_fastest"]["losses"][0])
        print(
            f"\nlast-step loss ours_sigmoid {ours:.6f} vs trl_fastest {theirs:.6f}: |diff| {abs(ours - theirs):.2e}"
            f" (step 1 |diff| {first:.2e})"
        )
    if "ours_sigmoid" in results and "trl_default" in results:
        ours, base = results["ours_sigmoid"], results["trl_default"]
        print(f"rss_ratio_vs_trl_default: {ours['peak_rss_mib'] / base['peak_rss_mib']:.2f}")
        print(f"ratio_vs_trl_default: {ours['pairs_per_s'] / base['pairs_per_s']:.2f}")
    if "ours_sigmoid" in results and "trl_fastest" in results:
        print(
            f"ratio_vs_trl_fastest: {results['ours_sigmoid']['pairs_per_s'] / results['trl_fastest']['pairs_per_s']:.2f}"
        )


if __name__ == "__main__":
    main()
