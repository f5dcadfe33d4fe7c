"""Where in a training step rank 0's memory peaks under FSDP: RSS sampled every 0.5 ms, labelled by step phase.

The `memory_sharding.py` run (its model, data and loop; fsdp, activation checkpointing, 128-position
log-prob chunks) on 2 gloo ranks, with hooks that name the phase the step is in: each unit's forward,
the backward reaching each unit's output, the LM head's log-prob pass, the optimizer step. Prints the
last step's phases in order with the largest RSS sampled in each (MiB). Sampling misses spikes shorter
than its period, so its maximum can sit below `memory_sharding.py`'s VmHWM; the order is what it is for.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import memory_sharding as ms

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


class PhaseSampler:
    """A thread that keeps the largest RSS seen in each consecutive phase (``phase`` is set by hooks)."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.segments: list[list[Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PhaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        current, peak = None, 0.0
        while not self._stop.is_set():
            phase = self.phase
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * PAGE_MIB
            if phase != current:
                if current is not None:
                    self.segments.append([current, round(peak)])
                current, peak = phase, rss
            peak = max(peak, rss)
            time.sleep(0.0005)
        self.segments.append([current, round(peak)])


def label_phases(scorer: Any, sampler: PhaseSampler) -> None:
    """Hooks that set ``sampler.phase``: forward and backward of the embeddings, each layer and the head."""
    import torch

    from core.scoring import HEAD_UNIT_METHOD

    def name_phase(phase: str) -> None:
        sampler.phase = phase

    def on_output(module: Any, args: Any, out: Any, name: str) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: name_phase(f"backward {name}"))

    for name, module in scorer.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head") or (leaf.isdigit() and name.endswith(f"layers.{leaf}")):
            module.register_forward_pre_hook(lambda m, a, n=name: name_phase(f"forward {n}"))
            module.register_forward_hook(lambda m, a, out, n=name: on_output(m, a, out, n))
            head_pass = getattr(module, HEAD_UNIT_METHOD, None)
            if head_pass is not None:  # the untied head's own unit: one FSDP forward for all chunks

                def labelled(hidden: Any, targets: Any, run: Any = head_pass) -> Any:
                    name_phase("forward head pass")
                    logps, means = run(hidden, targets)
                    if logps.requires_grad:
                        logps.register_hook(lambda grad: name_phase("backward head pass"))
                    return logps, means

                setattr(module, HEAD_UNIT_METHOD, labelled)
    step = torch.optim.AdamW.step

    def labelled_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        name_phase("optimizer step")
        out = step(self, *args, **kwargs)
        name_phase("after optimizer step")
        return out

    torch.optim.AdamW.step = labelled_step  # type: ignore[method-assign]


def rank(rank_id: int, port: int, run_dir: Path) -> None:
    import core.sharding

    shard = core.sharding.shard_scorer
    with PhaseSampler() as sampler:

        def shard_and_label(scorer: Any, device: Any, dtype: Any) -> Any:
            out = shard(scorer, device, dtype)
            label_phases(scorer, sampler)
            return out

        core.sharding.shard_scorer = shard_and_label
        values = ms.rank_main(rank_id, port, run_dir / "spec.json", run_dir)
    (run_dir / f"rank{rank_id}.json").write_text(json.dumps({**values, "phases": sampler.segments}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--untied", action="store_true", help="the LM head with its own weight")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds for the run")
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        rank(args.rank, args.port, args.run_dir)
        return
    model, params_m = ms.save_model(ms.DIMS, tied=not args.untied)
    work = ms.OUT / ("memory_step_trace-untied" if args.untied else "memory_step_trace")
    work.mkdir(parents=True, exist_ok=True)
    steps, batch, max_length = 3, 2, 512
    ms.write_pairs(work / "pairs.jsonl", steps * batch * ms.WORLD, max_length)
    spec = ms.run_spec(model, work / "pairs.jsonl", "fsdp", True, batch, max_length, steps, 128)
    rows = ms.run_config(spec, work / "fsdp-ckpt", ms.rank_env(), args.timeout, script=__file__)
    segments = rows[0]["phases"]
    ends = [i for i, (phase, _) in enumerate(segments) if phase == "after optimizer step"]
    last = segments[ends[-2] + 1 : ends[-1] + 1]
    print(f"{params_m:.1f}M parameters; rank 0's last step, largest RSS sampled per phase (MiB):")
    for phase, mib in last:
        print(f"  {mib:6d}  {phase}")
    top = max(last, key=lambda s: s[1])
    print(f"peak: {top[1]} MiB in '{top[0]}'")


if __name__ == "__main__":
    main()
