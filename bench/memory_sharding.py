"""Peak RSS per rank of the real training loop on 2 gloo ranks: DDP vs FSDP2, with and without activation checkpointing."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from memory_scale import DIMS, _reset_peak  # the same ≈92M Llama shape
from memory_scale import _rss_mib as _proc_mib

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
GPT2_DIR = REPO / "examples" / "data" / "tokenizers" / "gpt2"
QUICK_DIMS = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4}
WORLD = 2
WORDS = ["the", "a", "of", "to", "and", "in", "is", "it", "that", "for", "on", "with"]


class PhasePeaks:
    """A Reporter that reads this rank's RSS at the loop's phase boundaries: set-up, the steps, the final save."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {
            "start_rss_mib": _proc_mib("VmRSS"),
            "start_peak_mib": _proc_mib("VmHWM"),
        }
        self.values["phase_peaks_exact"] = _reset_peak()
        self.total_steps = 0
        self.losses: dict[int, float] = {}

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "started":  # set-up is done: data, model (sharded or wrapped), reference pass
            self.total_steps = int((data or {})["total_steps"])
            self._close_phase("setup")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self.losses[step] = float(values["loss"])
            self.values["tokens_so_far"] = int(values["num_tokens"])  # all ranks' real tokens
            if step == self.total_steps:
                self._close_phase("steps")

    def checkpoint(self, step: int, path: Path | None, values: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        self._close_phase("save")  # the final model: gathered and written by rank 0
        peaks = [v for k, v in self.values.items() if k.endswith("_peak_mib")]
        self.values["process_peak_mib"] = max(peaks)

    def _close_phase(self, name: str) -> None:
        self.values[f"{name}_peak_mib"] = _proc_mib("VmHWM")
        self.values[f"after_{name}_rss_mib"] = _proc_mib("VmRSS")
        _reset_peak()


def rank_main(rank: int, port: int, spec_file: Path, run_dir: Path) -> dict[str, Any]:
    """One rank: join the gloo group, run ``core.training.train`` on the spec, return its RSS phases."""
    import torch
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    from core.spec import JobSpec
    from core.training import Distributed, RunOptions, train

    def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor.detach().to(torch.float64).clone()
        torch_dist.all_reduce(buf)
        return buf.to(tensor.dtype)

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        spec = JobSpec.model_validate_json(spec_file.read_text())
        wrap = torch.nn.parallel.DistributedDataParallel if spec.resources.strategy == "ddp" else None
        phases = PhasePeaks()
        started = time.perf_counter()
        result = train(
            spec, RunOptions(output_dir=run_dir), phases, Distributed(rank, WORLD, all_reduce_sum, wrap)
        )
        phases.close()
    finally:
        torch_dist.destroy_process_group()
    return {
        **phases.values,
        "status": result.status,
        "losses": phases.losses,
        "wall_s": time.perf_counter() - started,
    }


def save_model(dims: dict[str, int], *, tied: bool = True) -> tuple[Path, float]:
    """The random-init Llama with the GPT-2 tokenizer as a HF folder under bench/out (made once); its size in M."""
    from core.models import make_tiny_model

    name = f"model-{dims['hidden_size']}x{dims['num_hidden_layers']}" + ("" if tied else "-untied")
    folder = OUT / "memory_sharding" / name
    if not (folder / "model.safetensors").exists():
        make_tiny_model(folder, tokenizer=GPT2_DIR, dims=dims, max_positions=4096, tie_embeddings=tied)
    params = (folder / "model.safetensors").stat().st_size / 4 / 1e6  # fp32, a tied head stored once
    return folder, params


def write_pairs(path: Path, count: int, max_length: int) -> None:
    """Pairs long enough that every one is cut to the same shape: prompt, chosen, rejected max_length/2 tokens each."""
    rng = random.Random(0)

    def text() -> str:
        return " " + " ".join(rng.choice(WORDS) for _ in range(max_length))

    rows = [{"prompt": text(), "chosen": text(), "rejected": text()} for _ in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def rank_env() -> dict[str, str]:
    """The ranks' environment: fresh processes (glibc reads the mmap threshold at start-up, so RSS follows
    live tensors), one torch thread, nothing from the hub."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    return env | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_spec(
    model: Path,
    data: Path,
    strategy: str,
    checkpointing: bool,
    batch: int,
    max_length: int,
    steps: int,
    chunk: int | None,
) -> dict[str, Any]:
    """The job spec each configuration runs: sigmoid loss, fp32, one metrics row per step."""
    return {
        "name": "memory-sharding",
        "model": str(model),
        "dataset": {"train": str(data)},
        "loss": {"type": "sigmoid", "beta": 0.1},
        "resources": {"num_workers": WORLD, "strategy": strategy},
        "training": {
            "batch_size": batch,
            "max_length": max_length,
            "max_steps": steps,
            "learning_rate": 1e-5,
            "log_every": 1,
            "precision": "fp32",
            "gradient_checkpointing": checkpointing,
            **({"logps_chunk_size": chunk} if chunk else {}),
        },
    }


def run_config(
    spec: dict[str, Any], run_dir: Path, env: dict[str, str], timeout: float, script: str = __file__
) -> list[dict[str, Any]]:
    """Both ranks as fresh processes of ``script`` (``--rank``, ``--port``, ``--run-dir``); their result
    rows (``rank<N>.json``), rank 0 first."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        cmd = [sys.executable, script, "--rank", str(rank), "--port", str(port), "--run-dir", str(run_dir)]
        with (run_dir / f"rank{rank}.log").open("w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            log = (run_dir / f"rank{rank}.log").read_text()[-3000:]
            raise SystemExit(f"rank {rank} of {run_dir.name} exited with {proc.returncode}:\n{log}")
    return [json.loads((run_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="pairs per rank per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--chunk", type=int, default=None, help="training.logps_chunk_size (default: the spec's default)"
    )
    parser.add_argument(
        "--checkpointing",
        choices=("both", "yes", "no"),
        default="both",
        help="run without and/or with training.gradient_checkpointing",
    )
    parser.add_argument(
        "--untied", action="store_true", help="the LM head with its own weight (as in Llama 3 8B/70B)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, max_length 64, batch 1, 1 step")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument(
        "--name", help="JSON file and work folder under bench/out (default memory_sharding[-quick])"
    )
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank is not None:
        values = rank_main(args.rank, args.port, args.run_dir / "spec.json", args.run_dir)
        (args.run_dir / f"rank{args.rank}.json").write_text(json.dumps(values))
        return
    if args.quick:
        args.max_length, args.batch, args.steps = 64, 1, 1
    name = args.name or ("memory_sharding-quick" if args.quick else "memory_sharding")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    model, params_m = save_model(QUICK_DIMS if args.quick else DIMS, tied=not args.untied)
    work = OUT / name
    data = work / "pairs.jsonl"
    work.mkdir(parents=True, exist_ok=True)
    write_pairs(data, args.steps * args.batch * WORLD, args.max_length)
    rows: list[dict[str, Any]] = []
    report = {
        "date": datetime.now(UTC).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_start": os.getloadavg()[0],
        "params_m": round(params_m, 1),
        "tied_embeddings": not args.untied,
        "max_length": args.max_length,
        "batch_per_rank": args.batch,
        "steps": args.steps,
        "logps_chunk_size": args.chunk,
        "rows": rows,
    }
    env = rank_env()
    print(
        f"{params_m:.1f}M parameters, max_length {args.max_length}, batch {args.batch}/rank, {args.steps} steps"
    )
    print(
        "strategy ckpt  rank | start  setup peak  after setup  step peak  save peak  process peak (MiB) | last loss"
    )
    modes = {"both": (False, True), "yes": (True,), "no": (False,)}[args.checkpointing]
    for checkpointing in modes:
        for strategy in ("ddp", "fsdp"):
            spec = run_spec(
                model, data, strategy, checkpointing, args.batch, args.max_length, args.steps, args.chunk
            )
            run_dir = work / f"{strategy}-{'ckpt' if checkpointing else 'nockpt'}"
            for rank, row in enumerate(run_config(spec, run_dir, env, args.timeout)):
                rows.append(
                    {"strategy": strategy, "gradient_checkpointing": checkpointing, "rank": rank, **row}
                )
                loss = row["losses"][str(args.steps)]
                print(
                    f"{strategy:8} {checkpointing!s:5} {rank:4} | {row['start_rss_mib']:5.0f} {row['setup_peak_mib']:11.0f}"
                    f" {row['after_setup_rss_mib']:12.0f} {row['steps_peak_mib']:10.0f} {row['save_peak_mib']:10.0f}"
                    f" {row['process_peak_mib']:13.0f}       | {loss:.6f}",
                    flush=True,
                )
            (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))  # after each configuration
    ratios = {}
    for checkpointing in modes:
        for key in ("process_peak_mib", "steps_peak_mib"):
            peak = {
                s: max(
                    r[key]
                    for r in rows
                    if r["strategy"] == s and r["gradient_checkpointing"] == checkpointing
                )
                for s in ("ddp", "fsdp")
            }
            ratios[f"{'ckpt' if checkpointing else 'no_ckpt'}_{key.removesuffix('_mib')}"] = (
                peak["fsdp"] / peak["ddp"]
            )
    report["fsdp_over_ddp_max_over_ranks"] = ratios
    report["load_average_at_end"] = os.getloadavg()[0]
    (OUT / f"{name}.json").write_text(json.dumps(report, indent=2))
    for key, ratio in ratios.items():
        print(f"FSDP/DDP {key}: {ratio:.2f}")


if __name__ == "__main__":
    main()
