"""Reading examples: user files (JSONL/CSV), the offline data sets, and ``datasets`` names.

Every reader returns plain lists of dicts with a fixed shape:

- classification: ``{"text": str, "label": int}`` (plus ``"text_pair": str`` for sentence-pair data);
- causal LM: ``{"prompt": str, "completion": str}``; multiple-choice examples add ``"choices"`` and ``"label"``,
  maths examples add ``"answer"``; chat examples are ``{"messages": [...], "where": str}``.

User files may hold any record format of :mod:`scalora.train.formats`.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from scalora.errors import DataError
from scalora.train import formats
from scalora.train.formats import LabelledRow

__all__ = [
    "DataError",
    "FileData",
    "LabelledRow",
    "encode_labels",
    "gsm_examples",
    "read_file",
    "sarcasm_examples",
    "socialiqa_examples",
    "split_examples",
]

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
MAX_CLASSES = 10_000  # integer labels are class ids: a larger one is a typo (and would build that many outputs)
T = TypeVar("T")


@dataclass
class FileData:
    """The validated rows of one data file."""

    path: Path
    format: formats.RecordFormat
    rows: list[Any]  # parsed by the format: LabelledRow, {"prompt", "completion"} or {"messages", "where"}


def _records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs of a JSON Lines or CSV/TSV file."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl or .json (JSON Lines), .csv or .tsv")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if suffix in (".jsonl", ".json"):
        yield from _json_lines(path, text)
    else:
        yield from _csv_rows(path, text, "\t" if suffix == ".tsv" else ",")


def _json_lines(path: Path, text: str) -> Iterable[tuple[int, dict[str, Any]]]:
    if text.lstrip().startswith("["):
        raise DataError(
            f"{path}: found a JSON array; expected JSON Lines, one object per line, with {formats.expected()}"
        )
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may sit in a string
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        except RecursionError:
            raise DataError(f"{path} line {lineno}: the JSON value is nested too deeply to read; flatten the "
                            f"record to plain fields") from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {lineno}: expected a JSON object with {formats.expected()}, got {type(record).__name__}"
            )
        yield lineno, record


def _csv_rows(path: Path, text: str, delimiter: str) -> Iterable[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
        if header and formats.match(header) is None:
            found = ", ".join(repr(h) for h in header)
            raise DataError(f"{path} line 1: the header has columns {found}; expected columns {formats.expected()}")
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path} line {reader.line_num}: more values than the {len(reader.fieldnames or [])} "
                    "header columns (quote fields that contain the delimiter)"
                )
            yield reader.line_num, {k: v for k, v in row.items() if v is not None}
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e})") from e


def read_file(path: str | Path) -> FileData:
    """Read and validate a JSONL or CSV file in one of the record formats of :mod:`scalora.train.formats`."""
    path = Path(path)
    fmt, rows = formats.parse_records((f"{path} line {lineno}", record) for lineno, record in _records(path))
    if fmt is None:
        raise DataError(f"{path}: the file is empty; expected rows with {formats.expected()}")
    return FileData(path, fmt, rows)


_INT = re.compile(r"[+-]?\d+")


def encode_labels(rows: Sequence[LabelledRow]) -> tuple[list[int], list[str]]:
    """Turn raw labels into ids; return ``(ids, label_names)``.

    If every label is an integer (or a string of one, as CSV gives), the integers are the ids and the names are
    ``"0" .. str(max)``. Otherwise labels are names, and ids follow their sorted order (booleans read as
    ``"false"``/``"true"``), so train and eval files agree.
    """
    if not rows:
        return [], []
    if all(not isinstance(r.label, bool) and (isinstance(r.label, int) or _INT.fullmatch(r.label)) for r in rows):
        ids = [int(r.label) for r in rows]
        for r, i in zip(rows, ids, strict=True):
            if not 0 <= i < MAX_CLASSES:
                raise DataError(f"{r.where}: label {r.label!r} is not a class id: integer labels must be 0, 1, 2, "
                                f"... below {MAX_CLASSES} (one model output each); give other values as names "
                                f"(strings)")
        return ids, [str(i) for i in range(max(ids) + 1)]
    names = sorted({_label_name(r.label) for r in rows})
    index = {n: i for i, n in enumerate(names)}
    return [index[_label_name(r.label)] for r in rows], names


def _label_name(label: Any) -> str:
    if isinstance(label, bool):
        return "true" if label else "false"
    return str(label)


def split_examples(
    examples: Sequence[T],
    *,
    train_size: int | None,
    eval_size: int,
    seed: int,
    source: str,
) -> tuple[list[T], list[T]]:
    """A seeded shuffle: the first ``eval_size`` examples are for evaluation, the next ``train_size`` (all the
    rest when None) for training. The eval set does not depend on ``train_size``."""
    if eval_size < 0 or (train_size is not None and train_size < 0):
        raise DataError(f"{source}: sizes must not be negative")
    wanted = eval_size + (train_size or 0)
    if wanted > len(examples) or (train_size is None and eval_size >= len(examples)):
        raise DataError(
            f"{source} has {len(examples)} examples; cannot take {eval_size} for evaluation and "
            f"{'the rest' if train_size is None else train_size} for training"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eval_idx = order[:eval_size]
    rest = order[eval_size:]
    train_idx = rest if train_size is None else rest[:train_size]
    return [examples[i] for i in train_idx], [examples[i] for i in eval_idx]


def hold_out(examples: Sequence[T], eval_size: int | None, seed: int, source: str) -> tuple[list[T], list[T]]:
    """Split off an eval set from examples that came without one: ``eval_size`` of them, or by default a tenth
    (at least 1, at most 1000)."""
    n_eval = eval_size if eval_size is not None else max(1, min(1000, len(examples) // 10))
    return split_examples(examples, train_size=None, eval_size=n_eval, seed=seed, source=source)


def subsample(examples: Sequence[T], size: int | None, seed: int) -> list[T]:
    """``size`` examples picked with a seeded shuffle (all of them, in order, when ``size`` is None)."""
    if size is None or size >= len(examples):
        return list(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[i] for i in order[:size]]


# ---------------------------------------------------------------------------------------------------------
# The offline data sets.


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: missing; run `scalora assets fetch evals --force` to restore it")
    return list(_json_lines(path, path.read_text(encoding="utf-8")))


def _stamp(path: Path) -> tuple[str, int]:
    """Cache key of a data file: its path and modification time (0 when missing, so the reader reports it)."""
    return str(path), path.stat().st_mtime_ns if path.is_file() else 0


@functools.lru_cache(maxsize=4)
def _sarcasm_rows(path_str: str, mtime_ns: int) -> tuple[tuple[str, int], ...]:
    path = Path(path_str)
    seen: set[str] = set()
    out = []
    for lineno, record in _jsonl(path):
        try:
            text = record["input"][-1]["content"].strip()
            label = int(record["ideal"])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DataError(f"{path} line {lineno}: unexpected record ({e!r})") from e
        if text not in seen:
            seen.add(text)
            out.append((text, label))
    return tuple(out)


def sarcasm_examples(root: Path) -> list[dict[str, Any]]:
    """Sarcastic (1) or not (0) news headlines from the evals registry folder ``root``; duplicates dropped."""
    rows = _sarcasm_rows(*_stamp(root / "sarcasm" / "samples.jsonl"))
    return [{"text": text, "label": label} for text, label in rows]


_SIQA = re.compile(r"^(?P<question>.*?)\s+A: (?P<a>.*); B: (?P<b>.*); C: (?P<c>.*)$", re.S)


def qa_prompt(question: str) -> str:
    """The prompt used by the question-answering tasks; completions start with a space."""
    return f"Question: {question.strip()}\nAnswer:"


@functools.lru_cache(maxsize=4)
def _socialiqa_rows(path_str: str, mtime_ns: int) -> tuple[tuple[str, tuple[str, ...], int], ...]:
    path = Path(path_str)
    out = []
    for lineno, record in _jsonl(path):
        try:
            text = record["input"][-1]["content"].strip()
            label = "ABC".index(record["ideal"])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise DataError(f"{path} line {lineno}: unexpected record ({e!r})") from e
        m = _SIQA.match(text)
        if m is None:
            raise DataError(f"{path} line {lineno}: cannot find the options 'A: ...; B: ...; C: ...'")
        choices = (m["a"].strip(), m["b"].strip(), m["c"].strip().removesuffix(".").strip())
        out.append((qa_prompt(m["question"]), choices, label))
    return tuple(out)


def socialiqa_examples(root: Path) -> list[dict[str, Any]]:
    """Social IQa questions with three choices each, from the evals registry folder ``root``."""
    rows = _socialiqa_rows(*_stamp(root / "theory_of_mind" / "socialiqa" / "test.jsonl"))
    return [
        {
            "prompt": prompt,
            "completion": " " + choices[label],
            "choices": [" " + c for c in choices],
            "label": label,
        }
        for prompt, choices, label in rows
    ]


_FINAL = re.compile(r"\n?####[^\n]*\s*$")


def gsm_examples(size: int, seed: int) -> list[dict[str, Any]]:
    """GSM8K-style problems generated by reasoning-gym; the completion is the worked solution ending with
    ``#### <answer>``."""
    try:
        import reasoning_gym
    except ImportError:  # first use: install the pinned, verified wheel
        from scalora.train import asset_fetch

        asset_fetch.ensure("reasoning-gym")
        import reasoning_gym
    out = []
    for item in reasoning_gym.create_dataset("gsm_symbolic", size=size, seed=seed):
        answer = str(item["answer"]).strip()
        cot = str(item["metadata"].get("answer_cot") or "").strip()
        steps = _FINAL.sub("", cot).rstrip()
        solution = f"{steps}\n#### {answer}" if steps else f"#### {answer}"
        out.append({"prompt": qa_prompt(item["question"]), "completion": " " + solution, "answer": answer})
    return out
