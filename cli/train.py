"""`minordpo train` and `minordpo make-tiny-model`: the core engine from the command line."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from cli.output import err, fail
from cli.progress import ConsoleReporter
from cli.specfile import SpecFileError, load_spec
from core.settings import get_settings
from workers.conventions import shared_cache_dir


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _fail(message: str, code: int = 2) -> typer.Exit:
    return fail(message, code)


#: The GPT-2 tokenizer that ships with the repository (examples/data/SOURCES.md).
SHIPPED_TOKENIZER = Path(__file__).resolve().parents[1] / "examples" / "data" / "tokenizers" / "gpt2"


def register(app: typer.Typer) -> None:
    """Add the core-engine commands to the main app."""

    @app.command("make-tiny-model")
    def make_tiny_model_cmd(
        out_dir: Annotated[Path, typer.Argument(help="Folder to write the Hugging Face model into")],
        tokenizer: Annotated[
            Path | None,
            typer.Option(
                help="tokenizer.json or tokenizer folder (default: the GPT-2 tokenizer shipped in "
                "examples/data/tokenizers/gpt2)"
            ),
        ] = None,
        size: Annotated[
            str, typer.Option(help="tiny (~1M params with GPT-2 vocab) or small (~20M)")
        ] = "tiny",
        seed: int = 0,
    ) -> None:
        """Save a small random-init Llama-architecture causal LM and its tokenizer."""
        _quiet_libraries()
        from core.models import ModelLoadError, make_tiny_model

        if size not in ("tiny", "small"):
            raise _fail(f"--size must be tiny or small, not {size!r}")
        size_lit: Literal["tiny", "small"] = "tiny" if size == "tiny" else "small"
        try:
            if tokenizer is None and SHIPPED_TOKENIZER.exists():
                tokenizer = SHIPPED_TOKENIZER
            path = make_tiny_model(out_dir, tokenizer=tokenizer, size=size_lit, seed=seed)
        except ModelLoadError as exc:
            raise _fail(str(exc)) from exc
        typer.echo(f"wrote {size} model to {path}")

    @app.command()
    def train(
        spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="Job spec, JSON or YAML")],
        output_dir: Annotated[
            Path | None, typer.Option(help="Run folder (default: <artifacts>/runs/<name>)")
        ] = None,
        resume: Annotated[bool, typer.Option(help="Resume from the run folder's latest checkpoint")] = False,
        set_: Annotated[
            list[str] | None, typer.Option("--set", help="Override a spec field: key.path=value")
        ] = None,
        device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    ) -> None:
        """Run one job in this process (no server, no Ray), with a progress bar and a final summary."""
        _quiet_libraries()
        from core.data import DatasetError
        from core.models import ModelLoadError
        from core.reporting import JsonlReporter, MultiReporter
        from core.training import RunOptions, TrainingError
        from core.training import train as run_training

        logging.basicConfig(level=logging.WARNING)
        try:
            spec = load_spec(spec_path, set_ or [])
        except SpecFileError as exc:
            raise _fail(str(exc)) from exc
        if spec.model.from_job:
            raise _fail(
                f"model.from_job ({spec.model.from_job}) names a job of the service: run it there with "
                "`minordpo submit`, or give model.path the folder of that job's model"
            )
        settings = get_settings()
        run_dir = output_dir or settings.artifacts_dir / "runs" / spec.name
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "spec.json").write_text(spec.model_dump_json(indent=2), encoding="utf-8")
        reporter = MultiReporter(ConsoleReporter(err), JsonlReporter(run_dir))
        options = RunOptions(
            output_dir=run_dir,
            cache_dir=shared_cache_dir(settings.artifacts_dir),
            device=device,
            resume_from="latest" if resume else None,
            allow_remote_code=settings.allow_remote_code,
            data_limits=settings.data_limits(),
        )
        try:
            result = run_training(spec, options, reporter)
        except (DatasetError, ModelLoadError) as exc:
            raise _fail(str(exc)) from exc
        except TrainingError as exc:
            reporter.event("failed", exc.message, {"code": exc.code})
            raise _fail(f"{exc.code}: {exc.message}", code=1) from exc
        finally:
            reporter.close()
        table = Table(title=f"{spec.name}: {result.status} at step {result.step}/{result.total_steps}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in (
            "loss",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
            "pairs_per_second",
        ):
            if key in result.metrics:
                table.add_row(key, f"{result.metrics[key]:.4f}")
        for key in ("eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"):
            if key in result.eval_metrics:
                table.add_row(key, f"{result.eval_metrics[key]:.4f}")
        Console().print(table)
        typer.echo(f"run folder: {run_dir}")
        if result.final_model_dir:
            typer.echo(f"final model: {result.final_model_dir}")
