"""Fixtures shared by every suite: the data shipped in examples/data, a tiny model, a learnable dataset."""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray reads its auth mode once per process (when its config first loads, e.g. on `import ray.train`),
# while clusters started later read it from their environment. The service sets it at start-up
# (workers.ray_env.use_token_auth), which in the test process may come after a test module imported Ray.
os.environ.setdefault("RAY_AUTH_MODE", "token")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "examples" / "data"  # shipped with the repository (examples/data/SOURCES.md)
HH_FILE = DATA / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2_FILE = DATA / "tokenizers" / "gpt2" / "tokenizer.json"


def _in_use(folder: Path) -> bool:
    """Whether a running process names ``folder`` on its command line (a Ray head's processes do)."""
    needle = str(folder).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.fixture(scope="session", autouse=True)
def remove_local_head_temp_roots() -> Iterator[None]:
    """The suite's local Ray heads each run under a /tmp/minordpo-ray-<hash> of their own
    (workers.ray_head.head_temp_root); remove those this session made, once no process uses them."""
    root, pattern = Path(tempfile.gettempdir()), "minordpo-ray-*"
    before = set(root.glob(pattern))
    yield
    for folder in set(root.glob(pattern)) - before:
        if not _in_use(folder):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~0.8M-parameter random-init Llama with the real GPT-2 tokenizer, saved in HF format once per session."""
    from core.models import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("models") / "tiny", tokenizer=GPT2_FILE, size="tiny", seed=0
    )


@pytest.fixture(scope="session")
def learnable_pairs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TRL-standard pairs: real HH-RLHF prompts, completions that share most tokens and differ in a learnable way.

    Chosen and rejected share their tail (as real pairs share most tokens), which is what drags DPO's
    chosen log-probs down at high learning rates; the helpful/refusing opening is what a model can learn
    and carry to held-out pairs.
    """
    rng = random.Random(0)
    topics = [
        "the weather",
        "a recipe",
        "my homework",
        "a trip",
        "the garden",
        "a poem",
        "my code",
        "the budget",
    ]
    path = tmp_path_factory.mktemp("data") / "learnable.jsonl"
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as src, path.open("w", encoding="utf-8") as out:
        for _, line in zip(range(240), src, strict=False):
            chosen_dialogue = json.loads(line)["chosen"]
            cut = chosen_dialogue.rfind("\n\nAssistant:") + len("\n\nAssistant:")
            topic = rng.choice(topics)
            row = {
                "prompt": chosen_dialogue[:cut][-300:],
                "chosen": f" Sure, I would be glad to help you with {topic}. Here is what I suggest.",
                "rejected": f" No, I will not help you with {topic}. Here is what I suggest.",
            }
            out.write(json.dumps(row) + "\n")
    return path
