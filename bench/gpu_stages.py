"""The configurations bench/gpu_check.py runs, one per subprocess: each returns a JSON-able dict.

Imports only torch, transformers and the pydantic-free core modules (packing, attention, scoring,
losses, precision, sharding, vocab_sharding), so it runs on the device image (no ray, trl, datasets or
pydantic).
"""

from __future__ import annotations

import gzip
import json
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
HH_FILE = REPO / "examples" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
GPT2 = REPO / "examples" / "data" / "tokenizers" / "gpt2" / "tokenizer.json"
MARKER = "\n\nAssistant:"

# Llama shapes: ~1B (TinyLlama-1.1B layout) for throughput, Llama-2-7B for the memory probe, tiny for --dry-run
SHAPES: dict[str, dict[str, int]] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
    "parity": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 2},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}  # fmt: skip


class Pair:
    def __init__(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = prompt, chosen, rejected


def device_for(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device; use --dry-run on CPU")
    return torch.device("cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def hh_pairs(count: int, max_length: int) -> tuple[list[Pair], int]:
    """The first ``count`` HH-RLHF pairs (implicit prompt split, GPT-2 tokens, EOS appended) within max_length."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(GPT2))
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    pairs: list[Pair] = []
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            chosen, rejected = row["chosen"], row["rejected"]
            cut = chosen.rfind(MARKER) + len(MARKER)
            if cut < len(MARKER) or chosen[:cut] != rejected[:cut]:
                continue
            prompt = tok(chosen[:cut])["input_ids"]
            c, r = tok(chosen[cut:])["input_ids"] + [eos], tok(rejected[cut:])["input_ids"] + [eos]
            if len(c) < 2 or len(r) < 2 or len(prompt) + max(len(c), len(r)) > max_length:
                continue
            pairs.append(Pair(prompt, c, r))
            if len(pairs) == count:
                break
    return pairs, len(tok)


def llama(shape: str, vocab: int, attn: str, device: torch.device, layers: int | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(SHAPES[shape])
    if layers is not None:
        dims["num_hidden_layers"] = layers
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False, **dims)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    model.config.use_cache = False
    return model.to(device)


def attention_context(attn: str, device: torch.device) -> AbstractContextManager[Any]:
    """Flex on CPU (dry runs) runs uncompiled; on CUDA transformers' compiled flex_attention is used."""
    from core.attention import FLEX, eager_flex_attention

    return eager_flex_attention() if attn == FLEX and device.type == "cpu" else nullcontext()


def batches(pairs: list[Pair], size: int) -> list[list[Pair]]:
    ordered = sorted(pairs, key=lambda p: len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids))
    return [ordered[i : i + size] for i in range(0, len(ordered) - size + 1, size)]


# ----- stage: environment and matmul ceiling -----------------------------------------------------
def run_env(dry_run: bool, **_: Any) -> dict[str, Any]:
    import transformers

    from core.attention import flex_available

    device = device_for(dry_run)
    n, iters = (256, 3) if dry_run else (8192, 50)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "flex_attention_available": flex_available(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "bf16_matmul_tflops": 2 * n**3 * iters / seconds / 1e12,
        "matmul_n": n,
    }
    if device.type == "cuda":
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


# ----- stage: packed scorer vs plain causal forwards --------------------------------------------
def plain_logps(
    model: Any, pair: Pair, completion: list[int], dtype: torch.dtype, device: torch.device
) -> float:
    from core.precision import autocast

    ids = torch.tensor([pair.prompt_ids + completion], device=device)
    with autocast(dtype, device):
        logits = model(input_ids=ids).logits.float()
    p = len(pair.prompt_ids)
    logps = torch.log_softmax(logits[0, p - 1 : -1], -1)
    return float(logps.gather(1, ids[0, p:, None]).sum())


def run_parity(dry_run: bool, attn: str, precision: str, **_: Any) -> dict[str, Any]:
    from core.packing import pack_pairs
    from core.scoring import PairScorer

    device = device_for(dry_run)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    pairs, vocab = hh_pairs(4 if dry_run else 16, 128 if dry_run else 1024)
    model = llama("tiny" if dry_run else "parity", vocab, attn, device).eval()
    with torch.no_grad(), attention_context(attn, device):
        scores = PairScorer(model, compute_dtype=dtype)(pack_pairs(pairs, range(len(pairs))).to(device))
    model.set_attn_implementation("sdpa")  # the reference: one plain causal forward per sequence
    with torch.no_grad():
        plain = torch.tensor(
            [[plain_logps(model, p, p.chosen_ids, dtype, device), plain_logps(model, p, p.rejected_ids, dtype, device)]
             for p in pairs]
        )  # fmt: skip
    packed = torch.stack([scores.chosen_logps, scores.rejected_logps], 1).float().cpu()
    diff = (packed - plain).abs()
    return {
        "attn": attn,
        "precision": precision,
        "pairs": len(pairs),
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / plain.abs().clamp(min=1e-6)).max()),
        "mean_abs_logp": float(plain.abs().mean()),
    }


# ----- stage: training throughput ----------------------------------------------------------------
def n_params(model: Any, *, embeddings: bool = True) -> int:
    skip = set() if embeddings else {id(model.get_input_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def run_throughput(
    dry_run: bool,
    attn: str,
    precision: str,
    ceiling_tflops: float | None = None,
    pairs_per_row: int | None = 1,
    **_: Any,
):
    from core.attention import FLEX, FLEX_BUCKET, bucket_length
    from core.losses import sigmoid
    from core.packing import RowLayout
    from core.scoring import PairScorer

    device = device_for(dry_run)
    batch_size, steps = (4, 3) if dry_run else (8, 24)
    pairs, vocab = hh_pairs(batch_size * steps, 128 if dry_run else 512)
    model = llama("tiny" if dry_run else "1b", vocab, attn, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    scorer = PairScorer(model, compute_dtype=dtype)
    max_length = 128 if dry_run else 512
    layout = RowLayout(pairs_per_row, max_length, FLEX_BUCKET if attn == FLEX else 1)  # None: as many as fit
    packed = [layout.pack(b, range(len(b))).to(device) for b in batches(pairs, batch_size)]
    with torch.no_grad(), attention_context(attn, device):  # precomputed reference log-probs (untimed)
        refs = [scorer(b) for b in packed]
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6)

    def step(i: int) -> tuple[float, Any]:
        sync(device)
        start = time.perf_counter()
        scores, ref = scorer(packed[i]), refs[i]
        loss = sigmoid(
            scores.chosen_logps, scores.rejected_logps, ref.chosen_logps, ref.rejected_logps, beta=0.1
        )
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        return time.perf_counter() - start, scores

    # untimed warm-up: one step per distinct bucketed width, so compiles/recompiles fall outside the timing
    first_of_width: dict[int, int] = {}
    for i, b in enumerate(packed):
        first_of_width.setdefault(bucket_length(b.input_ids.shape[1]), i)
    with attention_context(attn, device):
        warm = [step(i) for i in first_of_width.values()]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = sum(step(i)[0] for i in range(len(packed)))
    step1 = {"chosen": warm[0][1].chosen_logps.tolist(), "rejected": warm[0][1].rejected_logps.tolist()}
    tokens = sum(b.num_tokens for b in packed)
    unpacked = sum(int((b.chosen_lengths + b.rejected_lengths).sum()) + 2 * prompt_tokens(b) for b in packed)
    flops = 6 * n_params(model, embeddings=False) * tokens  # dense matmuls only; attention not counted
    result = {
        "attn": attn,
        "precision": precision,
        "pairs_per_row": pairs_per_row or "auto",
        "padding_fraction": sum(b.padding_fraction for b in packed) / len(packed),
        "params": n_params(model),
        "batch_pairs": batch_size,
        "timed_steps": len(packed),
        "warmup_steps": len(warm),
        "first_step_s": warm[0][0],
        "pairs_per_s": batch_size * len(packed) / seconds,
        "packed_tokens_per_s": tokens / seconds,
        "unpacked_equivalent_tokens_per_s": unpacked / seconds,
        "model_tflops": flops / seconds / 1e12,
        "step1_logps": step1,
    }
    if ceiling_tflops:
        result["mfu_vs_measured_ceiling"] = result["model_tflops"] / ceiling_tflops
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def prompt_tokens(batch: Any) -> int:
    from core.packing import PROMPT

    return int((batch.segments == PROMPT).sum())


# ----- stage: 7B-shaped memory probe -------------------------------------------------------------
def run_memory(dry_run: bool, layers: int, attn: str, **_: Any) -> dict[str, Any]:
    from core.losses import sigmoid
    from core.packing import pack_pairs
    from core.scoring import PairScorer

    device = device_for(dry_run)
    pairs, vocab = hh_pairs(4 if dry_run else 8, 128 if dry_run else 1024)
    model = llama("tiny" if dry_run else "7b", vocab, attn, device, layers=layers)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    scorer = PairScorer(model, compute_dtype=torch.bfloat16)
    batch = pack_pairs(pairs, range(len(pairs))).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-6)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with attention_context(attn, device):
        for _ in range(2):  # the second step has the optimizer states allocated
            s = scorer(batch)  # reference = the policy's own detached log-probs: the loss still has gradients
            ref_c, ref_r = s.chosen_logps.detach(), s.rejected_logps.detach()
            sigmoid(s.chosen_logps, s.rejected_logps, ref_c, ref_r, beta=0.1).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    sync(device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    layer = model.model.layers[0]
    return {
        "layers": layers,
        "attn": attn,
        "batch_pairs": len(pairs),
        "packed_width": batch.input_ids.shape[1],
        "params": n_params(model),
        "params_per_layer": sum(p.numel() for p in layer.parameters()),
        "peak_memory_gib": peak,
    }


def extrapolate_memory(probes: list[dict[str, Any]], full_layers: int = 32, gpus: int = 8) -> dict[str, Any]:
    """Linear fit of peak memory over layer count, to 32 layers on one GPU and per GPU with fsdp over 8."""
    a, b = sorted(probes, key=lambda p: p["layers"])[:2]
    if a["peak_memory_gib"] is None or b["peak_memory_gib"] is None:
        return {"note": "no GPU memory measured (CPU dry run)"}
    per_layer = (b["peak_memory_gib"] - a["peak_memory_gib"]) / (b["layers"] - a["layers"])
    fixed = a["peak_memory_gib"] - per_layer * a["layers"]
    state_per_layer = 16 * a["params_per_layer"] / 2**30  # fp32 weight + grad + 2 Adam moments
    non_layer_state = 16 * (a["params"] - a["layers"] * a["params_per_layer"]) / 2**30
    activations_per_layer = max(0.0, per_layer - state_per_layer)
    single = fixed + per_layer * full_layers
    sharded = (non_layer_state + state_per_layer * full_layers) / gpus
    fsdp = single - non_layer_state - state_per_layer * full_layers + sharded
    return {
        "per_layer_gib": per_layer,
        "fixed_gib": fixed,
        "activations_per_layer_gib": activations_per_layer,
        "single_gpu_full_model_gib": single,
        f"fsdp_{gpus}gpu_per_gpu_gib_estimate": fsdp
        + 4 * a["params_per_layer"] / 2**30,  # + one gathered layer
        "assumptions": "fp32 weights/grads + AdamW states shard 1/N under fsdp; activations (checkpointed) and "
        "the LM-head chunk do not; ignores fragmentation and communication buffers",
        "full_layers": full_layers,
    }


# ----- stage: FSDP on one GPU: embeddings and head sharded by vocabulary rows, over NCCL ----------
def run_fsdp(dry_run: bool, precision: str, attn: str, **_: Any) -> dict[str, Any]:
    """One FSDP2 rank (NCCL on CUDA, gloo in a dry run), embeddings and head sharded by vocabulary rows,
    mixed precision through FSDP's policy: log-probs and gradients against the unsharded scorer under
    autocast, one AdamW step, and the time of a forward and backward of each."""
    import copy

    import torch.distributed as torch_dist

    from core.packing import pack_pairs
    from core.scoring import PairScorer
    from core.sharding import shard_scorer
    from core.vocab_sharding import VocabShardedHead

    device = device_for(dry_run)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch_dist.init_process_group(backend, store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        pairs, vocab = hh_pairs(4 if dry_run else 16, 128 if dry_run else 1024)
        model = llama("tiny" if dry_run else "parity", vocab, attn, device)
        dense = PairScorer(copy.deepcopy(model), compute_dtype=dtype)
        sharded = shard_scorer(PairScorer(model), device, dtype)
        batch = pack_pairs(pairs, range(len(pairs))).to(device)
        timed: dict[str, float] = {}
        scores = {}
        for name, scorer in (("dense", dense), ("fsdp", sharded)):
            sync(device)
            start = time.perf_counter()
            out = scorer(batch)
            (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
            sync(device)
            timed[name] = time.perf_counter() - start
            scores[name] = torch.stack([out.chosen_logps, out.rejected_logps]).detach().float().cpu()
        grads = {}
        for part in ("get_input_embeddings", "get_output_embeddings"):
            want = getattr(dense.model, part)().weight.grad.float()
            got = getattr(sharded.model, part)().weight.grad.full_tensor().float()
            grads[part] = float((got - want).norm() / want.norm())
        optimizer = torch.optim.AdamW([p for p in sharded.parameters() if p.requires_grad], lr=1e-4)
        optimizer.step()
        finite = all(bool(torch.isfinite(p.to_local()).all()) for p in sharded.parameters())
        diff = (scores["fsdp"] - scores["dense"]).abs()
        return {
            "precision": precision,
            "attn": attn,
            "backend": backend,
            "head_sharded_by_rows": isinstance(sharded.model.get_output_embeddings(), VocabShardedHead),
            "logps_max_abs_diff": float(diff.max()),
            "mean_abs_logp": float(scores["dense"].abs().mean()),
            "grad_rel_diff": grads,
            "weights_finite_after_adamw": finite,
            "first_step_s": timed,
        }
    finally:
        torch_dist.destroy_process_group()
