"""Chat examples through the tokenizer's chat template, with the loss on the assistant turns only.

The conversation is rendered with ``tokenizer.apply_chat_template`` turn by turn: the text before each assistant
turn (with the generation prompt) and the turn itself (with its end-of-turn marker) become separate segments, so
the labels cover exactly the assistant's replies and what ends them. Segments are tokenised without added special
tokens (the template writes its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scalora.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IGNORE_INDEX", "check_chat_template", "encode_chat"]

IGNORE_INDEX = -100  # the label that the loss skips


def check_chat_template(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Raise a :class:`DataError` naming ``where`` when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat records (messages) need a tokenizer with a chat template, and this model's "
                        f"has none; use an instruct/chat model (e.g. --model smollm2-135m), or give the data as "
                        f"prompt+completion records")


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str, *,
            generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))
    except TemplateError as e:
        raise DataError(f"{where}: the tokenizer's chat template refused this conversation ({e})") from None


def _segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation as ``(text, is_assistant)`` pieces."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], where, generation_prompt=True)
        upto = _render(tokenizer, messages[: i + 1], where, generation_prompt=False)
        if not (before.startswith(done) and upto.startswith(before)):
            raise DataError(f"{where}: the tokenizer's chat template does not render this conversation turn by turn "
                            f"(an earlier turn changes when later ones are added), so the assistant turns cannot be "
                            f"located; use a template that appends turns, or give prompt+completion records")
        out += [(before[len(done):], False), (upto[len(before):], True)]
        done = upto
    full = _render(tokenizer, messages, where, generation_prompt=False)
    return [*out, (full[len(done):], False)]


def encode_chat(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any], max_length: int
                ) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 outside the assistant turns) of a chat example, cut to ``max_length`` tokens."""
    ids: list[int] = []
    labels: list[int] = []
    for text, assistant in _segments(tokenizer, example["messages"], example["where"]):
        piece = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids += piece
        labels += piece if assistant else [IGNORE_INDEX] * len(piece)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise DataError(f"{example['where']}: no assistant token within the first {max_length} tokens, so the "
                        f"example teaches nothing; raise --max-length or shorten the turns before the reply")
    return ids, labels
