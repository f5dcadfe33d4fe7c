"""Model and tokenizer loading (`from_pretrained`, dtype, pad token, LoRA) and the tiny test models."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from core.attention import flex_trainable, resolve_attn_implementation, uses_flex
from core.file_digests import file_digests

if TYPE_CHECKING:  # core.spec needs pydantic; the scorer path (bench/gpu_check.py) must load without it
    from core.spec import LoraSpec, ModelSpec

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A plain ChatML template for tokenizers that ship none (e.g. GPT-2), so conversational data renders."""

TINY_SIZES: dict[str, dict[str, int]] = {
    # ≈0.8M parameters with the GPT-2 vocabulary (tied embeddings dominate): unit tests.
    "tiny": {"hidden_size": 16, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    # ≈19M parameters with the GPT-2 vocabulary: benchmarks.
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 8, "num_attention_heads": 8},
}


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message says what to fix."""


def _is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def load_tokenizer(spec: ModelSpec | str, *, allow_remote_code: bool = False) -> Any:
    """The model's tokenizer with a pad token (EOS when it has none) and right padding."""
    from transformers import AutoTokenizer

    from core.spec import ModelSpec

    spec = ModelSpec(path=spec) if isinstance(spec, str) else spec
    _check_remote_code(spec, allow_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(
            spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001 - many loader errors; all mean "cannot load"
        raise ModelLoadError(f"cannot load tokenizer from {spec.path!r}: {exc}") from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"tokenizer at {spec.path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _check_remote_code(spec: ModelSpec, allow_remote_code: bool) -> None:
    if spec.trust_remote_code and not allow_remote_code:
        raise ModelLoadError(
            "model.trust_remote_code is refused: the operator has not allowed remote code "
            "(MINORDPO_ALLOW_REMOTE_CODE=true)"
        )


def load_model(
    spec: ModelSpec | str,
    *,
    allow_remote_code: bool = False,
    device: torch.device | str = "cpu",
    path_override: str | Path | None = None,
) -> nn.Module:
    """A causal LM through the real `from_pretrained` path (local folder or hub id)."""
    from transformers import AutoModelForCausalLM

    from core.spec import ModelSpec

    spec = ModelSpec(path=spec) if isinstance(spec, str) else spec
    _check_remote_code(spec, allow_remote_code)
    source = str(path_override or spec.path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=None if path_override else spec.revision,
            dtype=DTYPES[spec.dtype],
            trust_remote_code=spec.trust_remote_code,
            attn_implementation=resolve_attn_implementation(spec.attn_implementation, device),
        )
    except Exception as exc:  # noqa: BLE001
        if spec.attn_implementation == "auto" and resolve_attn_implementation("auto", device) != "sdpa":
            log.warning("model %s cannot use flex_attention (%s); falling back to sdpa", source, exc)
            return load_model(
                spec.model_copy(update={"attn_implementation": "sdpa"}),
                allow_remote_code=allow_remote_code,
                device=device,
                path_override=path_override,
            )
        raise ModelLoadError(f"cannot load model from {source!r}: {exc}") from exc
    model.config.use_cache = False
    if spec.attn_implementation == "auto" and uses_flex(model) and not flex_trainable(model.config):
        log.warning("model %s has attention dropout, which flex_attention refuses; using sdpa", source)
        model.set_attn_implementation("sdpa")
    return model.to(device)


def model_skeleton(config: Any, dtype: torch.dtype, adapters: Any = None) -> nn.Module:
    """The architecture ``config`` describes, parameters on the meta device: no memory, no weight file read.

    ``config`` is a loaded model's (it carries the attention implementation and any remote-code class map);
    ``adapters``, a loaded LoRA model's ``lora_config``, wraps the skeleton with the same (meta) adapters.
    """
    from transformers import AutoModelForCausalLM

    remote = bool(getattr(config, "auto_map", None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            trust_remote_code=remote,
            attn_implementation=getattr(config, "_attn_implementation", None),
        )
        model.config.use_cache = False
        if adapters is not None:
            from peft import get_peft_model

            model = get_peft_model(model, adapters)
    return model


def apply_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """Wrap the model with trainable LoRA adapters (peft); base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def load_lora_checkpoint(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Base model + trainable adapters restored from a checkpoint folder."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def lora_config(model: nn.Module) -> Any:
    """The config of a LoRA model's (single, trainable) adapter, to rebuild it elsewhere; None without LoRA."""
    if not is_peft(model):
        return None
    return copy.deepcopy(model.peft_config[model.active_adapter])  # type: ignore[index]


def causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a DDP and/or peft wrapper."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft(model) else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (torch checkpoint, non-reentrant), LoRA too.

    Only in train mode (Hugging Face layers check ``self.training``), so no-grad passes are unchanged.
    Non-reentrant checkpointing needs no ``requires_grad`` inputs; Hugging Face still hooks the input
    embeddings to require grad, which costs nothing here.
    """
    lm = causal_lm(model)
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers ≥ 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Context in which a LoRA model acts as its base model (the reference); a no-op otherwise.

    peft's ``disable_adapter`` also freezes the adapters; they stay trainable here, so that what is
    trainable does not change under a pass (FSDP2 fixes a unit's gradient dtypes from its trainable
    parameters at its first forward, which may be the reference pass). Disabled adapters take no part
    in the forward, so they get no gradient either way.
    """
    model = getattr(model, "module", model)
    if not is_peft(model):
        yield
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    with model.disable_adapter():
        for param in trainable:
            param.requires_grad_(True)
        yield


_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a hub id's revision (a branch, a tag or a hash; default ``main``) points to in the local
    Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``), without the network; None if not cached."""
    from huggingface_hub import constants

    revision = revision or "main"
    if _COMMIT.match(revision):
        return revision
    cache = Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE).expanduser()
    ref = cache / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.match(commit) else None


def model_fingerprint(spec: ModelSpec) -> str:
    """Content key of a model: config and weight-file bytes for a local folder; for a hub id, the commit
    its revision resolves to in the local cache (the id and revision name when it is not cached)."""
    h = hashlib.sha256()
    h.update(
        json.dumps({"path_kind": "local" if _is_local(spec.path) else "hub", "dtype": spec.dtype}).encode()
    )
    if not _is_local(spec.path):
        commit = hub_commit(spec.path, spec.revision)
        if commit is None:
            log.warning("%s@%s is not in the local hub cache; keying it by name", spec.path, spec.revision)
        h.update(f"{spec.path}@{commit or spec.revision or 'main'}".encode())
        return h.hexdigest()
    root = Path(spec.path).expanduser()
    files = [
        f for f in sorted(root.glob("*")) if f.suffix in {".json", ".safetensors", ".bin"} and f.is_file()
    ]
    for file, digest in zip(files, file_digests(files), strict=True):
        h.update(file.name.encode())
        h.update(digest.encode())
    return h.hexdigest()


def _byte_level_tokenizer() -> Any:
    """A byte-level tokenizer that needs no vocabulary files: 256 byte tokens plus specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )


def _tokenizer_from(path: str | Path | None) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if path is None:
        return _byte_level_tokenizer()
    path = Path(path)
    if path.is_file():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif (path / "tokenizer_config.json").exists():
        tok = AutoTokenizer.from_pretrained(str(path))
    elif (path / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    else:
        raise ModelLoadError(
            f"no tokenizer at {str(path)!r}: expected tokenizer.json or tokenizer_config.json"
        )
    if tok.eos_token is None:
        eos = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else None
        if eos is None:
            raise ModelLoadError(f"tokenizer at {str(path)!r} has no EOS token")
        tok.eos_token = eos
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    size: Literal["tiny", "small"] = "tiny",
    seed: int = 0,
    dims: dict[str, int] | None = None,
    max_positions: int = 2048,
    tie_embeddings: bool = True,
) -> Path:
    """Save a random-init Llama-architecture causal LM and its tokenizer as a Hugging Face folder.

    ``dims`` (hidden, MLP and layer sizes, heads) replaces the named ``size``; ``tie_embeddings``
    False gives the LM head its own weight, as in the larger Llamas.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer_from(tokenizer)
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    dims = dims or TINY_SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        head_dim=dims["hidden_size"] // dims["num_attention_heads"],
        **dims,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("saved %s model (%d parameters) to %s", size, n_params, out)
    return out
