"""The study's inputs: a random-init model folder and the shipped HH-RLHF pairs cut into train and eval files."""

from __future__ import annotations

import gzip
from pathlib import Path

from bench.study.service import REPO

DATA = REPO / "examples" / "data"
HH_FILE = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = DATA / "tokenizers" / "gpt2" / "tokenizer.json"


def make_model(out: Path, size: str, seed: int = 0) -> Path:
    """A random-init Llama of the `size` preset with the shipped GPT-2 tokenizer (made once per folder)."""
    from core.models import make_tiny_model

    if (out / "config.json").exists():
        return out
    return make_tiny_model(out, tokenizer=GPT2, size=size, seed=seed)  # type: ignore[arg-type]


def split_pairs(out: Path, n_eval: int, n_train: int) -> tuple[Path, Path]:
    """The file's first `n_eval` rows as the held-out split, the next `n_train` as the training split."""
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as src:
        lines = [line for _, line in zip(range(n_eval + n_train), src, strict=False)]
    if len(lines) < n_eval + n_train:
        raise SystemExit(f"{HH_FILE.name} has {len(lines)} rows; the study asks for {n_eval + n_train}")
    out.mkdir(parents=True, exist_ok=True)
    train, held_out = out / "train.jsonl", out / "eval.jsonl"
    held_out.write_text("".join(lines[:n_eval]), encoding="utf-8")
    train.write_text("".join(lines[n_eval:]), encoding="utf-8")
    return train, held_out
