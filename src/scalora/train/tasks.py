"""Loading tasks: built-in tasks, data files and ``hf:`` data sets; the task classes live in `task_types`, their
batching in `collators`, their scoring in `scoring`.

``load_task`` gives one of

- :class:`ClassificationTask` (``sarcasm``, text+label files, ``hf:`` data sets): sequence classification,
  metric ``accuracy``;
- :class:`MultipleChoiceTask` (``socialiqa``): a causal LM trained on prompt + correct answer and scored by the
  summed log-likelihood of each choice, metric ``accuracy``;
- :class:`GenerationTask` (prompt+completion and Alpaca records) and :class:`MathTask` (``gsm``): a causal LM
  trained on prompt + completion and scored by greedy generation, metric ``exact_match``;
- :class:`LanguageModelTask` (plain text records) and :class:`ChatTask` (chat messages): a causal LM scored by
  its held-out loss on the labelled tokens, metric ``loss`` (lower is better).

Batches from :meth:`Task.collate` go straight into ``model(**batch)``, which returns ``.loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scalora.train import data, formats
from scalora.train.collators import CausalLMCollator, ChatCollator, ClassificationCollator
from scalora.train.data import DataError
from scalora.train.scoring import choice_loglikelihoods, completion_loss, extract_number, generate, normalize_number
from scalora.train.task_types import (
    ChatTask,
    ClassificationTask,
    GenerationTask,
    LanguageModelTask,
    MathTask,
    MultipleChoiceTask,
    Task,
    TaskKind,
)

__all__ = [
    "BUILTIN_TASKS",
    "CausalLMCollator",
    "ChatCollator",
    "ChatTask",
    "ClassificationCollator",
    "ClassificationTask",
    "DataError",
    "GenerationTask",
    "LanguageModelTask",
    "MathTask",
    "MultipleChoiceTask",
    "Task",
    "TaskKind",
    "choice_loglikelihoods",
    "completion_loss",
    "extract_number",
    "generate",
    "load_task",
    "normalize_number",
    "task_from_datasets",
]


@dataclass(frozen=True)
class BuiltinTask:
    """A task that needs no files: its loader, default sizes and the offline asset it reads (`assets.ASSETS`)."""

    description: str
    train_size: int | None  # None: every example not used for evaluation
    eval_size: int
    loader: Callable[..., Task] = field(repr=False)
    asset: str | None = None


def _evals_root() -> Path:
    from scalora.train import asset_fetch

    return asset_fetch.ensure("evals")


def _load_sarcasm(train_size: int | None, eval_size: int, seed: int, **_: Any) -> Task:
    examples = data.sarcasm_examples(_evals_root())
    train, ev = data.split_examples(examples, train_size=train_size, eval_size=eval_size, seed=seed, source="sarcasm")
    return ClassificationTask(
        name="sarcasm",
        train=train,
        eval=ev,
        num_labels=2,
        label_names=["not sarcastic", "sarcastic"],
        description=BUILTIN_TASKS["sarcasm"].description,
    )


def _load_socialiqa(train_size: int | None, eval_size: int, seed: int, **_: Any) -> Task:
    examples = data.socialiqa_examples(_evals_root())
    train, ev = data.split_examples(examples, train_size=train_size, eval_size=eval_size, seed=seed, source="socialiqa")
    return MultipleChoiceTask(
        name="socialiqa", train=train, eval=ev, description=BUILTIN_TASKS["socialiqa"].description
    )


def _load_gsm(train_size: int | None, eval_size: int, seed: int, max_new_tokens: int | None = None, **_: Any) -> Task:
    n_train = 0 if train_size is None else train_size
    examples = data.gsm_examples(n_train + eval_size, seed)
    train, ev = data.split_examples(examples, train_size=n_train, eval_size=eval_size, seed=seed, source="gsm")
    task = MathTask(name="gsm", train=train, eval=ev, description=BUILTIN_TASKS["gsm"].description)
    if max_new_tokens is not None:
        task.max_new_tokens = max_new_tokens
    return task


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "sarcasm": BuiltinTask("sarcastic news headlines, binary classification (28 498 unique headlines, evals asset)",
                           2000, 500, _load_sarcasm, "evals"),
    "socialiqa": BuiltinTask("Social IQa, 3-way multiple choice scored by log-likelihood (2 224 questions, "
                             "evals asset)", None, 500, _load_socialiqa, "evals"),
    "gsm": BuiltinTask("GSM8K-style maths word problems from reasoning-gym, greedy generation, exact match of the "
                       "final number", 1000, 100, _load_gsm, "reasoning-gym"),
}


def _known() -> str:
    return (
        f"known tasks: {', '.join(BUILTIN_TASKS)}; or give --train-file/--eval-file (JSONL or CSV with "
        f"{formats.expected()}); or hf:DATASET[:CONFIG] with the `datasets` package"
    )


def _classification_from_rows(
    name: str,
    train_rows: list[data.LabelledRow],
    eval_rows: list[data.LabelledRow],
    label_names: list[str] | None = None,
    *,
    eval_separate: bool = False,
) -> ClassificationTask:
    """Labels become ids (see :func:`data.encode_labels`), unless ``label_names`` says they already are. With
    ``eval_separate`` (eval rows from their own file), an eval label the training rows lack is an error: it would
    add a class the model never learns."""
    if label_names is None:
        ids, names = data.encode_labels(train_rows + eval_rows)
    else:
        ids, names = [int(r.label) for r in train_rows + eval_rows], list(label_names)
    trained = set(ids[: len(train_rows)])
    unseen = next((row for row, i in zip(eval_rows, ids[len(train_rows) :], strict=True) if i not in trained), None)
    if eval_separate and train_rows and unseen is not None:
        raise DataError(
            f"{unseen.where}: label {unseen.label!r} does not occur in the training data, so the model would get a "
            f"class it never learns; fix the label, or add training rows with it"
        )
    examples = []
    for row, label in zip(train_rows + eval_rows, ids, strict=True):
        ex: dict[str, Any] = {"text": row.text, "label": label}
        if row.text_pair is not None:
            ex["text_pair"] = row.text_pair
        examples.append(ex)
    if len(names) < 2:
        raise DataError(f"{name}: classification needs at least two labels; found only {names}")
    return ClassificationTask(
        name=name,
        train=examples[: len(train_rows)],
        eval=examples[len(train_rows) :],
        num_labels=len(names),
        label_names=names,
    )


def _task_from_files(
    train_file: str | Path | None,
    eval_file: str | Path | None,
    train_size: int | None,
    eval_size: int | None,
    seed: int,
    max_new_tokens: int | None,
) -> Task:
    first = train_file if train_file is not None else eval_file
    if first is None:
        raise DataError("give a task name or --train-file (and optionally --eval-file); " + _known())
    train = data.read_file(train_file) if train_file is not None else None
    ev = data.read_file(eval_file) if eval_file is not None else None
    if train is not None and ev is not None and train.format is not ev.format:
        raise DataError(
            f"{train.path} holds {train.format.name} records but {ev.path} holds {ev.format.name} records; both "
            f"files must have the same format"
        )
    source = train if train is not None else ev
    assert source is not None
    name = Path(first).stem
    train_rows: list[Any] = train.rows if train is not None else []
    if ev is not None:
        eval_rows: list[Any] = data.subsample(ev.rows, eval_size, seed)
        info: dict[str, Any] = {"eval_split": "file", "eval_file": str(ev.path)}
    else:
        train_rows, eval_rows = data.hold_out(train_rows, eval_size, seed, str(train_file))
        info = _held_out(eval_rows, str(train_file), seed)
    info = {"format": source.format.name, "train_file": None if train is None else str(train.path), **info}
    train_rows = data.subsample(train_rows, train_size, seed)
    if source.format.kind == "classification":
        task = _classification_from_rows(name, train_rows, eval_rows, eval_separate=ev is not None)
        task.data = info
        return task
    return _causal_task(name, source.format, train_rows, eval_rows, info, max_new_tokens)


def _held_out(eval_rows: list[Any], source: str, seed: int) -> dict[str, Any]:
    """How an eval set held out of the training data was made, for the run's summary."""
    return {"eval_split": "held_out", "held_out": len(eval_rows), "held_out_from": source, "seed": seed}


def _causal_task(
    name: str,
    fmt: formats.RecordFormat,
    train_rows: list[Any],
    eval_rows: list[Any],
    info: dict[str, Any],
    max_new_tokens: int | None,
) -> Task:
    """The task of a causal LM record format: chat, plain text, or prompt+completion (and Alpaca)."""
    if fmt.name == "chat":
        return ChatTask(name=name, train=train_rows, eval=eval_rows, data=info)
    if fmt.name == "text":
        return LanguageModelTask(name=name, train=train_rows, eval=eval_rows, data=info)
    task = GenerationTask(name=name, train=train_rows, eval=eval_rows, data=info)
    if max_new_tokens is not None:
        task.max_new_tokens = max_new_tokens
    return task


_PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("question", "passage"),
)
_TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "comment", "tweet")
_LABEL_COLUMNS = ("label", "labels")
_EVAL_SPLITS = ("validation", "validation_matched", "valid", "dev", "test")


def _hf_rows(split: Any, where: str, label_col: str, text_cols: tuple[str, ...]) -> list[data.LabelledRow]:
    rows = []
    for i, rec in enumerate(split):
        label = rec[label_col]
        if isinstance(label, float):
            raise DataError(f"{where} row {i}: label {label!r} is a float; regression is not supported")
        if isinstance(label, int) and not isinstance(label, bool) and label < 0:
            continue  # unlabelled (GLUE test splits use -1)
        pair = rec[text_cols[1]] if len(text_cols) == 2 else None
        rows.append(data.LabelledRow(f"{where} row {i}", str(rec[text_cols[0]]), label, pair))
    return rows


def task_from_datasets(
    dataset: Any,
    name: str,
    *,
    train_size: int | None,
    eval_size: int | None,
    seed: int,
    max_new_tokens: int | None = None,
) -> Task:
    """A task from a ``datasets.DatasetDict`` with a ``train`` split: text+label columns (a label column makes it
    classification), or the columns of a causal LM record format (:mod:`scalora.train.formats`: messages,
    prompt+completion, instruction+output, text). The eval split is the first of validation/dev/test present; when
    it has no labels (GLUE's test splits) or none is present, a seeded part of train is held out. A ``ClassLabel``
    column keeps its ids."""
    if "train" not in dataset:
        raise DataError(f"{name}: no 'train' split (splits: {', '.join(dataset)})")
    columns = list(dataset["train"].column_names)
    eval_split = next((s for s in _EVAL_SPLITS if s in dataset), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in columns), None)
    fmt = formats.match(columns)
    if label_col is None and fmt is not None:
        def rows(split: str) -> list[Any]:
            return formats.parse_records((f"{name} {split} row {i}", r) for i, r in enumerate(dataset[split]))[1]

        train_rows = rows("train")
        if eval_split is None:
            train_rows, eval_rows = data.hold_out(train_rows, eval_size, seed, name)
            info = _held_out(eval_rows, f"{name} train", seed)
        else:
            eval_rows, info = data.subsample(rows(eval_split), eval_size, seed), {"eval_split": eval_split}
        train_rows = data.subsample(train_rows, train_size, seed)
        return _causal_task(name, fmt, train_rows, eval_rows, {"format": fmt.name, **info}, max_new_tokens)
    text_cols = next((p for p in _PAIR_COLUMNS if all(c in columns for c in p)), None)
    if text_cols is None:
        text_col = next((c for c in _TEXT_COLUMNS if c in columns), None)
        text_cols = (text_col,) if text_col else None
    if label_col is None or text_cols is None:
        raise DataError(
            f"{name}: cannot tell which columns hold the text and the label (columns: {', '.join(columns)}); "
            f"expected a label column ({', '.join(_LABEL_COLUMNS)}) and a text column "
            f"({', '.join(_TEXT_COLUMNS)}) or a pair such as sentence1+sentence2, or prompt+completion"
        )
    class_names = getattr(dataset["train"].features[label_col], "names", None)  # a ClassLabel keeps its ids
    train_rows = _hf_rows(dataset["train"], f"{name} train", label_col, text_cols)
    eval_rows = _hf_rows(dataset[eval_split], f"{name} {eval_split}", label_col, text_cols) if eval_split else []
    if eval_rows:
        eval_rows = data.subsample(eval_rows, eval_size, seed)
        info = {"eval_split": eval_split}
    else:
        train_rows, eval_rows = data.hold_out(train_rows, eval_size, seed, name)
        info = _held_out(eval_rows, f"{name} train", seed)
    train_rows = data.subsample(train_rows, train_size, seed)
    task = _classification_from_rows(name, train_rows, eval_rows, class_names)
    task.data = {"format": "classification", **info}
    return task


def _task_from_hf(
    spec: str,
    train_file: str | Path | None,
    eval_file: str | Path | None,
    train_size: int | None,
    eval_size: int | None,
    seed: int,
    max_new_tokens: int | None,
) -> Task:
    body = spec[len("hf:") :]
    path, _, config = body.partition(":")
    if not path:
        raise DataError(f"{spec!r}: expected hf:DATASET or hf:DATASET:CONFIG, e.g. hf:nyu-mll/glue:sst2")
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{spec}: `hf:` tasks need the `datasets` package (pip install datasets)") from e
    data_files: dict[str, str] | None = None
    if train_file is not None or eval_file is not None:
        data_files = {}
        if train_file is not None:
            data_files["train"] = str(train_file)
        if eval_file is not None:
            data_files["validation"] = str(eval_file)
    try:
        dataset = datasets.load_dataset(path, config or None, data_files=data_files)
    except Exception as e:  # datasets raises many kinds: not found, offline, bad config, parse errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"could not load {spec} with datasets ({type(e).__name__}: {first}); without internet, use a local "
            "file (--train-file) or a built-in task"
        ) from e
    return task_from_datasets(
        dataset, spec, train_size=train_size, eval_size=eval_size, seed=seed, max_new_tokens=max_new_tokens
    )


def load_task(
    name_or_spec: str | None = None,
    *,
    train_file: str | Path | None = None,
    eval_file: str | Path | None = None,
    train_size: int | None = None,
    eval_size: int | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Task:
    """Load a task by name (``sarcasm``, ``socialiqa``, ``gsm``), from files, or from ``hf:DATASET[:CONFIG]``.

    - Built-in tasks use their default sizes when ``train_size``/``eval_size`` are None; the seeded split keeps
      the eval set fixed when only ``train_size`` changes.
    - Files (``name_or_spec`` None or ``"file"``): JSONL/CSV in a record format of :mod:`scalora.train.formats`
      (chat, text+label, prompt+completion, Alpaca, plain text); without ``eval_file``, a seeded tenth (at most
      1000 rows, or ``eval_size``) of the train file is held out. ``Task.data`` says which.
    - ``hf:`` specs need the ``datasets`` package; ``train_file``/``eval_file`` become its ``data_files``, so
      ``hf:json``/``hf:csv`` read local files.
    - ``max_new_tokens`` sets the generation length of generation tasks (``gsm``: 256 by default).
    """
    if name_or_spec is not None and name_or_spec.startswith("hf:"):
        return _task_from_hf(name_or_spec, train_file, eval_file, train_size, eval_size, seed, max_new_tokens)
    if name_or_spec in (None, "file"):
        return _task_from_files(train_file, eval_file, train_size, eval_size, seed, max_new_tokens)
    builtin = BUILTIN_TASKS.get(name_or_spec)
    if builtin is None:
        raise DataError(f"unknown task {name_or_spec!r}; {_known()}")
    if train_file is not None or eval_file is not None:
        raise DataError(f"task {name_or_spec!r} brings its own data; drop --train-file/--eval-file")
    return builtin.loader(
        train_size=builtin.train_size if train_size is None else train_size,
        eval_size=builtin.eval_size if eval_size is None else eval_size,
        seed=seed,
        max_new_tokens=max_new_tokens,
    )
