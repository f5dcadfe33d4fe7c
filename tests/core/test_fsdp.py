"""FSDP2 on 2 gloo ranks (spawned in-process, no Ray): same run as DDP and one process, rank-0 loading,
sharded resume, final folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import core.scoring
import core.sharding
from core.checkpointing import is_sharded_checkpoint
from core.models import load_model, make_tiny_model
from core.reporting import NullReporter
from core.sharding import decoder_layers, shard_units
from core.spec import JobSpec
from core.training import Distributed, RunOptions, TrainingError, train
from core.vocab_sharding import VocabShardedEmbedding, VocabShardedHead
from tests.core.gloo_ranks import all_reduce_sum, spawn_gloo

STEPS = 4
# fp32 on CPU: DDP all-reduces gradients, FSDP reduce-scatters them, one process sums them in one go;
# the orders of the float additions differ, nothing else. Against one process, AdamW turns the
# rounding of near-zero embedding gradients into differences of up to ~2e-6 (4 steps at lr 1e-3 move
# a weight by up to 4e-3), for DDP exactly as for FSDP: hence the looser ATOL_ONE_PROCESS.
RTOL, ATOL, ATOL_ONE_PROCESS = 1e-4, 1e-6, 1e-5


class StepRecorder(NullReporter):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.grad_norms: dict[int, float] = {}
        self.reference: list[dict[str, Any]] = []
        self.samples: dict[int, list[dict[str, Any]]] = {}  # eval generations by step

    def event(self, kind: str, message: str, data: dict[str, Any] | None = None) -> None:
        if kind == "reference":
            self.reference.append(data or {})

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if "loss" in values:
            self.losses[step] = float(values["loss"])
            self.grad_norms[step] = float(values["grad_norm"])

    def generations(self, step: int, samples: list[dict[str, Any]]) -> None:
        self.samples[step] = samples


def make_spec(model: Path, data: Path, strategy: str, num_workers: int) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "fsdp",
            "model": str(model),
            "dataset": {"train": str(data), "max_rows": 48},
            "loss": {"type": "sigmoid", "beta": 0.1},
            "resources": {"num_workers": num_workers, "strategy": strategy},
            "training": {
                "batch_size": 4 // num_workers,
                "grad_accum_steps": 2,  # FSDP reduce-scatters on the last micro-batch only
                "max_length": 128,
                "learning_rate": 1e-3,
                "max_steps": STEPS,
                "log_every": 1,
                "checkpoint_every": 2,
                "precision": "fp32",
            },
        }
    )


def _watch_loading() -> dict[str, Any]:
    """Count this rank's ``from_pretrained`` and fingerprint calls; note what it brings to the broadcast,
    its FSDP units and the dtypes of its attention masks."""
    import torch.distributed.checkpoint.state_dict as dsd
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    import core.reference_source

    seen: dict[str, Any] = {"from_pretrained": 0, "fingerprints": 0, "broadcasts": [], "skeletons": []}
    load, fingerprint = AutoModelForCausalLM.from_pretrained, core.reference_source.model_fingerprint
    skeleton, set_state = core.sharding.model_skeleton, dsd.set_model_state_dict

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        seen["from_pretrained"] += 1
        return load(*args, **kwargs)

    def counted_fingerprint(*args: Any, **kwargs: Any) -> Any:
        seen["fingerprints"] += 1
        return fingerprint(*args, **kwargs)

    def watched_skeleton(*args: Any, **kwargs: Any) -> Any:
        model = skeleton(*args, **kwargs)
        seen["skeletons"].append(all(p.is_meta for p in model.parameters()))  # built on meta?
        return model

    def watched_set_state(model: Any, state: dict, **kwargs: Any) -> Any:
        local = sum(p.to_local().numel() for p in model.parameters())
        full = sum(p.numel() for p in model.parameters())
        seen["broadcasts"].append({"tensors_brought": len(state), "local": local, "full": full})
        seen["units"] = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        by_rows = (VocabShardedEmbedding, VocabShardedHead)
        seen["vocab_rows"] = [name for name, m in model.named_modules() if isinstance(m, by_rows)]
        return set_state(model, state, **kwargs)

    def watched_attention(batch: Any, model: Any, dtype: torch.dtype) -> Any:
        seen["mask_dtypes"] = sorted({*seen.get("mask_dtypes", []), str(dtype)})
        return attention(batch, model, dtype)

    attention = core.scoring.prepare_attention
    core.scoring.prepare_attention = watched_attention
    AutoModelForCausalLM.from_pretrained = counted_load
    core.reference_source.model_fingerprint = counted_fingerprint
    core.sharding.model_skeleton = watched_skeleton
    dsd.set_model_state_dict = watched_set_state
    return seen


def _rank_main(
    rank: int,
    spec_json: str,
    out: str,
    stop_after: int | None,
    resume: bool,
    caches: list[str] | None,
    world_size: int,
    vocab_rows: bool,
) -> None:
    if not vocab_rows:  # the FSDP-unit path for embeddings and head that row sharding cannot take
        core.sharding.vocab_shardable = lambda lm, world_size: False
    loading = _watch_loading()
    spec = JobSpec.model_validate_json(spec_json)
    wrap = None
    if spec.resources.strategy == "ddp":
        wrap = torch.nn.parallel.DistributedDataParallel  # what Ray's prepare_model does on CPU
    rec = StepRecorder()
    options = RunOptions(
        output_dir=Path(out),
        resume_from="latest" if resume else None,
        cache_dir=Path(caches[rank]) if caches else None,
        should_stop=(lambda: max(rec.losses, default=0) >= stop_after) if stop_after else None,
    )
    result = train(spec, options, rec, Distributed(rank, world_size, all_reduce_sum, wrap))
    summary = {
        "status": result.status,
        "step": result.step,
        "losses": rec.losses,
        "norms": rec.grad_norms,
        "loading": loading,
        "reference": rec.reference,
        "generations": rec.samples,
    }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(summary))


def run_two_ranks(
    spec: JobSpec,
    out: Path,
    *,
    stop_after: int | None = None,
    resume: bool = False,
    caches: list[Path] | None = None,
    ranks: int = 2,
    vocab_rows: bool = True,
) -> list[dict]:
    """Run ``spec`` on 2 (``ranks``) gloo ranks; ``caches``: one reference-cache folder per rank (default:
    a shared one); ``vocab_rows`` False: embeddings and head as FSDP units, not sharded by rows."""
    out.mkdir(parents=True, exist_ok=True)
    cache_dirs = [str(c) for c in caches] if caches else None
    args = (spec.model_dump_json(), str(out), stop_after, resume, cache_dirs, ranks, vocab_rows)
    spawn_gloo(_rank_main, *args, ranks=ranks)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


def steps(summary: dict[str, Any], key: str = "losses") -> dict[int, float]:
    return {int(k): v for k, v in summary[key].items()}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    single = StepRecorder()
    train(
        make_spec(tiny_model_dir, learnable_pairs_file, "ddp", 1), RunOptions(output_dir=root / "one"), single
    )
    fsdp_spec = make_spec(tiny_model_dir, learnable_pairs_file, "fsdp", 2)
    return {
        "root": root,
        "single": {"losses": single.losses, "norms": single.grad_norms},
        "ddp": run_two_ranks(make_spec(tiny_model_dir, learnable_pairs_file, "ddp", 2), root / "ddp"),
        "fsdp": run_two_ranks(fsdp_spec, root / "fsdp"),
        "fsdp_spec": fsdp_spec,
        "model": tiny_model_dir,
        "data": learnable_pairs_file,
    }


def test_fsdp_equals_ddp_and_one_process(runs: dict, tiny_model_dir: Path) -> None:
    root = runs["root"]
    ddp, fsdp, single = runs["ddp"][0], runs["fsdp"][0], runs["single"]
    assert fsdp["status"] == "completed" and fsdp["step"] == STEPS
    assert sorted(steps(fsdp)) == list(range(1, STEPS + 1))
    for key in ("losses", "norms"):  # the global gradient norm, not one shard's
        a, b, c = steps(fsdp, key), steps(ddp, key), steps(single, key)
        for step in a:
            assert a[step] == pytest.approx(b[step], rel=RTOL), (key, step)
            assert a[step] == pytest.approx(c[step], rel=RTOL), (key, step)
    assert steps(runs["fsdp"][1]) == steps(fsdp)  # both ranks report the reduced loss
    depth = load_model(str(tiny_model_dir)).config.num_hidden_layers
    layers = [f"model.model.layers.{i}" for i in range(depth)]
    assert fsdp["loading"]["units"] == ["", *layers]  # the tied pair: one row-sharded weight, no unit
    assert fsdp["loading"]["vocab_rows"] == ["model.model.embed_tokens", "model.lm_head"]
    assert fsdp["loading"]["mask_dtypes"] == ["torch.float32"]
    f, d, s = final_weights(root / "fsdp"), final_weights(root / "ddp"), final_weights(root / "one")
    assert set(f) == set(s)
    start = load_model(str(tiny_model_dir)).state_dict()
    for name in f:
        torch.testing.assert_close(f[name], d[name], rtol=RTOL, atol=ATOL, msg=name)
        torch.testing.assert_close(f[name], s[name], rtol=RTOL, atol=ATOL_ONE_PROCESS, msg=name)
    assert any(not torch.allclose(start[k], f[k]) for k in f)  # the weights really moved


def test_untied_embeddings_and_head_by_rows_or_as_units_train_the_same(
    tiny_model_dir: Path, learnable_pairs_file: Path, tmp_path: Path
) -> None:
    """An untied Llama (as Llama 3 8B/70B). Its embeddings and head are sharded by vocabulary rows (no
    FSDP unit); where they cannot be (forced here), each is an FSDP unit of its own. Either way 2 fsdp
    ranks equal one process."""
    untied = make_tiny_model(tmp_path / "untied", tokenizer=tiny_model_dir, tie_embeddings=False)
    model, tied = load_model(str(untied)), load_model(str(tiny_model_dir))
    assert shard_units(model) == [model.get_input_embeddings(), *decoder_layers(model)]
    assert shard_units(tied) == decoder_layers(tied)  # a tied pair, if not by rows, stays in the root unit
    single = StepRecorder()
    train(make_spec(untied, learnable_pairs_file, "ddp", 1), RunOptions(output_dir=tmp_path / "one"), single)
    layers = [f"model.model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    ends = ["model.model.embed_tokens", "model.lm_head"]
    expected = {True: (["", *layers], ends), False: (["", ends[0], *layers, ends[1]], [])}  # root first
    start = model.state_dict()
    for vocab_rows, (units, by_rows) in expected.items():
        run = tmp_path / f"fsdp-rows-{vocab_rows}"
        spec = make_spec(untied, learnable_pairs_file, "fsdp", 2)
        fsdp = run_two_ranks(spec, run, vocab_rows=vocab_rows)[0]
        assert fsdp["status"] == "completed"
        assert (fsdp["loading"]["units"], fsdp["loading"]["vocab_rows"]) == (units, by_rows)
        for key in ("losses", "norms"):
            a, c = steps(fsdp, key), steps({"losses": single.losses, "norms": single.grad_norms}, key)
            assert sorted(a) == sorted(c) == list(range(1, STEPS + 1))
            for step in a:
                assert a[step] == pytest.approx(c[step], rel=RTOL), (vocab_rows, key, step)
        f, s = final_weights(run), final_weights(tmp_path / "one")
        assert set(f) == set(s) and "lm_head.weight" in f
        for name in f:
            torch.testing.assert_close(f[name], s[name], rtol=RTOL, atol=ATOL_ONE_PROCESS, msg=name)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            assert not torch.allclose(start[name], f[name]), name


def test_only_rank0_reads_the_weights_and_fingerprints(runs: dict) -> None:
    """FSDP: rank 1 builds on meta and gets its shards by broadcast; rank 0 alone hashes the model."""
    zero, one = runs["fsdp"][0]["loading"], runs["fsdp"][1]["loading"]
    assert zero["from_pretrained"] == 1 and one["from_pretrained"] == 0
    assert one["skeletons"] == [True]  # rank 1 builds its model on meta
    assert zero["skeletons"] == [True]  # rank 0 only for the final save's CPU copy of the gathered weights
    [bring0], [bring1] = zero["broadcasts"], one["broadcasts"]
    assert bring1["tensors_brought"] == 0 and bring0["tensors_brought"] > 0
    assert bring1["local"] <= bring1["full"] // 2 + 1024  # rank 1 only ever held its half
    assert (zero["fingerprints"], one["fingerprints"]) == (1, 0)
    layers = [f"model.model.layers.{i}" for i in range(2)]
    assert zero["units"] == ["", *layers]  # the tied pair is sharded by rows: no unit of its own
    ddp = [r["loading"] for r in runs["ddp"]]  # the counters do count: under DDP every rank loads
    assert [r["from_pretrained"] for r in ddp] == [1, 1]
    assert [r["fingerprints"] for r in ddp] == [1, 0] and ddp[1]["broadcasts"] == []


def assert_resume_matches(straight: dict, resumed: dict, straight_dir: Path, resumed_dir: Path) -> None:
    """A run resumed at step 2 of 4 logs steps 3-4 with the straight run's losses and ends with its weights."""
    assert resumed["status"] == "completed" and sorted(steps(resumed)) == [3, 4]
    expected = steps(straight)
    for step, loss in steps(resumed).items():
        assert loss == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_sharded_checkpoint_resume_equals_straight_run(runs: dict) -> None:
    root, spec = runs["root"], runs["fsdp_spec"]
    first = run_two_ranks(spec, root / "split", stop_after=2)
    assert first[0]["status"] == "cancelled" and first[0]["step"] == 2
    ckpt = root / "split" / "checkpoints" / "step-0000002"
    assert (ckpt / "sharded" / ".metadata").exists() and (ckpt / "trainer_state.pt").exists()
    assert len(list((ckpt / "sharded").glob("*.distcp"))) == 2  # one shard file per rank
    second = run_two_ranks(spec, root / "split", resume=True)
    assert_resume_matches(runs["fsdp"][0], second[0], root / "fsdp", root / "split")


def test_ddp_checkpoint_resume_equals_straight_run_and_rank0_decides_the_cache(runs: dict) -> None:
    """DDP on 2 ranks: stop at step 2, resume; the resumed half equals the straight run. The resumed run
    gives rank 1 an empty cache folder of its own: rank 0's hit is shared, so no rank recomputes."""
    root = runs["root"]
    spec = make_spec(runs["model"], runs["data"], "ddp", 2)
    first = run_two_ranks(spec, root / "ddp-split", stop_after=2)
    assert first[0]["status"] == "cancelled" and first[0]["step"] == 2
    assert [r["reference"][0]["cached"] for r in first] == [False, False]
    caches = [root / "ddp-split" / "cache", root / "rank1-cache"]
    second = run_two_ranks(spec, root / "ddp-split", resume=True, caches=caches)
    assert [r["reference"][0]["cached"] for r in second] == [True, True]
    assert second[0]["reference"][0]["key"] == second[1]["reference"][0]["key"]
    assert not caches[1].exists()  # rank 1 neither read nor wrote a cache file
    assert second[0]["status"] == "completed" and sorted(steps(second[0])) == [3, 4]
    straight = steps(runs["ddp"][0])
    for step, loss in steps(second[0]).items():  # fp32, same ranks, same order of additions
        assert loss == pytest.approx(straight[step], rel=1e-6, abs=1e-7)
    a, b = final_weights(root / "ddp"), final_weights(root / "ddp-split")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


def assert_close_to_straight(straight: dict, resumed: dict, straight_dir: Path, resumed_dir: Path) -> None:
    """A run resumed at step 2 of 4 on another number of ranks (or strategy): steps 3-4 sum the same
    gradients in another order, so losses and weights agree as DDP, FSDP and one process do."""
    assert resumed["status"] == "completed" and sorted(steps(resumed)) == [3, 4]
    expected = steps(straight)
    for step, loss in steps(resumed).items():
        assert loss == pytest.approx(expected[step], rel=RTOL), step
    a, b = final_weights(straight_dir), final_weights(resumed_dir)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=ATOL_ONE_PROCESS, msg=name)


def resume_in_process(spec: JobSpec, checkpoints: Path, out: Path) -> dict:
    """Resume from the latest of ``checkpoints`` in this process (one rank, no process group)."""
    shutil.copytree(checkpoints, out / "checkpoints")
    rec = StepRecorder()
    result = train(spec, RunOptions(output_dir=out, resume_from="latest"), rec)
    return {"status": result.status, "losses": rec.losses}


def test_two_rank_sharded_checkpoint_resumes_on_one_rank(runs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written by 2 FSDP ranks of 2 pairs, resumed by 1 rank of 4 (the same pairs per step, so the same
    place in the data): on 1 FSDP rank (DCP reshards) and in one process without sharding; with other
    pairs per step the resume is refused, naming both, before any model is loaded."""
    root, model, data = runs["root"], runs["model"], runs["data"]
    first = run_two_ranks(runs["fsdp_spec"], root / "resize", stop_after=2)
    assert first[0]["step"] == 2
    checkpoints = root / "resize" / "checkpoints"
    one_rank = root / "resize-one-rank"
    shutil.copytree(checkpoints, one_rank / "checkpoints")
    [on_one] = run_two_ranks(make_spec(model, data, "fsdp", 1), one_rank, resume=True, ranks=1)
    assert_close_to_straight(runs["fsdp"][0], on_one, root / "fsdp", one_rank)
    unsharded = resume_in_process(make_spec(model, data, "ddp", 1), checkpoints, root / "resize-unsharded")
    assert_close_to_straight(runs["fsdp"][0], unsharded, root / "fsdp", root / "resize-unsharded")
    fewer = make_spec(model, data, "ddp", 1)  # 1 rank of 2 pairs: the global steps are other sets of pairs
    fewer.training.batch_size = 2

    def no_model(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded before the resume was refused")

    monkeypatch.setattr("core.training.Trainer._load_policy", no_model)
    with pytest.raises(TrainingError) as raised:
        resume_in_process(fewer, checkpoints, root / "resize-refused")
    assert raised.value.code == "resume_batch_mismatch"
    assert "num_workers 2 and training.batch_size 2 (4 pairs per step)" in raised.value.message
    assert "num_workers 1 and batch_size 2 (2)" in raised.value.message


def test_ddp_checkpoint_resumes_under_fsdp_on_two_ranks(runs: dict) -> None:
    """A one-process DDP checkpoint (full weights, optimizer state keyed by position) resumed by 2 FSDP
    ranks: each rank takes its slices of the full optimizer state."""
    root = runs["root"]
    out = root / "ddp-to-fsdp"
    first = StepRecorder()
    spec = make_spec(runs["model"], runs["data"], "ddp", 1)
    stop = lambda: max(first.losses, default=0) >= 2  # noqa: E731
    assert train(spec, RunOptions(output_dir=out, should_stop=stop), first).status == "cancelled"
    assert not is_sharded_checkpoint(out / "checkpoints" / "step-0000002")
    second = run_two_ranks(runs["fsdp_spec"], out, resume=True)
    assert_close_to_straight(runs["fsdp"][0], second[0], root / "fsdp", out)


def test_fsdp_live_reference_is_sharded_and_read_by_rank0(runs: dict) -> None:
    """precompute_ref_logps false under FSDP: a frozen sharded copy, read by rank 0 only, scores each
    batch; the losses equal the precomputed run's (the same weights score the same pairs)."""
    spec = runs["fsdp_spec"].model_copy(deep=True)
    spec.training.precompute_ref_logps = False
    spec.training.checkpoint_every = None
    live = run_two_ranks(spec, runs["root"] / "fsdp-live")
    assert [r["loading"]["from_pretrained"] for r in live] == [2, 0]  # policy + reference, rank 0 only
    assert [len(r["loading"]["broadcasts"]) for r in live] == [2, 2]
    assert live[0]["reference"] == [] and live[0]["loading"]["fingerprints"] == 0  # no table, no cache key
    precomputed = steps(runs["fsdp"][0])
    for step, loss in steps(live[0]).items():
        assert loss == pytest.approx(precomputed[step], rel=1e-5), step
    assert sorted(steps(live[0])) == list(range(1, STEPS + 1))


def test_fsdp_final_folder_loads_with_from_pretrained(runs: dict) -> None:
    from transformers import AutoModelForCausalLM

    folder = runs["root"] / "fsdp" / "final"
    model = AutoModelForCausalLM.from_pretrained(folder)
    saved = final_weights(runs["root"] / "fsdp")
    state = model.state_dict()
    for name, value in saved.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_fsdp_bf16_mixed_precision_tracks_fp32(runs: dict) -> None:
    """MixedPrecisionPolicy(bf16 params, fp32 reduce): fp32 master weights, losses close to fp32, finite."""
    spec = runs["fsdp_spec"].model_copy(deep=True)
    spec.training.precision = "bf16"
    spec.training.checkpoint_every = None
    bf16_run = run_two_ranks(spec, runs["root"] / "bf16")[0]
    assert bf16_run["loading"]["mask_dtypes"] == ["torch.bfloat16"]  # as the layers' cast parameters
    bf16 = steps(bf16_run)
    fp32 = steps(runs["fsdp"][0])
    assert sorted(bf16) == sorted(fp32)
    for step, loss in bf16.items():
        assert loss == pytest.approx(fp32[step], abs=5e-3), step
    assert bf16 != fp32  # bf16 really ran (the forward rounds differently)
    saved = final_weights(runs["root"] / "bf16")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in saved.values())
