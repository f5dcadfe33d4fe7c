"""Our `sigmoid` loss and its gradients equal TRL's DPOTrainer on the same batch, weights and reference."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from core.data import prepare_data, split_implicit_prompt
from core.losses import LOSSES
from core.models import load_model, load_tokenizer, make_tiny_model
from core.packing import pack_pairs
from core.scoring import PairScorer
from core.spec import DatasetSpec
from tests.conftest import GPT2_FILE, HH_FILE

trl = pytest.importorskip("trl")


def _hh_rows(n: int) -> list[dict[str, str]]:
    rows = []
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as fh:
        for line in fh:
            raw = json.loads(line)
            text = split_implicit_prompt(raw["chosen"], raw["rejected"])
            if text.chosen.strip() and text.rejected.strip() and len(text.prompt) < 600:
                rows.append({"prompt": text.prompt, "chosen": text.chosen, "rejected": text.rejected})
            if len(rows) == n:
                return rows
    raise AssertionError("not enough short HH pairs")


def test_sigmoid_loss_and_gradients_equal_trl(tiny_model_dir: Path, tmp_path: Path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = _hh_rows(4)
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ref_dir = make_tiny_model(tmp_path / "ref", tokenizer=GPT2_FILE, size="tiny", seed=1)
    tok = load_tokenizer(str(tiny_model_dir))

    # --- TRL
    trl_policy = load_model(str(tiny_model_dir))
    trl_ref = load_model(str(ref_dir))
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        bf16=False,
        use_cpu=True,
        report_to="none",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=512,
        per_device_train_batch_size=4,
        precompute_ref_log_probs=False,
    )
    trainer = DPOTrainer(
        model=trl_policy,
        ref_model=trl_ref,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_policy.train()
    trl_loss = trainer.compute_loss(trl_policy, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trl_policy.named_parameters()}

    # --- ours, on the same strings and weights
    data = prepare_data(DatasetSpec(train=str(data_file), format="standard"), tok, 512, seed=0)
    assert len(data.train) == 4
    for ours, theirs in zip(data.train, trainer.train_dataset, strict=True):
        assert ours.prompt_ids == theirs["prompt_ids"]
        assert ours.chosen_ids == theirs["chosen_ids"]
        assert ours.rejected_ids == theirs["rejected_ids"]
    policy = load_model(str(tiny_model_dir)).train()
    ref = load_model(str(ref_dir)).eval()
    batch = pack_pairs(data.train, range(4), pad_id=tok.pad_token_id)
    scores = PairScorer(policy)(batch)
    with torch.no_grad():
        ref_scores = PairScorer(ref)(batch)
    loss = LOSSES["sigmoid"](
        scores.chosen_logps,
        scores.rejected_logps,
        ref_scores.chosen_logps,
        ref_scores.rejected_logps,
        beta=0.1,
    ).mean()
    loss.backward()

    assert abs(float(loss) - float(trl_loss)) < 1e-5, (float(loss), float(trl_loss))
    assert abs(float(loss) - 0.6931) > 1e-3  # a different reference makes the value non-trivial
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], rtol=1e-4, atol=1e-6, msg=name)
