"""Tasks: a training set, an evaluation set, how to batch them, and how to score a model.

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

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from scalora.train import chat, data, formats
from scalora.train.chat import IGNORE_INDEX
from scalora.train.data import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    "extract_number",
    "generate",
    "load_task",
]

TaskKind = Literal["classification", "causal_lm"]
Batch = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Collators: plain classes (not closures) so that DataLoader workers can pickle them.


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


def _token_ids(tokenizer: PreTrainedTokenizerBase, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("causal LM tasks need a tokenizer with an EOS token")
    return int(tokenizer.eos_token_id)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
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
    p = _token_ids(tokenizer, prompt, True)
    c = _token_ids(tokenizer, completion, False)
    if eos:
        c.append(_eos_id(tokenizer))
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
        return _right_padded(rows, _pad_id(self.tokenizer))


class ChatCollator:
    """Chat examples ``{"messages", "where"}`` → ``input_ids``, ``attention_mask``, ``labels``, rendered with the
    tokenizer's chat template (:func:`chat.encode_chat`): labels on the assistant turns only, right-padded."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, examples: list[dict[str, Any]]) -> Batch:
        rows = [chat.encode_chat(self.tokenizer, ex, self.max_length) for ex in examples]
        return _right_padded(rows, _pad_id(self.tokenizer))


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


# ---------------------------------------------------------------------------------------------------------
# Scoring helpers.


def _device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; the model's training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
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
    pad = _pad_id(tokenizer)
    device = _device(model)
    with _evaluating(model):
        for chunk in _batches(order, batch_size):
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
    device = _device(model)
    total, count = 0.0, 0
    with _evaluating(model):
        for chunk in _batches(examples, batch_size):
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
    encoded = [_token_ids(tokenizer, p, True)[-max_length:] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(encoded)
    pad, eos = _pad_id(tokenizer), _eos_id(tokenizer)
    device = _device(model)
    with _evaluating(model):
        for chunk in _batches(order, batch_size):
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


# ---------------------------------------------------------------------------------------------------------
# Tasks.


@dataclass(kw_only=True)
class Task:
    """A named pair of example lists, with batching (:meth:`collate`) and scoring (:meth:`evaluate`)."""

    name: str
    kind: TaskKind
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    metric: str
    num_labels: int | None = None
    label_names: list[str] | None = None
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict)  # user data: its record format and how the eval set was made

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[list[dict[str, Any]]], Batch]:
        """A ``collate_fn`` turning a list of examples into a batch for ``model(**batch)`` (with ``labels``)."""
        if self.kind == "classification":
            return ClassificationCollator(tokenizer, max_length)
        return CausalLMCollator(tokenizer, max_length)

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        limit: int | None = None,
    ) -> dict[str, float]:
        """Score ``model`` on the first ``limit`` eval examples (all when None): ``{metric: value, "n": count}``
        (value in [0, 1]), plus any secondary scores the task defines. The model's train/eval mode is restored
        afterwards."""
        raise NotImplementedError

    def _eval_examples(self, limit: int | None) -> list[dict[str, Any]]:
        examples = self.eval if limit is None else self.eval[:limit]
        if not examples:
            raise DataError(f"task {self.name!r} has no evaluation examples")
        return examples

    def summary(self) -> str:
        """One line for logs."""
        labels = f", {self.num_labels} labels" if self.num_labels else ""
        records = f", {self.data['format']} records" if "format" in self.data else ""
        return (f"{self.name} ({self.kind}{labels}{records}): {len(self.train)} train, {len(self.eval)} eval, "
                f"{self.metric}")


@dataclass(kw_only=True)
class ClassificationTask(Task):
    """Sequence classification; examples ``{"text", "label"}``; metric ``accuracy``."""

    kind: TaskKind = "classification"
    metric: str = "accuracy"

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        limit: int | None = None,
    ) -> dict[str, float]:
        examples = self._eval_examples(limit)
        collate = self.collate(tokenizer, max_length)
        device = _device(model)
        correct = 0
        with _evaluating(model):
            for chunk in _batches(examples, batch_size):
                batch = {k: v.to(device) for k, v in collate(list(chunk)).items()}
                labels = batch.pop("labels")
                logits = model(**batch).logits
                correct += int((logits.argmax(-1) == labels).sum())
        return {self.metric: correct / len(examples), "n": float(len(examples))}


@dataclass(kw_only=True)
class MultipleChoiceTask(Task):
    """Causal LM multiple choice; examples ``{"prompt", "completion", "choices", "label"}``.

    Training uses prompt + correct choice (loss on the choice only). Evaluation picks the choice with the highest
    sum of token log-probabilities given the prompt (``accuracy``, as lm-evaluation-harness's ``acc``);
    ``accuracy_norm`` divides each sum by the choice's length in bytes (``acc_norm``).
    """

    kind: TaskKind = "causal_lm"
    metric: str = "accuracy"

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        limit: int | None = None,
    ) -> dict[str, float]:
        examples = self._eval_examples(limit)
        pairs = [(ex["prompt"], choice) for ex in examples for choice in ex["choices"]]
        scores = choice_loglikelihoods(model, tokenizer, pairs, max_length, batch_size)
        correct = correct_norm = 0
        pos = 0
        for ex in examples:
            k = len(ex["choices"])
            s = scores[pos : pos + k]
            norm = [v / max(1, len(c.encode())) for v, c in zip(s, ex["choices"], strict=True)]
            pos += k
            correct += int(max(range(k), key=s.__getitem__) == ex["label"])
            correct_norm += int(max(range(k), key=norm.__getitem__) == ex["label"])
        n = len(examples)
        return {self.metric: correct / n, "accuracy_norm": correct_norm / n, "n": float(n)}


@dataclass(kw_only=True)
class GenerationTask(Task):
    """Causal LM prompt → completion; scored by greedy generation, ``exact_match`` of the stripped text, and by
    ``loss``, the held-out loss of the reference completions (:func:`completion_loss`; informative while exact
    matches are still rare)."""

    kind: TaskKind = "causal_lm"
    metric: str = "exact_match"
    max_new_tokens: int = 64

    def reference(self, example: dict[str, Any]) -> str:
        return example["completion"].strip()

    def prediction(self, generated: str) -> str | None:
        return generated.strip()

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        limit: int | None = None,
    ) -> dict[str, float]:
        examples = self._eval_examples(limit)
        texts = generate(
            model, tokenizer, [ex["prompt"] for ex in examples], max_length, batch_size, self.max_new_tokens
        )
        hits = sum(self.prediction(t) == self.reference(ex) for t, ex in zip(texts, examples, strict=True))
        loss = completion_loss(model, tokenizer, examples, max_length, batch_size)
        return {self.metric: hits / len(examples), "loss": loss, "n": float(len(examples))}


@dataclass(kw_only=True)
class MathTask(GenerationTask):
    """Maths word problems: the final number of the generated solution must equal ``answer``."""

    max_new_tokens: int = 256

    def reference(self, example: dict[str, Any]) -> str:
        return normalize_number(str(example["answer"])) or str(example["answer"])

    def prediction(self, generated: str) -> str | None:
        return extract_number(generated)


@dataclass(kw_only=True)
class LanguageModelTask(Task):
    """Causal LM on ``{"prompt", "completion"}`` examples (plain text: an empty prompt, so every token is learned);
    scored by ``loss``, the held-out loss of the labelled tokens (:func:`labelled_loss`; lower is better)."""

    kind: TaskKind = "causal_lm"
    metric: str = "loss"

    def evaluate(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        batch_size: int,
        limit: int | None = None,
    ) -> dict[str, float]:
        examples = self._eval_examples(limit)
        loss = labelled_loss(model, self.collate(tokenizer, max_length), examples, batch_size)
        return {self.metric: loss, "n": float(len(examples))}


@dataclass(kw_only=True)
class ChatTask(LanguageModelTask):
    """Chat ``{"messages", "where"}`` examples through the tokenizer's chat template, labels on the assistant turns
    (:class:`ChatCollator`); scored by the held-out loss of the assistant tokens."""

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[list[dict[str, Any]]], Batch]:
        chat.check_chat_template(tokenizer, (self.train or self.eval)[0]["where"])
        return ChatCollator(tokenizer, max_length)


# ---------------------------------------------------------------------------------------------------------
# Loading.


@dataclass(frozen=True)
class BuiltinTask:
    """A task that needs no files: its loader, default sizes and the offline asset it reads (`assets.ASSETS`)."""

    description: str
    train_size: int | None  # None: every example not used for evaluation
    eval_size: int
    loader: Callable[..., Task] = field(repr=False)
    asset: str | None = None


def _evals_root() -> Path:
    from scalora.train import assets

    return assets.ensure("evals")


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
