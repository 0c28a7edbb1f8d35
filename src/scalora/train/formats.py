"""Record formats: how one JSONL line, CSV row or ``datasets`` row of training data is read.

A file (or data set) holds one format, recognised by its fields, tried in this order:

- ``chat``: ``messages``, a list of ``{"role", "content"}`` (a JSON string in CSV), rendered with the tokenizer's
  chat template, loss on the assistant turns only;
- ``classification``: ``text`` + ``label``;
- ``completion``: ``prompt`` + ``completion``, loss on the completion;
- ``alpaca``: ``instruction`` + ``output`` (+ optional ``input``), the Alpaca prompt template, loss on the output;
- ``text``: ``text`` alone, loss on every token (continued pre-training).

Each record becomes an example: a :class:`LabelledRow` (classification), ``{"prompt", "completion"}`` (completion,
alpaca, and text with an empty prompt) or ``{"messages", "where"}`` (chat).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from scalora.errors import DataError

__all__ = ["FORMATS", "ROLES", "LabelledRow", "RecordFormat", "expected", "match", "parse_records"]

Record = Mapping[str, Any]
ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
    "### Response:\n"
)


@dataclass
class LabelledRow:
    """A classification row before its label is turned into an id; remembers where it came from."""

    where: str  # "file.jsonl line 7"
    text: str
    label: Any
    text_pair: str | None = None


def _string(record: Record, field: str, where: str, *, empty_ok: bool = False) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _classification(record: Record, where: str) -> LabelledRow:
    text = _string(record, "text", where)
    label = record["label"]
    if isinstance(label, str):
        label = label.strip()
    if not isinstance(label, str | int) or label == "":
        raise DataError(f"{where}: field 'label' must be an integer or a non-empty string, got {label!r}")
    return LabelledRow(where, text, label)


def _completion(record: Record, where: str) -> dict[str, str]:
    prompt = _string(record, "prompt", where, empty_ok=True)
    return {"prompt": prompt, "completion": _string(record, "completion", where)}


def _alpaca(record: Record, where: str) -> dict[str, str]:
    instruction = _string(record, "instruction", where)
    extra = record.get("input")
    extra = "" if extra is None else _string(record, "input", where, empty_ok=True)
    template = ALPACA_PROMPT_INPUT if extra.strip() else ALPACA_PROMPT
    prompt = template.format(instruction=instruction, input=extra)
    return {"prompt": prompt, "completion": _string(record, "output", where)}


def _text(record: Record, where: str) -> dict[str, str]:
    return {"prompt": "", "completion": _string(record, "text", where)}


def _chat(record: Record, where: str) -> dict[str, Any]:
    messages = record["messages"]
    if isinstance(messages, str):  # CSV: a JSON string
        try:
            messages = json.loads(messages)
        except (json.JSONDecodeError, RecursionError) as e:
            raise DataError(f"{where}: field 'messages' is a string but not a JSON list of messages ({e})") from None
    if not isinstance(messages, list):
        raise DataError(f"{where}: field 'messages' must be a list of {{\"role\", \"content\"}} objects, got "
                        f"{type(messages).__name__}")
    if not messages:
        raise DataError(f"{where}: field 'messages' is empty; give at least one user and one assistant turn")
    out = []
    for i, message in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            raise DataError(f"{at} must be an object with 'role' and 'content', got {message!r:.60}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataError(f"{at} has the unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'content' must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn; the loss is on the assistant's replies, so every conversation "
                        f"needs at least one message with role 'assistant'")
    return {"messages": out, "where": where}


@dataclass(frozen=True)
class RecordFormat:
    """One record format: its name, required fields, model kind and parser."""

    name: Literal["chat", "classification", "completion", "alpaca", "text"]
    required: tuple[str, ...]
    kind: Literal["classification", "causal_lm"]
    parse: Callable[[Record, str], Any]

    @property
    def fields_text(self) -> str:
        return " and ".join(repr(f) for f in self.required)


FORMATS: dict[str, RecordFormat] = {
    f.name: f
    for f in (
        RecordFormat("chat", ("messages",), "causal_lm", _chat),
        RecordFormat("classification", ("text", "label"), "classification", _classification),
        RecordFormat("completion", ("prompt", "completion"), "causal_lm", _completion),
        RecordFormat("alpaca", ("instruction", "output"), "causal_lm", _alpaca),
        RecordFormat("text", ("text",), "causal_lm", _text),
    )
}


def expected() -> str:
    """The formats, for error messages."""
    return ", ".join(f"{f.fields_text} ({f.name})" for f in FORMATS.values())


def match(keys: Collection[str]) -> RecordFormat | None:
    """The first format whose required fields are all in ``keys``."""
    return next((f for f in FORMATS.values() if all(k in keys for k in f.required)), None)


def parse_records(records: Iterable[tuple[str, Record]]) -> tuple[RecordFormat | None, list[Any]]:
    """Detect the format from the first ``(where, record)`` pair and parse every record in it; a record of another
    format, or one missing a field, is a :class:`DataError` naming where it is. ``(None, [])`` when empty."""
    fmt: RecordFormat | None = None
    first = ""
    rows = []
    for where, record in records:
        if fmt is None:
            fmt, first = match(record), where
            if fmt is None:
                found = ", ".join(repr(k) for k in record) or "none"
                raise DataError(f"{where}: expected fields {expected()}; found {found}")
        own = match(record)
        if own is not fmt:
            missing = next((f for f in fmt.required if f not in record), None)
            rule = f"the data is {fmt.name} records (from {first}: every record needs {fmt.fields_text})"
            looks = "" if own is None else f"this record looks like {own.name} data"
            if missing is None:
                raise DataError(f"{where}: {looks}, but {rule}; use one format per file")
            raise DataError(f"{where}: missing field {missing!r}; {rule}" + (f"; {looks}: use one format per file"
                                                                               if looks else ""))
        rows.append(fmt.parse(record, where))
    return fmt, rows
