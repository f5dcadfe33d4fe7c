"""Peak memory of a real API server while it checks hostile datasets (a 50 MB line, a gzip bomb) vs a small file.

Each (input, endpoint) pair runs against a fresh `uvicorn` server process (SQLite, auth off, loopback),
so the peak it reports (VmHWM of the server process, from /proc) belongs to that one request:

    .venv/bin/python bench/dataset_memory.py [--tokenizer tokenizer.json] [--code OTHER_CHECKOUT]

Inputs: a small valid JSONL file (the baseline), one JSONL line of a 50 MB prompt, a line just under
MINORDPO_MAX_LINE_BYTES (what the limits still let through), and a ~1 MB gzip that expands to one
1 GiB line. Endpoints: `POST /v1/datasets` (raw body) and `POST /v1/jobs:validate` (the file by path).
`--code` runs the server from another checkout (e.g. an older commit) for a before/after comparison.
Without `--tokenizer`, a small byte-level BPE is trained here for :validate.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.data.limits import DEFAULT_LIMITS  # noqa: E402
from workers.ports import listen_ports  # noqa: E402

MIB = 1024 * 1024
SERVE = (
    "import uvicorn; from api.main import create_app; "
    "uvicorn.run(create_app(), host='127.0.0.1', port={port}, log_level='warning')"
)


def make_tokenizer(folder: Path, tokenizer_file: Path | None) -> Path:
    """A folder AutoTokenizer can load: the given tokenizer.json, or a byte-level BPE trained on a few lines."""
    from transformers import PreTrainedTokenizerFast

    if tokenizer_file is not None:
        tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file))
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        raw = Tokenizer(models.BPE())
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        raw.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=1000,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        sample = [f"Question {i}: what is {i} plus {i}? It is {2 * i}. lorem ipsum dolor" for i in range(500)]
        raw.train_from_iterator(sample, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(folder)
    return folder


def write_inputs(folder: Path) -> dict[str, Path]:
    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": " No."} for i in range(12)]  # fmt: skip
    small = folder / "small.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    words = "lorem ipsum dolor sit amet "

    def one_line(path: Path, size: int) -> Path:
        prompt = (words * (size // len(words) + 1))[: size - 60]
        path.write_text(json.dumps({"prompt": prompt, "chosen": " yes", "rejected": " no"}) + "\n")
        return path

    big = one_line(folder / "line-50mb.jsonl", 50 * MIB)
    at_limit = one_line(folder / "line-at-limit.jsonl", DEFAULT_LIMITS.max_line_bytes - 1)
    bomb = folder / "bomb-1gib.jsonl.gz"
    with gzip.open(bomb, "wb", compresslevel=9) as out:
        out.write(b'{"prompt": "')
        chunk = b"a" * MIB
        for _ in range(1024):
            out.write(chunk)
        out.write(b'", "chosen": " yes", "rejected": " no"}\n')
    return {
        "small valid file": small,
        "50 MB line": big,
        f"{DEFAULT_LIMITS.max_line_bytes // MIB} MiB line (the limit)": at_limit,
        "1 GiB gzip bomb": bomb,
    }


def _vm(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return out


def measure(code: Path, work: Path, tokenizer: Path, data: Path, endpoint: str) -> dict[str, Any]:
    """Start a server, send one request, return status, seconds and the server's memory before and at peak."""
    port = listen_ports(1)[0]
    run = Path(tempfile.mkdtemp(dir=work))
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "MINORDPO_DATABASE_URL": f"sqlite:///{run / 'api.db'}",
        "MINORDPO_ARTIFACTS_DIR": str(run / "artifacts"),
        "MINORDPO_AUTO_MIGRATE": "true",
        "MINORDPO_ALLOWED_PATHS": f"{data.parent}:{tokenizer}",
        "MINORDPO_LOG_JSON": "false",
    }
    for key in ("MINORDPO_API_TOKENS", "MINORDPO_API_TOKENS_FILE"):
        env.pop(key, None)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE.format(port=port)],
        cwd=run,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        before = _vm(server.pid)
        started = time.perf_counter()
        if endpoint == "upload":
            with data.open("rb") as fh:
                r = httpx.post(f"{base}/v1/datasets?filename={data.name}", content=fh, timeout=900)
        else:
            spec = {"name": "bench", "model": str(tokenizer), "dataset": {"train": str(data)},
                    "training": {"max_length": 512}}  # fmt: skip
            r = httpx.post(f"{base}/v1/jobs:validate", json=spec, timeout=900)
        seconds = time.perf_counter() - started
        after = _vm(server.pid)
        detail = r.json().get("detail", "") if r.status_code >= 400 else "ok"
        return {
            "status": r.status_code,
            "seconds": seconds,
            "rss_start_mib": before["VmRSS"],
            "peak_mib": after["VmHWM"],
            "detail": str(detail)[:110],
        }
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="a tokenizer.json for :validate (default: trained here)"
    )
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose server is measured")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="INPUT:ENDPOINT",
        help="leave a pair out, e.g. '1 GiB gzip bomb:validate' for code without limits (it would need ~150 GiB)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dataset-memory-") as tmp:
        work = Path(tmp)
        (work / "data").mkdir()
        tokenizer = make_tokenizer(work / "tokenizer", args.tokenizer)
        inputs = write_inputs(work / "data")
        results = []
        print(f"server code: {args.code.resolve()}")
        print(
            f"{'input':28} {'endpoint':9} {'status':>6} {'seconds':>8} {'RSS start':>10} {'peak':>9}  detail"
        )
        for name, path in inputs.items():
            for endpoint in ("upload", "validate"):
                if f"{name}:{endpoint}" in args.skip:
                    print(f"{name:28} {endpoint:9} skipped", flush=True)
                    continue
                res = measure(args.code.resolve(), work, tokenizer, path, endpoint)
                res.update(input=name, endpoint=endpoint, bytes=path.stat().st_size)
                results.append(res)
                print(
                    f"{name:28} {endpoint:9} {res['status']:>6} {res['seconds']:>8.2f} "
                    f"{res['rss_start_mib']:>7.0f} MiB {res['peak_mib']:>5.0f} MiB  {res['detail']}",
                    flush=True,
                )
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
