"""Preference losses of the DPO family, MinorDPO first, behind one registry (see docs/losses.md).

Every loss has the signature
``loss_fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, **extra)``
on per-sequence *summed* completion log-probs of shape ``[B]`` and returns the per-pair loss ``[B]``.
Losses that normalise by length take ``chosen_lengths`` / ``rejected_lengths`` (completion token
counts) explicitly; hyperparameters use TRL's names (``label_smoothing``, ``discopop_tau``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.loss_names import LOSS_NAMES

LossFn = Callable[..., Tensor]


def _lengths(name: str, lengths: Tensor | None, which: str) -> Tensor:
    if lengths is None:
        raise TypeError(f"loss '{name}' needs {which}_lengths (completion token counts)")
    return lengths.to(torch.get_default_dtype() if not lengths.is_floating_point() else lengths.dtype)


def minor_dpo(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """MinorDPO (Xie et al., arXiv 2408.09834): ``-log σ(β·r_w − β·max(0, r_l))``.

    The clamp acts on the rejected log-ratio only and changes the forward value: once the policy
    likes the rejected answer less than the reference does (``r_l < 0``), the rejected answer gets
    no gradient and only raising the chosen answer lowers the loss. ``clamp(min=0)`` lets the
    gradient through at the tie ``r_l = 0``.
    """
    r_w, r_l = pc - rc, pr - rr
    return -F.logsigmoid(beta * (r_w - r_l.clamp(min=0)))


def sigmoid(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """DPO (Rafailov et al., arXiv 2305.18290): ``-log σ(β(r_w − r_l))``."""
    return -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))


def cdpo(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object
) -> Tensor:
    """Conservative DPO (label smoothing ε): ``-(1-ε) log σ(z) − ε log σ(−z)``."""
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 0.0, **_: object
) -> Tensor:
    """Robust DPO (Chowdhury et al., arXiv 2403.00409): unbiased under label-flip rate ε < 0.5."""
    if not 0 <= label_smoothing < 0.5:
        raise ValueError("robust loss needs 0 <= label_smoothing < 0.5")
    z = beta * ((pc - rc) - (pr - rr))
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )


def hinge(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """SLiC / RSO hinge loss: ``relu(1 − z)``."""
    return torch.relu(1 - beta * ((pc - rc) - (pr - rr)))


def ipo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **_: object,
) -> Tensor:
    """IPO (Azar et al., arXiv 2310.12036), length-normalised as in TRL: ``(c/lc − r/lr − 1/(2β))²``."""
    lc = _lengths("ipo", chosen_lengths, "chosen")
    lr = _lengths("ipo", rejected_lengths, "rejected")
    return ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * beta)) ** 2


def exo_pair(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, label_smoothing: float = 1e-3, **_: object
) -> Tensor:
    """EXO, pairwise (Ji et al., arXiv 2402.00856): reverse KL to the smoothed preference, ε > 0."""
    eps = label_smoothing if label_smoothing > 0 else 1e-3
    z = beta * ((pc - rc) - (pr - rr))
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def nca_pair(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """NCA, pairwise (Chen et al., arXiv 2402.05369)."""
    c, r = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """BCO, pairwise (Jung et al., arXiv 2404.04656), without the running reward shift."""
    return -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))


def sppo_hard(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """SPPO with hard labels (Wu et al., arXiv 2405.00675): ``(c − 1/(2β))² + (r + 1/(2β))²``."""
    half = 1 / (2 * beta)
    return ((pc - rc) - half) ** 2 + ((pr - rr) + half) ** 2


def apo_zero(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266): raise chosen, lower rejected."""
    return (1 - torch.sigmoid(beta * (pc - rc))) + torch.sigmoid(beta * (pr - rr))


def apo_down(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, **_: object) -> Tensor:
    """APO-down (arXiv 2408.06266): lower both, rejected more."""
    return torch.sigmoid(beta * (pc - rc)) + 1 - torch.sigmoid(beta * ((pc - rc) - (pr - rr)))


def discopop(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, discopop_tau: float = 0.05, **_: object
) -> Tensor:
    """DiscoPOP (Chris Lu et al., arXiv 2406.08414): log-ratio modulated logistic/exponential mix."""
    z = beta * ((pc - rc) - (pr - rr))
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


def sigmoid_norm(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **_: object,
) -> Tensor:
    """Length-normalised DPO: ``-log σ(β(c/lc − r/lr))``."""
    lc = _lengths("sigmoid_norm", chosen_lengths, "chosen")
    lr = _lengths("sigmoid_norm", rejected_lengths, "rejected")
    return -F.logsigmoid(beta * ((pc - rc) / lc - (pr - rr) / lr))


def dpop(
    pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, *, beta: float, dpop_lambda: float = 50.0, **_: object
) -> Tensor:
    """DPO-Positive (Pal et al., arXiv 2402.13228): ``-log σ(β(c − r − λ·relu(−c)))``."""
    c, r = pc - rc, pr - rr
    return -F.logsigmoid(beta * (c - r - dpop_lambda * torch.relu(-c)))


def simpo(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    simpo_gamma: float = 0.5,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    **_: object,
) -> Tensor:
    """SimPO (Meng et al., arXiv 2405.14734), reference-free: ``-log σ(β(c̄ − r̄) − γ)`` on average log-probs."""
    lc = _lengths("simpo", chosen_lengths, "chosen")
    lr = _lengths("simpo", rejected_lengths, "rejected")
    return -F.logsigmoid(beta * (pc / lc - pr / lr) - simpo_gamma)


def sft(
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    **_: object,
) -> Tensor:
    """Auxiliary SFT term: token-mean cross-entropy on the chosen completion (RPO = sigmoid + α·sft)."""
    return -pc / _lengths("sft", chosen_lengths, "chosen")


LOSSES: dict[str, LossFn] = {
    "minor_dpo": minor_dpo,
    "sigmoid": sigmoid,
    "cdpo": cdpo,
    "robust": robust,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sigmoid_norm": sigmoid_norm,
    "dpop": dpop,
    "simpo": simpo,
    "sft": sft,
}

if tuple(LOSSES) != LOSS_NAMES:  # pragma: no cover - a registry edit must update core/loss_names.py too
    raise ImportError("core.losses.LOSSES and core.loss_names.LOSS_NAMES list different losses")

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "sft"})
"""Losses that never read the reference log-probs: a run made only of these needs no reference pass."""


@dataclass(frozen=True)
class WeightedLoss:
    """A weighted sum of registry losses, e.g. ``minor_dpo + 0.5·sft`` (TRL's ``loss_type`` list + ``loss_weights``)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    extra: Mapping[str, float]

    def __post_init__(self) -> None:
        unknown = [n for n in self.names if n not in LOSSES]
        if unknown:
            raise ValueError(f"unknown loss type(s) {unknown}; known: {sorted(LOSSES)}")
        if len(self.names) != len(self.weights):
            raise ValueError("loss names and weights differ in length")

    @property
    def needs_reference(self) -> bool:
        return any(n not in REFERENCE_FREE for n in self.names)

    def __call__(
        self,
        pc: Tensor,
        pr: Tensor,
        rc: Tensor,
        rr: Tensor,
        *,
        chosen_lengths: Tensor,
        rejected_lengths: Tensor,
    ) -> Tensor:
        """Per-pair loss ``[B]``: the weighted sum of every term."""
        total = torch.zeros_like(pc)
        for name, weight in zip(self.names, self.weights, strict=True):
            term = LOSSES[name](
                pc,
                pr,
                rc,
                rr,
                beta=self.beta,
                chosen_lengths=chosen_lengths,
                rejected_lengths=rejected_lengths,
                **self.extra,
            )
            total = total + weight * term
        return total


METRIC_NAMES: tuple[str, ...] = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "minor_dpo/reject_gate_off_frac",
)
"""Per-pair metrics, averaged over pairs (TRL names plus MinorDPO's gate fraction)."""


def pair_metrics(
    losses: Tensor,
    pc: Tensor,
    pr: Tensor,
    rc: Tensor,
    rr: Tensor,
    *,
    beta: float,
    chosen_logits_mean: Tensor,
    rejected_logits_mean: Tensor,
) -> dict[str, Tensor]:
    """Per-pair values ``[B]`` of every name in METRIC_NAMES (detached; rewards unclamped, as DPO logs them)."""
    with torch.no_grad():
        r_w, r_l = (pc - rc).detach(), (pr - rr).detach()
        return {
            "loss": losses.detach(),
            "rewards/chosen": beta * r_w,
            "rewards/rejected": beta * r_l,
            "rewards/margins": beta * (r_w - r_l),
            "rewards/accuracies": (r_w > r_l).to(r_w.dtype),
            "logps/chosen": pc.detach(),
            "logps/rejected": pr.detach(),
            "logits/chosen": chosen_logits_mean.detach().to(r_w.dtype),
            "logits/rejected": rejected_logits_mean.detach().to(r_w.dtype),
            "minor_dpo/reject_gate_off_frac": (r_l <= 0).to(r_w.dtype),
        }


class MetricSums:
    """Sums of per-pair metrics plus a pair count, packed in one tensor so one all-reduce reduces them all."""

    def __init__(self, names: Sequence[str] = METRIC_NAMES) -> None:
        self.names = tuple(names)
        self._sums = torch.zeros(len(self.names) + 1, dtype=torch.float64)

    def add(self, per_pair: Mapping[str, Tensor]) -> None:
        """Accumulate one micro-batch of per-pair values."""
        values = [per_pair[n].double().sum().cpu() for n in self.names]
        count = per_pair[self.names[0]].numel()
        self._sums += torch.stack([*values, torch.tensor(float(count), dtype=torch.float64)])

    @property
    def count(self) -> int:
        """Pairs accumulated on this rank."""
        return int(self._sums[-1])

    def reduce(self, all_reduce_sum: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
        """Means over every pair seen, across all ranks when ``all_reduce_sum`` sums a tensor over ranks."""
        sums = self._sums.clone()
        if all_reduce_sum is not None:
            sums = all_reduce_sum(sums)
        count = float(sums[-1])
        if count == 0:
            return {}
        return {n: float(sums[i]) / count for i, n in enumerate(self.names)}
