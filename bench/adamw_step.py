"""AdamW's step alone, foreach vs fused kernel, on the ≈92M Llama's parameters: seconds and temporaries.

Each kernel runs in a fresh process with one torch thread and `MALLOC_MMAP_THRESHOLD_=65536` (RSS follows
live tensors): random parameters and gradients of the `memory_scale.py` model's shapes, one warm-up
step (which allocates the two moments), then `--steps` timed steps; "temporaries" is the RSS peak of a
timed step above the RSS before it. Prints one JSON line per kernel and the fused/foreach time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from memory_scale import DIMS, VOCAB, _reset_peak
from memory_scale import _rss_mib as _proc_mib


def shapes() -> list[tuple[int, ...]]:
    """The parameter shapes of the Llama in memory_scale.py (tied embedding/head counted once), built on meta."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    head_dim = DIMS["hidden_size"] // DIMS["num_attention_heads"]
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=True, head_dim=head_dim, **DIMS)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [tuple(p.shape) for p in model.parameters()]


def child(kernel: str, steps: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = torch.optim.AdamW(params, lr=1e-4, **{kernel: True})
    opt.step()  # allocates exp_avg and exp_avg_sq
    times, extra = [], []
    for _ in range(steps):
        before = _proc_mib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
        extra.append(_proc_mib("VmHWM") - before)
    return {
        "kernel": kernel,
        "params_m": sum(p.numel() for p in params) / 1e6,
        "step_s": statistics.median(times),
        "temporaries_mib": max(extra),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", choices=["foreach", "fused"])
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    results = {}
    for kernel in ("foreach", "fused"):
        cmd = [sys.executable, __file__, "--child", kernel, "--steps", str(args.steps)]
        line = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.strip()
        results[kernel] = json.loads(line.splitlines()[-1])
        print(line)
    print(f"fused_over_foreach_step_time: {results['fused']['step_s'] / results['foreach']['step_s']:.2f}")


if __name__ == "__main__":
    main()
