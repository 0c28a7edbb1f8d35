"""Collators: examples → the batches ``model(**batch)`` takes (plain classes, not closures, so that DataLoader
workers can pickle them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from scalora.train import chat
from scalora.train.chat import IGNORE_INDEX
from scalora.train.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Batch", "CausalLMCollator", "ChatCollator", "ClassificationCollator", "encode_pair"]

Batch = dict[str, torch.Tensor]


class ClassificationCollator:
    """Examples ``{"text", "label"[, "text_pair"]}`` → ``input_ids``, ``attention_mask``, ``labels``
    (right-padded, truncated to ``max_length``; ``token_type_ids`` only for sentence pairs)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> Batch:
        texts = [ex["text"] for ex in examples]
        pairs = [ex["text_pair"] for ex in examples] if all("text_pair" in ex for ex in examples) else None
        enc = self.tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if pairs is not None and "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return batch


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def eos_token(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("causal LM tasks need a tokenizer with an EOS token")
    return int(tokenizer.eos_token_id)


def pad_token(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has no pad token and no EOS token")
    return int(pad)


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str, max_length: int, *, eos: bool
) -> tuple[list[int], int]:
    """Token ids of prompt + completion (+ EOS) and the number of prompt tokens.

    The prompt gets the tokenizer's special tokens (a BOS, for models that use one); the completion none. When
    too long, the completion keeps its start and the prompt keeps its end (the part nearest the answer).
    """
    p = encode_text(tokenizer, prompt, True)
    c = encode_text(tokenizer, completion, False)
    if eos:
        c.append(eos_token(tokenizer))
    c = c[:max_length]
    room = max_length - len(c)
    p = p[len(p) - room :] if room > 0 else []
    return p + c, len(p)


class CausalLMCollator:
    """Examples ``{"prompt", "completion"}`` → ``input_ids``, ``attention_mask``, ``labels``.

    Sequences are prompt + completion + EOS, right-padded. ``labels`` is -100 over the prompt and the padding, so
    the loss covers only the completion and its EOS. Padding is masked by position, never by token id, so an EOS
    used as the pad token is still learned at the end of each completion.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> Batch:
        rows = []
        for ex in examples:
            ids, n_prompt = encode_pair(self.tokenizer, ex["prompt"], ex["completion"], self.max_length, eos=True)
            rows.append((ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:]))
        return _right_padded(rows, pad_token(self.tokenizer))


class ChatCollator:
    """Chat examples ``{"messages", "where"}`` → ``input_ids``, ``attention_mask``, ``labels``, rendered with the
    tokenizer's chat template (:func:`chat.encode_chat`): labels on the assistant turns only, right-padded."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> Batch:
        rows = [chat.encode_chat(self.tokenizer, ex, self.max_length) for ex in examples]
        return _right_padded(rows, pad_token(self.tokenizer))


def _right_padded(rows: list[tuple[list[int], list[int]]], pad: int) -> Batch:
    """A batch of ``(ids, labels)`` rows, right-padded; padding is masked by position, never by token id, so an
    EOS used as the pad token is still learned where it is a label."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        labels[row, : len(ids)] = torch.tensor(labs, dtype=torch.long)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
