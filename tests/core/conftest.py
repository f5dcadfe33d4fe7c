"""Shared fixtures for core unit tests: repo-relative data paths and the real GPT-2 tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DATA as SHIPPED_DATA
from tests.conftest import GPT2_FILE as GPT2_TOKENIZER_FILE
from tests.conftest import REPO as REPO_ROOT

DATA_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "data"

# A minimal chat template of the usual shape (role header, content, end marker, generation prompt).
SIMPLE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def load_gpt2_tokenizer() -> Any:
    """A fresh GPT-2 fast tokenizer with EOS/pad set to <|endoftext|> (id 50256) and no chat template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER_FILE), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> Any:
    """Shared across the session: do not mutate it (use chat_tokenizer or load_gpt2_tokenizer())."""
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer() -> Any:
    """GPT-2 tokenizer with SIMPLE_CHAT_TEMPLATE set."""
    tokenizer = load_gpt2_tokenizer()
    tokenizer.chat_template = SIMPLE_CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def fresh_gpt2_tokenizer() -> Any:
    """A GPT-2 tokenizer of this test's own, free to modify."""
    return load_gpt2_tokenizer()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``<repo>/examples/data``: the real data and tokenizer (see examples/data/SOURCES.md)."""
    return SHIPPED_DATA


@pytest.fixture(scope="session")
def data_fixtures_dir() -> Path:
    """``tests/fixtures/data``: small hand-written preference files."""
    return DATA_FIXTURES


def tiny_llama(attn: str = "sdpa") -> Any:
    """A seeded 2-layer grouped-query Llama (vocab 97) in fp32 train mode, for attention/packing equivalence tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, as in real Llama models
        head_dim=8,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32).train()
