"""core.vocab_sharding on 2 gloo ranks: the row-sharded embeddings and head give the dense values and
gradients (each rank's own positions; the shard's gradient averaged over ranks, as FSDP's)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core.scoring import completion_logps
from core.vocab_sharding import VocabRows, VocabShardedEmbedding, VocabShardedHead
from tests.core.gloo_ranks import spawn_gloo

VOCAB, WIDTH, CHUNK, WORLD = 37, 8, 4, 2  # 37 rows over 2 ranks: 19 and 18, as torch.chunk cuts them
POSITIONS = (11, 5)  # each rank's own number of positions differs
PAD = 3


def _weight() -> torch.Tensor:
    return torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))


def _rank_data(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    n = POSITIONS[rank]
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    ids[0] = PAD  # a padding token: no gradient to its row
    return {
        "ids": ids,
        "hidden": torch.randn(n, WIDTH, generator=g),
        "grad_out": torch.randn(n, WIDTH, generator=g),
        "grad_logps": torch.randn(n, generator=g),
    }


_MESH: list = []


def _sharded(weight: torch.Tensor) -> torch.nn.Parameter:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not _MESH:
        _MESH.append(init_device_mesh("cpu", (WORLD,)))
    mesh = _MESH[0]
    return torch.nn.Parameter(distribute_tensor(weight.clone(), mesh, [Shard(0)]))


def _dense_lookup_grad(weight: torch.Tensor) -> torch.Tensor:
    """Every rank's lookup gradient, summed and divided by the world size (FSDP's average)."""
    total = torch.zeros_like(weight)
    for rank in range(WORLD):
        d = _rank_data(rank)
        w = weight.clone().requires_grad_(True)
        (F.embedding(d["ids"], w, padding_idx=PAD) * d["grad_out"]).sum().backward()
        total += w.grad
    return total / WORLD


def _check_lookup(rank: int) -> None:
    weight, d = _weight(), _rank_data(rank)
    param = _sharded(weight)
    rows = VocabRows.of(VOCAB, rank, WORLD)
    assert param.to_local().shape[0] == rows.rows  # the rows this rank holds are the DTensor's
    embeddings = VocabShardedEmbedding(param, PAD, None)
    out = embeddings(d["ids"].view(1, -1))
    assert out.shape == (1, POSITIONS[rank], WIDTH)
    torch.testing.assert_close(out[0], F.embedding(d["ids"], weight), rtol=0, atol=0)
    (out[0] * d["grad_out"]).sum().backward()
    expected = _dense_lookup_grad(weight)[rows.start : rows.start + rows.rows]
    torch.testing.assert_close(param.grad.to_local(), expected, rtol=1e-6, atol=1e-6)
    assert param.grad.to_local().abs().sum() > 0


def _dense_logps(rank: int, weight: torch.Tensor, softcap: float | None, dtype: torch.dtype):
    d = _rank_data(rank)
    hidden = d["hidden"].clone().requires_grad_(True)
    targets = d["ids"]
    w = weight.clone().requires_grad_(True)
    logps, means = completion_logps(
        hidden, targets, lambda h: h.to(dtype) @ w.to(dtype).T, chunk_size=CHUNK, softcap=softcap
    )
    (logps * d["grad_logps"]).sum().backward()
    return logps.detach(), means, hidden.grad, w.grad


def _check_head(rank: int, softcap: float | None, dtype: torch.dtype) -> None:
    weight, d = _weight(), _rank_data(rank)
    param = _sharded(weight)
    rows = VocabRows.of(VOCAB, rank, WORLD)
    head = VocabShardedHead(param, None if dtype == torch.float32 else dtype)
    hidden = d["hidden"].clone().requires_grad_(True)
    logps, means = head.logps(hidden, d["ids"], chunk_size=CHUNK, softcap=softcap)
    (logps * d["grad_logps"]).sum().backward()
    want_logps, want_means, want_hidden_grad, _ = _dense_logps(rank, weight, softcap, dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(logps.detach(), want_logps, **tol)
    torch.testing.assert_close(means, want_means, **tol)
    assert not means.requires_grad
    torch.testing.assert_close(hidden.grad, want_hidden_grad, **tol)
    weight_grads = [_dense_logps(r, weight, softcap, dtype)[3] for r in range(WORLD)]
    expected = (sum(weight_grads) / WORLD)[rows.start : rows.start + rows.rows]
    torch.testing.assert_close(param.grad.to_local(), expected, **tol)
    with torch.no_grad():  # generation's path: full logits of this rank's own positions
        logits = head(d["hidden"].view(1, POSITIONS[rank], WIDTH))
    dense = (d["hidden"].to(dtype) @ weight.to(dtype).T).view(1, POSITIONS[rank], VOCAB)
    torch.testing.assert_close(logits, dense, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no gradient"):
        head(d["hidden"])


def _check_all(rank: int) -> None:
    _check_lookup(rank)
    _check_head(rank, None, torch.float32)
    _check_head(rank, 5.0, torch.float32)  # Gemma-style soft-capped logits
    _check_head(rank, None, torch.bfloat16)


def test_row_sharded_embeddings_and_head_equal_the_dense_ones() -> None:
    spawn_gloo(_check_all, ranks=WORLD)


def test_rows_are_cut_as_torch_chunk_cuts_them() -> None:
    cuts = [VocabRows.of(10, r, 4) for r in range(4)]
    assert [(c.start, c.rows) for c in cuts] == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert [len(c) for c in torch.arange(10).chunk(4)] == [c.rows for c in cuts]
    index, held = cuts[1].local(torch.tensor([2, 3, 5, 6]))
    assert index.tolist() == [0, 0, 2, 0] and held.tolist() == [False, True, True, False]


def _check_edges(rank: int) -> None:
    """A rank without positions, a bf16 lookup, ids outside the vocabulary (refused on every rank alike),
    and the generation head refusing a forward whose hidden states want a gradient."""
    weight, d = _weight(), _rank_data(rank)
    param = _sharded(weight)
    embeddings = VocabShardedEmbedding(param, PAD, torch.bfloat16)
    ids = d["ids"] if rank == 0 else d["ids"][:0]  # rank 1 has nothing to look up
    out = embeddings(ids)
    torch.testing.assert_close(out, F.embedding(ids, weight).to(torch.bfloat16), rtol=0, atol=0)
    (out.float() * d["grad_out"][: len(ids)]).sum().backward()
    rows = VocabRows.of(VOCAB, rank, WORLD)
    w = weight.clone().requires_grad_(True)
    zero = _rank_data(0)
    (F.embedding(zero["ids"], w, padding_idx=PAD) * zero["grad_out"].bfloat16().float()).sum().backward()
    expected = (w.grad / WORLD)[rows.start : rows.start + rows.rows]
    torch.testing.assert_close(param.grad.to_local(), expected, rtol=1e-2, atol=1e-2)
    head = VocabShardedHead(_sharded(weight), None)
    hidden = (d["hidden"] if rank == 0 else d["hidden"][:0]).clone().requires_grad_(True)
    logps, _ = head.logps(hidden, ids, chunk_size=CHUNK, softcap=None)
    logps.sum().backward()
    assert logps.shape == (len(ids),) and hidden.grad.shape == hidden.shape
    bad = torch.tensor([VOCAB]) if rank == 1 else torch.tensor([1])  # only rank 1's id is out of range
    with pytest.raises(IndexError, match="outside the vocabulary"):
        embeddings(bad)
    with pytest.raises(RuntimeError, match="no gradient"):
        head.requires_grad_(False)
        head(hidden)


def test_edge_cases_keep_every_rank_in_step() -> None:
    spawn_gloo(_check_edges, ranks=WORLD)


def test_which_embeddings_and_heads_are_sharded_by_rows() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.vocab_sharding import MAX_RANKS, vocab_shardable

    def lm(vocab: int = VOCAB, **changes: object) -> LlamaForCausalLM:
        config = LlamaConfig(vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, tie_word_embeddings=False)  # fmt: skip
        model = LlamaForCausalLM(config)
        if "bias" in changes:
            model.lm_head = torch.nn.Linear(8, vocab, bias=True)
        if "max_norm" in changes:
            model.get_input_embeddings().max_norm = 1.0
        return model

    assert vocab_shardable(lm(), 2) and vocab_shardable(lm(), MAX_RANKS)
    assert not vocab_shardable(lm(), MAX_RANKS + 1)  # FSDP units beyond
    assert not vocab_shardable(lm(bias=True), 2)
    assert not vocab_shardable(lm(max_norm=True), 2)
    assert vocab_shardable(lm(), 4)
    assert vocab_shardable(lm(vocab=10), 4)  # rows 3, 3, 3, 1
    assert not vocab_shardable(lm(vocab=9), 4)  # rows 3, 3, 3, 0: a rank would hold none
