"""Input embeddings and LM head sharded by vocabulary rows under FSDP: the tokens travel, the weights stay.

FSDP2 gathers a unit's whole weight for its forward and makes its whole gradient on every rank before
the reduce-scatter; for the two ``[vocab, hidden]`` modules that is the largest unsharded memory of a
step. Here each rank keeps rows ``[start, start + rows)`` of the weight, as a DTensor sharded on dim 0
over FSDP's own mesh (so state dicts, DCP checkpoints, gradient clipping and the optimizer treat it
like an FSDP shard), and the positions come to the rows instead: each rank's positions in turn are
broadcast, every rank computes its rows' part (the embedding rows it holds, or its rows' logits
reduced to a log-sum-exp, the target's logit and the logits' sum), and the parts are summed on the rank
that owns the positions. Backward recomputes each chunk's logits and adds each rank's rows' gradient
into its own shard. No rank ever holds the full weight, its full gradient or more than one rank's
positions at a time; the forward and backward are collectives, so every rank calls them in step (as
with FSDP's own units). Gradients are divided by the world size, as FSDP's reduce-scatter averages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VocabRows:
    """This rank's rows of a ``vocab``-row weight sharded on dim 0 as ``torch.chunk`` (and DTensor) cut it."""

    start: int
    rows: int
    vocab: int

    @classmethod
    def of(cls, vocab: int, rank: int, world_size: int) -> VocabRows:
        per_rank = -(-vocab // world_size)
        start = min(rank * per_rank, vocab)
        return cls(start, min(per_rank, vocab - start), vocab)

    def local(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``ids`` as row indices into this shard (0 where not held) and the mask of those it holds."""
        shifted = ids - self.start
        held = (shifted >= 0) & (shifted < self.rows)
        return torch.where(held, shifted, torch.zeros_like(shifted)), held


def _sizes(n: int, device: torch.device) -> list[int]:
    """Every rank's number of positions."""
    mine = torch.tensor([n], dtype=torch.long, device=device)
    every = [torch.zeros_like(mine) for _ in range(torch_dist.get_world_size())]
    torch_dist.all_gather(every, mine)
    return [int(t) for t in every]


def _from_rank(src: int, value: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Rank ``src``'s ``value`` on every rank (``shape``/``dtype`` as ``src`` has it)."""
    if torch_dist.get_rank() == src:
        buffer = value.to(dtype).contiguous()
    else:
        buffer = torch.empty(shape, dtype=dtype, device=value.device)
    torch_dist.broadcast(buffer, src=src)
    return buffer


def _chunk_logits(hidden: Tensor, weight: Tensor, softcap: float | None) -> tuple[Tensor, Tensor | None]:
    """fp32 logits of this rank's rows (soft-capped as the model does) and the cap's tanh, if any."""
    logits = (hidden.to(weight.dtype) @ weight.T).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, ids: Tensor, weight: Tensor, rows: VocabRows, padding_idx: int | None, dtype: torch.dtype
    ) -> Tensor:
        me = torch_dist.get_rank()
        sizes = _sizes(ids.numel(), ids.device)
        every_ids, out = [], None
        for src, n in enumerate(sizes):
            ids_src = _from_rank(src, ids, (n,), torch.long)
            every_ids.append(ids_src)
            index, held = rows.local(ids_src)
            part = (F.embedding(index, weight) * held.unsqueeze(-1)).to(dtype)
            torch_dist.reduce(part, dst=src)
            if src == me:
                out = part
        ctx.save_for_backward(torch.cat(every_ids))
        ctx.sizes, ctx.rows, ctx.padding_idx = sizes, rows, padding_idx
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        (every_ids,) = ctx.saved_tensors
        grad_weight = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device)
        for src, ids_src in enumerate(every_ids.split(ctx.sizes)):
            grad_src = _from_rank(src, grad, (len(ids_src), ctx.weight_shape[1]), grad.dtype)
            index, held = ctx.rows.local(ids_src)
            if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
                held &= ids_src != ctx.padding_idx
            grad_weight.index_add_(0, index[held], grad_src[held].to(grad_weight.dtype))
        return None, grad_weight / torch_dist.get_world_size(), None, None, None


class _ShardedLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        targets: Tensor,
        weight: Tensor,
        rows: VocabRows,
        chunk: int,
        softcap: float | None,
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        me, world = torch_dist.get_rank(), torch_dist.get_world_size()
        sizes = _sizes(hidden.shape[0], hidden.device)
        local_weight = weight.to(dtype)
        logps = means = lse = None
        for src, n in enumerate(sizes):
            hidden_src = _from_rank(src, hidden, (n, hidden.shape[1]), hidden.dtype)
            index, held = rows.local(_from_rank(src, targets, (n,), torch.long))
            stats = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                logits, _ = _chunk_logits(hidden_src[start:end], local_weight, softcap)
                stats[0, start:end] = torch.logsumexp(logits, -1)
                target = logits.gather(1, index[start:end, None]).squeeze(1)
                stats[1, start:end] = torch.where(held[start:end], target, 0.0)
                stats[2, start:end] = logits.sum(-1)
            parts = [torch.empty_like(stats) for _ in range(world)] if src == me else None
            torch_dist.gather(stats, parts, dst=src)
            if parts is not None:
                every = torch.stack(parts)  # [ranks, 3, n]
                lse = torch.logsumexp(every[:, 0], 0)
                logps, means = every[:, 1].sum(0) - lse, every[:, 2].sum(0) / rows.vocab
        ctx.save_for_backward(hidden, targets, weight, lse)
        ctx.sizes, ctx.rows, ctx.chunk, ctx.softcap, ctx.dtype = sizes, rows, chunk, softcap, dtype
        ctx.mark_non_differentiable(means)
        return logps, means

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor | None, _grad_means: Tensor | None) -> tuple[Any, ...]:
        hidden, targets, weight, lse = ctx.saved_tensors
        rows, chunk, softcap = ctx.rows, ctx.chunk, ctx.softcap
        me, width = torch_dist.get_rank(), hidden.shape[1]
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        local_weight = weight.to(ctx.dtype)
        want_weight = ctx.needs_input_grad[2]
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        )
        grad_hidden = None
        own = torch.stack([targets.to(torch.float64), grad_logps.double(), lse.double()])
        for src, n in enumerate(ctx.sizes):
            hidden_src = _from_rank(src, hidden, (n, width), hidden.dtype)
            meta = _from_rank(src, own, (3, n), torch.float64)
            index, held = rows.local(meta[0].long())
            grad_src, lse_src = meta[1].float(), meta[2].float()
            grad_part = torch.zeros(n, width, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                logits, capped = _chunk_logits(hidden_src[start:end], local_weight, softcap)
                g = grad_src[start:end]
                d_logits = (logits - lse_src[start:end, None]).exp_().mul_(-g[:, None])
                picked = held[start:end].nonzero().squeeze(1)
                d_logits.index_put_((picked, index[start:end][picked]), g[picked], accumulate=True)
                if capped is not None:
                    d_logits.mul_(1 - capped * capped)
                d_logits = d_logits.to(local_weight.dtype)
                grad_part[start:end] = (d_logits @ local_weight).float()
                if grad_weight is not None:
                    grad_weight += (d_logits.T @ hidden_src[start:end].to(local_weight.dtype)).float()
            torch_dist.reduce(grad_part, dst=src)
            if src == me:
                grad_hidden = grad_part.to(hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight / torch_dist.get_world_size()).to(weight.dtype)
        return grad_hidden, None, grad_weight, None, None, None, None


def _local(weight: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return weight.to_local() if isinstance(weight, DTensor) else weight


class VocabShardedEmbedding(nn.Module):
    """``nn.Embedding`` whose ``weight`` is a dim-0 DTensor shard; outputs ``dtype`` (FSDP's mixed-precision
    param dtype; None: the weight's own)."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = weight
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = dtype

    def forward(self, input_ids: Tensor) -> Tensor:
        local = _local(self.weight)
        rows = VocabRows.of(self.num_embeddings, torch_dist.get_rank(), torch_dist.get_world_size())
        dtype = self.compute_dtype or local.dtype
        out = _ShardedLookup.apply(input_ids.reshape(-1), local, rows, self.padding_idx, dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)


class VocabShardedHead(nn.Module):
    """A bias-free LM head whose ``weight`` is a dim-0 DTensor shard (the embeddings' own, when tied).

    ``logps`` is the training path (gradients to the hidden states and the shard); the module's forward
    gives full logits for generation (no gradient).
    """

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None
        self.compute_dtype = dtype

    def _rows(self) -> VocabRows:
        return VocabRows.of(self.out_features, torch_dist.get_rank(), torch_dist.get_world_size())

    def logps(
        self, hidden: Tensor, targets: Tensor, *, chunk_size: int, softcap: float | None
    ) -> tuple[Tensor, Tensor]:
        """fp32 ``log p(target)`` per position and the detached mean logit, as core.scoring.completion_logps."""
        local = _local(self.weight)
        dtype = self.compute_dtype or local.dtype
        return _ShardedLogps.apply(hidden, targets, local, self._rows(), chunk_size, softcap, dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.weight.requires_grad:
            raise RuntimeError("VocabShardedHead's forward has no gradient: train through completion_logps")
        local = _local(self.weight)
        local = local.to(self.compute_dtype or local.dtype)
        me, world, rows = torch_dist.get_rank(), torch_dist.get_world_size(), self._rows()
        per_rank = -(-self.out_features // world)
        flat = hidden.reshape(-1, self.in_features)
        out = None
        for src, n in enumerate(_sizes(flat.shape[0], flat.device)):
            hidden_src = _from_rank(src, flat, (n, self.in_features), flat.dtype)
            part = torch.zeros(n, per_rank, dtype=local.dtype, device=flat.device)
            part[:, : rows.rows] = hidden_src.to(local.dtype) @ local.T
            parts = [torch.empty_like(part) for _ in range(world)] if src == me else None
            torch_dist.gather(part, parts, dst=src)
            if parts is not None:
                out = torch.cat(parts, dim=1)[:, : self.out_features]
        return out.reshape(*hidden.shape[:-1], self.out_features)


def vocab_shardable(lm: nn.Module, world_size: int) -> bool:
    """Whether ``lm``'s input embeddings and LM head can be sharded by rows here: an ``nn.Embedding``
    without ``max_norm``/sparse gradients, a bias-free ``nn.Linear`` head (or none), rows on every rank."""
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    plain_embeddings = (
        type(embeddings) is nn.Embedding and embeddings.max_norm is None and not embeddings.sparse
    )
    plain_head = head is None or (type(head) is nn.Linear and head.bias is None)
    vocab = embeddings.weight.shape[0]
    every_rank = VocabRows.of(vocab, world_size - 1, world_size).rows > 0
    tied_or_same = head is None or head.weight.shape[0] == vocab
    return plain_embeddings and plain_head and every_rank and tied_or_same


def shard_vocabulary(lm: nn.Module, mesh: Any, dtype: torch.dtype | None) -> set[nn.Parameter]:
    """Replace ``lm``'s embeddings and head (one shared shard when tied) in place; returns the new
    parameters, which FSDP must ignore. ``dtype``: FSDP's mixed-precision param dtype (None: the weights')."""
    from torch.distributed.tensor import Shard, distribute_tensor

    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight

    def sharded(weight: nn.Parameter) -> nn.Parameter:
        # each rank cuts its own copy, no scatter: the other ranks' are on meta until rank 0's broadcast
        local = distribute_tensor(weight.detach(), mesh, [Shard(0)], src_data_rank=None)
        return nn.Parameter(local, weight.requires_grad)

    weight = sharded(embeddings.weight)
    lm.set_input_embeddings(VocabShardedEmbedding(weight, embeddings.padding_idx, dtype))
    params = {weight}
    if head is not None:
        head_weight = weight if tied else sharded(head.weight)
        lm.set_output_embeddings(VocabShardedHead(head_weight, dtype))
        params.add(head_weight)
    return params
