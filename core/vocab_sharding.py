"""Input embeddings and LM head sharded by vocabulary rows under FSDP: the tokens travel, the weights stay.

FSDP2 gathers a unit's whole weight for its forward and makes its whole gradient on every rank before
the reduce-scatter; for the two ``[vocab, hidden]`` modules that is the largest unsharded memory of a
step. Here each rank keeps rows ``[start, start + rows)`` of the weight, as a DTensor sharded on dim 0
over FSDP's own mesh (so state dicts, DCP checkpoints, gradient clipping and the optimizer treat it
like an FSDP shard), and the positions come to the rows instead: each rank's positions in turn are
broadcast, every rank computes its rows' part (the embedding rows it holds, or its rows' logits
reduced to a log-sum-exp, the target's logit and the logits' sum), and the parts are summed on the rank
that owns the positions. Backward recomputes each chunk's logits and adds each rank's rows' gradient
into its own shard. In a training step no rank holds the full weight, its full gradient or more than
one rank's positions at a time (loading and the final save still pass the full tensor through each
rank, one tensor at a time, as for every FSDP weight); the forward and backward are collectives, so
every rank calls them in step (as with FSDP's own units). Gradients are divided by the world size, as FSDP's reduce-scatter averages.
Up to MAX_RANKS ranks: beyond, what travels outgrows the weight and core.sharding uses FSDP units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

MAX_RANKS = 8
"""Row sharding is used up to this many ranks (a node); beyond, FSDP units. Each rank receives every
rank's positions (``ranks × positions × hidden``), which outgrows FSDP's ``vocab × hidden`` weight
gather as ranks are added, and the per-rank broadcasts run one after another."""


@dataclass(frozen=True)
class VocabRows:
    """This rank's rows of a ``vocab``-row weight sharded on dim 0 as ``torch.chunk`` (and DTensor) cut it."""

    start: int
    rows: int
    vocab: int
    per_rank: int  # the most rows a rank holds: the width every rank's part is padded to

    @classmethod
    def of(cls, vocab: int, rank: int, world_size: int) -> VocabRows:
        per_rank = -(-vocab // world_size)
        start = min(rank * per_rank, vocab)
        return cls(start, min(per_rank, vocab - start), vocab, per_rank)

    def local(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``ids`` as row indices into this shard (0 where not held) and the mask of those it holds."""
        shifted = ids - self.start
        held = (shifted >= 0) & (shifted < self.rows)
        return torch.where(held, shifted, torch.zeros_like(shifted)), held


@dataclass(frozen=True)
class _Ranks:
    """The mesh's process group, this rank's place in it, and its rows."""

    group: Any
    rank: int
    size: int
    rows: VocabRows

    @classmethod
    def of(cls, weight: Tensor) -> _Ranks:
        mesh = weight.device_mesh  # type: ignore[attr-defined]
        rank, size = mesh.get_local_rank(), mesh.size()
        return cls(mesh.get_group(), rank, size, VocabRows.of(weight.shape[0], rank, size))

    def sizes(self, n: int, device: torch.device, ids: Tensor | None = None) -> list[int]:
        """Every rank's number of positions; with ``ids``, raises on every rank alike if any rank has an
        id outside the vocabulary (which the dense lookup would refuse too)."""
        if ids is not None and ids.numel():
            span = torch.stack([ids.max(), ids.min()]).to(torch.long)
        else:
            span = torch.tensor([-1, 0], dtype=torch.long, device=device)
        mine = torch.cat([torch.tensor([n], dtype=torch.long, device=device), span])
        every = [torch.zeros_like(mine) for _ in range(self.size)]
        torch_dist.all_gather(every, mine, group=self.group)
        found = torch.stack(every).tolist()  # the one host sync of this forward
        vocab = self.rows.vocab
        bad = [rank for rank, (_, high, low) in enumerate(found) if high >= vocab or low < 0]
        if bad:
            raise IndexError(f"token ids outside the vocabulary's {vocab} rows on ranks {bad}")
        return [n for n, _, _ in found]

    def broadcast(self, src: int, value: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Rank ``src``'s ``value`` on every rank (``shape``/``dtype`` as ``src`` has it)."""
        if self.rank == src:
            buffer = value.to(dtype).contiguous()
        else:
            buffer = torch.empty(shape, dtype=dtype, device=value.device)
        torch_dist.broadcast(buffer, group=self.group, group_src=src)
        return buffer

    def reduce(self, dst: int, value: Tensor) -> None:
        torch_dist.reduce(value, group=self.group, group_dst=dst)

    def gather(self, dst: int, value: Tensor) -> list[Tensor] | None:
        parts = [torch.empty_like(value) for _ in range(self.size)] if self.rank == dst else None
        torch_dist.gather(value, parts, group=self.group, group_dst=dst)
        return parts


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
        ctx: Any, ids: Tensor, weight: Tensor, ranks: _Ranks, padding_idx: int | None, dtype: torch.dtype
    ) -> Tensor:
        sizes = ranks.sizes(ids.numel(), ids.device, ids)
        every_ids, out = [], ids.new_empty(0, weight.shape[1], dtype=dtype, device=weight.device)
        for src, n in enumerate(sizes):
            if n == 0:  # every rank skips it: they all know the sizes
                every_ids.append(ids.new_empty(0))
                continue
            ids_src = ranks.broadcast(src, ids, (n,), torch.long)
            every_ids.append(ids_src)
            index, held = ranks.rows.local(ids_src)
            rows = F.embedding(index, weight)
            part = torch.where(held.unsqueeze(-1), rows, torch.zeros_like(rows)).to(dtype)
            ranks.reduce(src, part)
            if src == ranks.rank:
                out = part
        ctx.save_for_backward(torch.cat(every_ids))
        ctx.sizes, ctx.ranks, ctx.padding_idx = sizes, ranks, padding_idx
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        (every_ids,) = ctx.saved_tensors
        ranks, width = ctx.ranks, ctx.weight_shape[1]
        grad_weight = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device)
        for src, ids_src in enumerate(every_ids.split(ctx.sizes)):
            if len(ids_src) == 0:
                continue
            grad_src = ranks.broadcast(src, grad, (len(ids_src), width), grad.dtype)
            index, held = ranks.rows.local(ids_src)
            if ctx.padding_idx is not None:  # as F.embedding: the padding row gets no gradient
                held &= ids_src != ctx.padding_idx
            kept = grad_src.to(grad_weight.dtype) * held.unsqueeze(-1)  # zeros elsewhere: no host sync
            grad_weight.index_add_(0, index, kept)
        return None, grad_weight / ranks.size, None, None, None


class _ShardedLogps(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        targets: Tensor,
        weight: Tensor,
        ranks: _Ranks,
        chunk: int,
        softcap: float | None,
        dtype: torch.dtype,
    ) -> tuple[Tensor, Tensor]:
        rows = ranks.rows
        sizes = ranks.sizes(hidden.shape[0], hidden.device, targets)
        local_weight = weight.to(dtype)
        logps, means, lse = (hidden.new_empty(0, dtype=torch.float32) for _ in range(3))  # no positions
        every_targets = []
        for src, n in enumerate(sizes):
            if n == 0:
                every_targets.append(targets.new_empty(0))
                continue
            hidden_src = ranks.broadcast(src, hidden, (n, hidden.shape[1]), hidden.dtype)
            every_targets.append(ranks.broadcast(src, targets, (n,), torch.long))
            index, held = rows.local(every_targets[-1])
            stats = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                logits, _ = _chunk_logits(hidden_src[start:end], local_weight, softcap)
                stats[0, start:end] = torch.logsumexp(logits, -1)
                target = logits.gather(1, index[start:end, None]).squeeze(1)
                stats[1, start:end] = torch.where(held[start:end], target, 0.0)
                stats[2, start:end] = logits.sum(-1)
            parts = ranks.gather(src, stats)
            if parts is not None:
                every = torch.stack(parts)  # [ranks, 3, n]
                lse = torch.logsumexp(every[:, 0], 0)
                logps, means = every[:, 1].sum(0) - lse, every[:, 2].sum(0) / rows.vocab
        ctx.save_for_backward(hidden, torch.cat(every_targets), weight, lse)  # backward sends no targets
        ctx.sizes, ctx.ranks, ctx.chunk, ctx.softcap, ctx.dtype = sizes, ranks, chunk, softcap, dtype
        ctx.mark_non_differentiable(means)
        return logps, means

    @staticmethod
    def backward(ctx: Any, grad_logps: Tensor | None, _grad_means: Tensor | None) -> tuple[Any, ...]:
        hidden, every_targets, weight, lse = ctx.saved_tensors
        ranks, chunk, softcap = ctx.ranks, ctx.chunk, ctx.softcap
        rows, width = ranks.rows, hidden.shape[1]
        if grad_logps is None:
            grad_logps = torch.zeros_like(lse)
        local_weight = weight.to(ctx.dtype)
        want_weight = ctx.needs_input_grad[2]
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        )
        grad_hidden = None
        own = torch.stack([grad_logps.float(), lse])
        for src, targets_src in enumerate(every_targets.split(ctx.sizes)):
            n = len(targets_src)
            if n == 0:
                continue
            hidden_src = ranks.broadcast(src, hidden, (n, width), hidden.dtype)
            grad_src, lse_src = ranks.broadcast(src, own, (2, n), torch.float32)
            index, held = rows.local(targets_src)
            grad_part = torch.zeros(n, width, dtype=torch.float32, device=hidden.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                logits, capped = _chunk_logits(hidden_src[start:end], local_weight, softcap)
                g = grad_src[start:end]
                d_logits = (logits - lse_src[start:end, None]).exp_().mul_(-g[:, None])
                target_grad = torch.where(held[start:end], g, 0.0)[:, None]  # no host sync, unlike a mask
                d_logits.scatter_add_(1, index[start:end, None], target_grad)
                if capped is not None:
                    d_logits.mul_(1 - capped * capped)
                d_logits = d_logits.to(local_weight.dtype)
                grad_part[start:end] = (d_logits @ local_weight).float()
                if grad_weight is not None:
                    grad_weight += (d_logits.T @ hidden_src[start:end].to(local_weight.dtype)).float()
            ranks.reduce(src, grad_part)
            if src == ranks.rank:
                grad_hidden = grad_part.to(hidden.dtype)
        if grad_hidden is None:  # this rank had no positions
            grad_hidden = torch.zeros_like(hidden)
        if grad_weight is not None:
            grad_weight = (grad_weight / ranks.size).to(weight.dtype)
        return grad_hidden, None, grad_weight, None, None, None, None


def _shard_of(weight: Tensor) -> tuple[Tensor, _Ranks]:
    """The local rows of a dim-0 DTensor weight (differentiable) and its ranks."""
    ranks = _Ranks.of(weight)
    local = weight.to_local()  # type: ignore[attr-defined]
    if local.shape[0] != ranks.rows.rows:
        raise RuntimeError(
            f"{local.shape[0]} local rows, expected {ranks.rows.rows}: not sharded as torch.chunk"
        )
    return local, ranks


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
        local, ranks = _shard_of(self.weight)
        dtype = self.compute_dtype or local.dtype
        out = _ShardedLookup.apply(input_ids.reshape(-1), local, ranks, self.padding_idx, dtype)
        return out.reshape(*input_ids.shape, self.embedding_dim)


class VocabShardedHead(nn.Module):
    """A bias-free LM head whose ``weight`` is a dim-0 DTensor shard (the embeddings' own, when tied).

    ``logps`` is the training path (gradients to the hidden states and the shard); the module's forward
    gives full logits for generation and refuses to run where a gradient would be expected of it.
    """

    def __init__(self, weight: nn.Parameter, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None
        self.compute_dtype = dtype

    def logps(
        self, hidden: Tensor, targets: Tensor, *, chunk_size: int, softcap: float | None
    ) -> tuple[Tensor, Tensor]:
        """fp32 ``log p(target)`` per position and the detached mean logit, as core.scoring.completion_logps."""
        local, ranks = _shard_of(self.weight)
        dtype = self.compute_dtype or local.dtype
        return _ShardedLogps.apply(hidden, targets, local, ranks, chunk_size, softcap, dtype)

    def forward(self, hidden: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (self.weight.requires_grad or hidden.requires_grad):
            raise RuntimeError("VocabShardedHead's forward has no gradient: train through its logps")
        local, ranks = _shard_of(self.weight)
        local = local.to(self.compute_dtype or local.dtype)
        flat = hidden.reshape(-1, self.in_features)
        out = flat.new_empty(0, self.out_features, dtype=local.dtype)
        for src, n in enumerate(ranks.sizes(flat.shape[0], flat.device)):
            if n == 0:
                continue
            hidden_src = ranks.broadcast(src, flat, (n, self.in_features), flat.dtype)
            part = torch.zeros(n, ranks.rows.per_rank, dtype=local.dtype, device=flat.device)
            part[:, : ranks.rows.rows] = hidden_src.to(local.dtype) @ local.T
            parts = ranks.gather(src, part)
            if parts is not None:
                out = torch.cat(parts, dim=1)[:, : self.out_features]
        return out.reshape(*hidden.shape[:-1], self.out_features)


def vocab_shardable(lm: nn.Module, world_size: int) -> bool:
    """Whether ``lm``'s input embeddings and LM head are sharded by rows on ``world_size`` ranks: an
    ``nn.Embedding`` without ``max_norm``/sparse gradients, a bias-free ``nn.Linear`` head (or none), rows
    on every rank, at most MAX_RANKS ranks."""
    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    plain_embeddings = (
        type(embeddings) is nn.Embedding and embeddings.max_norm is None and not embeddings.sparse
    )
    plain_head = head is None or (type(head) is nn.Linear and head.bias is None)
    vocab = embeddings.weight.shape[0]
    every_rank = VocabRows.of(vocab, world_size - 1, world_size).rows > 0
    tied_or_same = head is None or head.weight.shape[0] == vocab
    return plain_embeddings and plain_head and every_rank and tied_or_same and world_size <= MAX_RANKS


def shard_vocabulary(lm: nn.Module, mesh: Any, dtype: torch.dtype | None) -> set[nn.Parameter]:
    """Replace ``lm``'s embeddings and head (one shared shard when tied) in place; returns the new
    parameters, which FSDP must ignore. ``dtype``: FSDP's mixed-precision param dtype (None: the weights')."""
    from torch.distributed.tensor import DTensor, Shard

    embeddings, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    rank, size = mesh.get_local_rank(), mesh.size()

    def sharded(weight: nn.Parameter) -> nn.Parameter:
        # this rank's rows only, cut where the weight is (rank 0: CPU; the others: meta, filled by rank
        # 0's broadcast later), then moved: the shard is not cut from a copy of the weight on the device
        rows = VocabRows.of(weight.shape[0], rank, size)
        local = weight.detach()[rows.start : rows.start + rows.rows]
        local = local.to("meta" if local.is_meta else mesh.device_type, copy=True)
        shape, stride = weight.shape, weight.stride()
        shard = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)
        return nn.Parameter(shard, weight.requires_grad)

    weight = sharded(embeddings.weight)
    lm.set_input_embeddings(VocabShardedEmbedding(weight, embeddings.padding_idx, dtype))
    params = {weight}
    if head is not None:
        head_weight = weight if tied else sharded(head.weight)
        lm.set_output_embeddings(VocabShardedHead(head_weight, dtype))
        params.add(head_weight)
    return params
