"""Loading models and tokenizers: offline aliases, local folders, hub names, and tiny random models for tests."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from safetensors import SafetensorError

from scalora.errors import ScaloraError
from scalora.train import asset_fetch, assets

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

__all__ = [
    "ALIASES",
    "ModelKind",
    "ModelLoadError",
    "char_tokenizer",
    "ensure_pad_token",
    "load_model",
    "tiny_model",
    "tiny_network",
]

ModelKind = Literal["classification", "causal_lm"]
KINDS: tuple[str, ...] = ("classification", "causal_lm")


class ModelLoadError(ScaloraError):
    """A model or tokenizer could not be loaded."""


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a model that ships in an offline asset."""

    asset: str
    kind: ModelKind
    description: str


ALIASES: dict[str, ModelAlias] = {
    "minilm": ModelAlias("minilm", "classification", "all-MiniLM-L6-v2 encoder, 22.7 M parameters"),
    "smollm2-135m": ModelAlias("smollm2-135m", "causal_lm", "SmolLM2-135M-Instruct (Llama), 134.5 M parameters"),
}

SMOLLM2_EOS = "<|im_end|>"
_CONVERTED = "hf-fp32"  # folder in the smollm2-135m asset's cache folder: the de-quantised model and tokenizer


def _aliases_text() -> str:
    return ", ".join(f"{k} ({v.kind}: {v.description})" for k, v in ALIASES.items())


def _auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind == "classification":
        return AutoModelForSequenceClassification
    if kind == "causal_lm":
        return AutoModelForCausalLM
    raise ModelLoadError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")


def ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token (falling back to EOS) and tell the model and its generation config."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id


def _looks_like_path(name: str) -> bool:
    """True for names that cannot be hub ids ("org/name" or "name"), so a missing folder is reported as such."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith((".gguf", ".safetensors", ".json"))
    )


def _from_pretrained(
    source: str | Path, kind: str, num_labels: int | None, dtype: torch.dtype, **kwargs: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoTokenizer

    model_kwargs = dict(kwargs)
    if kind == "classification" and num_labels is not None:
        # A folder whose head has another number of labels gets a new head of the task's size.
        model_kwargs["num_labels"] = num_labels
        model_kwargs["ignore_mismatched_sizes"] = True
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = _auto_class(kind).from_pretrained(source, dtype=dtype, **model_kwargs)
    return model, tokenizer


def _smollm2_folder() -> Path:
    """A plain safetensors copy of SmolLM2, de-quantised from the GGUF asset (fetched on first use) once
    (atomically) and reused."""
    converted = assets.folder("smollm2-135m") / _CONVERTED
    if (converted / "config.json").is_file():
        return converted
    gguf = asset_fetch.ensure("smollm2-135m")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = SMOLLM2_EOS
    tokenizer.pad_token = SMOLLM2_EOS
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    ensure_pad_token(model, tokenizer)
    converted.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CONVERTED}-", dir=converted.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, converted)
        except OSError:  # another process finished first: keep its copy
            if not (converted / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return converted


def load_model(
    name_or_path: str | os.PathLike[str],
    kind: ModelKind,
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` from an alias (``minilm``, ``smollm2-135m``: its asset is fetched on first
    use), a local folder or GGUF file, or a hub name.

    ``kind`` picks the head: ``"classification"`` (sequence classification with ``num_labels`` outputs) or
    ``"causal_lm"``. The tokenizer always has a pad token (EOS when it had none).
    """
    if kind not in KINDS:
        raise ModelLoadError(f"unknown model kind {kind!r}; use one of {', '.join(KINDS)}")
    name = os.fspath(name_or_path)
    alias = ALIASES.get(name)
    if alias is not None:
        if alias.kind == "classification" and kind == "causal_lm":
            raise ModelLoadError(f"{name} is an encoder with no language-model head; use kind='classification'")
        if alias.asset == "smollm2-135m":
            model, tokenizer = _from_pretrained(_smollm2_folder(), kind, num_labels, dtype)
            tokenizer.eos_token = SMOLLM2_EOS
        else:
            model, tokenizer = _from_pretrained(asset_fetch.ensure(alias.asset), kind, num_labels, dtype)
        ensure_pad_token(model, tokenizer)
        return model, tokenizer

    local = Path(name).expanduser()
    if local.is_file() and local.suffix == ".gguf":
        try:
            model, tokenizer = _from_pretrained(local.parent, kind, num_labels, dtype, gguf_file=local.name)
        except (OSError, ValueError, ImportError) as e:
            raise ModelLoadError(f"could not load the GGUF file {local}: {e}") from e
    elif local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} has no config.json, so it is not a transformers model folder")
        try:
            model, tokenizer = _from_pretrained(local, kind, num_labels, dtype)
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or corrupt weights file
            raise ModelLoadError(f"could not load the model folder {local}: {e}") from e
    elif _looks_like_path(name):
        raise ModelLoadError(
            f"no model folder or file at {name!r}; pass a transformers model folder, a .gguf file, a hub name "
            f"(org/name), or an alias: {_aliases_text()}"
        )
    else:
        try:
            model, tokenizer = _from_pretrained(name, kind, num_labels, dtype)
        except OSError as e:
            raise ModelLoadError(
                f"could not load {name!r} from the Hugging Face hub or its local cache ({str(e).splitlines()[0]}). "
                "Without internet, download it once elsewhere and pass its folder, set HF_HUB_OFFLINE=1 to use "
                f"only the hub cache, or use an offline alias: {_aliases_text()}"
            ) from e
    ensure_pad_token(model, tokenizer)
    return model, tokenizer


# ---------------------------------------------------------------------------------------------------------
# Tiny random models for tests: no download, built in well under a second.

_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"
TinyArch = Literal["bert", "llama", "gpt2"]


def char_tokenizer(chars: str = _CHARS) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over printable ASCII, built in code (no files, no download).

    Special tokens: ``[PAD]`` (0), ``[UNK]``, ``[BOS]``, ``[EOS]``. Nothing is added automatically, so a
    tokenised string is exactly its characters.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_input_names=["input_ids", "attention_mask"],
    )


#: position-embedding sizes of the tiny models `tiny_model` builds
_TINY_POSITIONS = {"bert": 512, "llama": 1024, "gpt2": 1024}


def tiny_network(
    arch: TinyArch,
    vocab_size: int,
    *,
    num_labels: int = 2,
    hidden: int = 32,
    layers: int = 2,
    positions: int | None = None,
    seed: int = 0,
    **token_ids: int | None,
) -> PreTrainedModel:
    """A small randomly initialised model (in eval mode) without a tokenizer: 4 heads, MLPs twice as wide as
    `hidden` (GPT-2: its default four times), `positions` position embeddings (per architecture by default).

    ``bert`` gives a ``BertForSequenceClassification`` with ``num_labels``; ``llama`` a ``LlamaForCausalLM``;
    ``gpt2`` a ``GPT2LMHeadModel`` (whose layers are ``Conv1D``). `token_ids` (``pad_token_id``,
    ``bos_token_id``, ``eos_token_id``) go to the model's config.
    """
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if arch not in _TINY_POSITIONS:
        raise ValueError(f"unknown tiny architecture {arch!r}; use bert, llama or gpt2")
    positions = positions if positions is not None else _TINY_POSITIONS[arch]
    heads = 4
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "bert":
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * hidden, max_position_embeddings=positions, num_labels=num_labels, **token_ids))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads // 2, intermediate_size=2 * hidden, max_position_embeddings=positions,
            **token_ids))
    else:
        model = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions, **token_ids))
    return model.eval()


def tiny_model(
    arch: TinyArch,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    num_labels: int = 2,
    hidden: int = 32,
    layers: int = 2,
    seed: int = 0,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`tiny_network` sized to a tokenizer (``char_tokenizer()`` by default), and the tokenizer."""
    tokenizer = tokenizer if tokenizer is not None else char_tokenizer()
    ids = {"pad_token_id": tokenizer.pad_token_id}
    if arch != "bert":
        ids.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = tiny_network(arch, len(tokenizer), num_labels=num_labels, hidden=hidden, layers=layers, seed=seed,
                         **ids)
    ensure_pad_token(model, tokenizer)
    return model, tokenizer
