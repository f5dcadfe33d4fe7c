"""Peak RSS of one in-process training step of a ~100M Llama vs max_length: chunked vs one-chunk log-probs, ± checkpointing.

Each configuration runs in its own subprocess (so no allocator state is shared); the parent prints a
table and writes ``bench/out/memory_scale.json``. Run: ``.venv/bin/python bench/memory_scale.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
VOCAB = 50257  # GPT-2's vocabulary: the [positions, vocab] logits are what chunking bounds
# ≈92M parameters (32M of them the tied embedding/head), Llama-shaped
DIMS = {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 12, "num_attention_heads": 10}
UNCHUNKED = 1 << 20  # one chunk: the whole [N, vocab] logits at once, no recompute (the old path)


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def child(length: int, chunk: int, checkpointing: bool, pairs: int) -> dict[str, float]:
    """Build the model and one batch, warm the optimizer state, then measure one training step."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from core.losses import LOSSES
    from core.models import enable_activation_checkpointing
    from core.packing import pack_pairs
    from core.scoring import PairScorer

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=max(4096, length),
        tie_word_embeddings=True,
        head_dim=DIMS["hidden_size"] // DIMS["num_attention_heads"],
        **DIMS,
    )
    model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    if checkpointing:
        enable_activation_checkpointing(model)
    scorer = PairScorer(model, chunk_size=chunk)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    for p in params:  # allocate AdamW's state now, so the step below measures activations and logits
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    class Pair:
        def __init__(self, g: torch.Generator) -> None:
            half, quarter = length // 2, length // 4
            self.prompt_ids = torch.randint(0, VOCAB, (half,), generator=g).tolist()
            self.chosen_ids = torch.randint(0, VOCAB, (quarter,), generator=g).tolist()
            self.rejected_ids = torch.randint(0, VOCAB, (length - half - quarter,), generator=g).tolist()

    g = torch.Generator().manual_seed(0)
    batch = pack_pairs([Pair(g) for _ in range(pairs)], range(pairs))
    ref = torch.zeros(pairs)
    before = _rss_mib("VmRSS")
    exact = _reset_peak()
    started = time.perf_counter()
    scores = scorer(batch)
    loss = LOSSES["sigmoid"](scores.chosen_logps, scores.rejected_logps, ref, ref, beta=0.1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - started
    peak = _rss_mib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "params_m": sum(p.numel() for p in params) / 1e6,
        "completion_tokens": int(batch.target_ids.numel()),
        "rss_before_mib": before,
        "peak_mib": peak,
        "step_peak_above_before_mib": peak - before,
        "step_s": elapsed,
        "loss": float(loss.detach()),
        "peak_is_step_only": exact,
    }


def head_only(positions: int, chunk: int) -> dict[str, float]:
    """Just the LM head and log-softmax (forward + backward) on ``positions`` hidden states: the logits part."""
    import torch

    from core.scoring import completion_logps

    torch.manual_seed(0)
    d = DIMS["hidden_size"]
    weight = torch.nn.Parameter(torch.randn(VOCAB, d) * 0.02)
    hidden = torch.randn(positions, d, requires_grad=True)
    targets = torch.randint(0, VOCAB, (positions,))
    before = _rss_mib("VmRSS")
    exact = _reset_peak()
    started = time.perf_counter()
    logps, _ = completion_logps(hidden, targets, lambda h: h @ weight.T, chunk_size=chunk)
    logps.sum().backward()
    elapsed = time.perf_counter() - started
    peak = _rss_mib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"completion_tokens": positions, "step_peak_above_before_mib": peak - before, "step_s": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--head-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        if args.head_only:
            print(json.dumps(head_only(args.length * args.pairs // 2, args.chunk)))
        else:
            print(json.dumps(child(args.length, args.chunk, args.checkpointing, args.pairs)))
        return

    rows: list[dict] = []
    OUT.mkdir(parents=True, exist_ok=True)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "pairs": args.pairs,
        "rows": rows,
    }
    # a fixed mmap threshold: large tensors come from mmap and go back on free, so RSS follows live memory
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536"}
    for length in args.lengths:
        for chunk in (UNCHUNKED, args.chunk):
            cmd = [sys.executable, __file__, "--child", "--head-only", "--length", str(length)]
            cmd += ["--chunk", str(chunk), "--pairs", str(args.pairs)]
            result = _run(cmd, env)
            row = {"max_length": length, "part": "head", "logps": _name(chunk), **result}
            rows.append(row)
            print(
                f"L={length:5d} head only   {row['logps']:>14}: N={row['completion_tokens']:5d} "
                f"step +{row['step_peak_above_before_mib']:6.0f} MiB, {row['step_s']:6.1f} s",
                flush=True,
            )
    for length in args.lengths:
        for checkpointing in (False, True):
            for chunk in (UNCHUNKED, args.chunk):
                cmd = [sys.executable, __file__, "--child", "--length", str(length), "--chunk", str(chunk)]
                cmd += ["--pairs", str(args.pairs), "--threads", str(args.threads)]
                cmd += ["--checkpointing"] if checkpointing else []
                result = _run(cmd, env)
                row = {
                    "max_length": length,
                    "part": "training step",
                    "checkpointing": checkpointing,
                    "logps": _name(chunk),
                    **result,
                }
                rows.append(row)
                print(
                    f"L={length:5d} ckpt={checkpointing!s:5} {row['logps']:>14}: N={row['completion_tokens']:5d} "
                    f"peak {row['peak_mib']:7.0f} MiB, step +{row['step_peak_above_before_mib']:6.0f} MiB, "
                    f"{row['step_s']:6.1f} s, loss {row['loss']:.4f}",
                    flush=True,
                )
                (OUT / "memory_scale.json").write_text(json.dumps(report, indent=2))  # after each row


def _name(chunk: int) -> str:
    return "one chunk" if chunk == UNCHUNKED else f"chunks of {chunk}"


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
