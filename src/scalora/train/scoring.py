"""Scoring a model: choice log-likelihoods, held-out losses, greedy generation and the numbers in its answers."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import torch

from scalora.train.chat import IGNORE_INDEX
from scalora.train.collators import Batch, CausalLMCollator, encode_pair, encode_text, eos_token, pad_token

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["choice_loglikelihoods", "completion_loss", "extract_number", "generate", "labelled_loss",
           "normalize_number"]


def model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def choice_loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    max_length: int,
    batch_size: int,
) -> list[float]:
    """Sum of the log-probabilities of each continuation's tokens given its context, for ``(context,
    continuation)`` pairs; batched, longest first, right-padded."""
    encoded = [encode_pair(tokenizer, ctx, cont, max_length, eos=False) for ctx, cont in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores = [0.0] * len(encoded)
    pad = pad_token(tokenizer)
    device = model_device(model)
    with evaluating(model):
        for chunk in chunks(order, batch_size):
            width = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            target = torch.zeros((len(chunk), width), dtype=torch.bool)
            for row, i in enumerate(chunk):
                seq, n_prompt = encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                attention[row, : len(seq)] = 1
                target[row, max(n_prompt, 1) : len(seq)] = True  # the first token has no prediction
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
            token_lp = logprobs.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
            sums = (token_lp * target[:, 1:].to(device)).sum(-1)
            for row, i in enumerate(chunk):
                scores[i] = float(sums[row])
    return scores


def completion_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict[str, Any]],
    max_length: int,
    batch_size: int,
) -> float:
    """Held-out language-model loss: −(1/N) Σ log p(token | prefix) over the N completion (+ EOS) tokens of
    ``examples``, batched with :class:`CausalLMCollator`, i.e. the training loss, but token-weighted over the set."""
    return labelled_loss(model, CausalLMCollator(tokenizer, max_length), examples, batch_size)


def labelled_loss(
    model: PreTrainedModel,
    collate: Callable[[list[dict[str, Any]]], Batch],
    examples: Sequence[dict[str, Any]],
    batch_size: int,
) -> float:
    """−(1/N) Σ log p(token | prefix) over the N labelled tokens of ``examples`` batched with ``collate``."""
    device = model_device(model)
    total, count = 0.0, 0
    with evaluating(model):
        for chunk in chunks(examples, batch_size):
            batch = {k: v.to(device) for k, v in collate(list(chunk)).items()}
            labels = batch.pop("labels")[:, 1:]
            logits = model(**batch).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="sum"))
            count += int((labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_length: int,
    batch_size: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded without special tokens), batched with left padding.

    Prompts longer than ``max_length`` tokens keep their last ``max_length`` tokens.
    """
    encoded = [encode_text(tokenizer, p, True)[-max_length:] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(encoded)
    pad, eos = pad_token(tokenizer), eos_token(tokenizer)
    device = model_device(model)
    with evaluating(model):
        for chunk in chunks(order, batch_size):
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = encoded[i]
                ids[row, width - len(seq) :] = torch.tensor(seq)
                attention[row, width - len(seq) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                if eos in new:
                    new = new[: new.index(eos)]
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
    return outputs


_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\.\d+"


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` → ``"1234.5"``, ``"16.0"`` → ``"16"``; None when ``text`` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


def extract_number(text: str) -> str | None:
    """The final answer of a worked solution: the number after the first ``####`` if there is one, else the
    last number in the text; normalised with :func:`normalize_number`."""
    marker = re.search(r"####\s*(" + _NUMBER + ")", text)
    if marker:
        return normalize_number(marker.group(1))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None
