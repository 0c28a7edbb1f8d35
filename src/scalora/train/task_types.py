"""The task classes: a training set, an evaluation set, how to batch them (`collators`) and how to score a model
(`scoring`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from scalora.train import chat
from scalora.train.collators import Batch, CausalLMCollator, ChatCollator, ClassificationCollator
from scalora.train.data import DataError
from scalora.train.scoring import (
    choice_loglikelihoods,
    chunks,
    completion_loss,
    evaluating,
    extract_number,
    generate,
    labelled_loss,
    model_device,
    normalize_number,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["ChatTask", "ClassificationTask", "GenerationTask", "LanguageModelTask", "MathTask", "MultipleChoiceTask",
           "Task", "TaskKind"]

TaskKind = Literal["classification", "causal_lm"]


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
        examples = self.eval if limit is None else self.eval[:limit]
        if not examples:
            raise DataError(f"task {self.name!r} has no evaluation examples")
        return self.score(model, tokenizer, examples, max_length, batch_size)

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
              max_length: int, batch_size: int) -> dict[str, float]:
        """`evaluate` on the given (non-empty) examples."""
        raise NotImplementedError

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

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
              max_length: int, batch_size: int) -> dict[str, float]:
        collate = self.collate(tokenizer, max_length)
        device = model_device(model)
        correct = 0
        with evaluating(model):
            for chunk in chunks(examples, batch_size):
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

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
              max_length: int, batch_size: int) -> dict[str, float]:
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

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
              max_length: int, batch_size: int) -> dict[str, float]:
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

    def score(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]],
              max_length: int, batch_size: int) -> dict[str, float]:
        loss = labelled_loss(model, self.collate(tokenizer, max_length), examples, batch_size)
        return {self.metric: loss, "n": float(len(examples))}


@dataclass(kw_only=True)
class ChatTask(LanguageModelTask):
    """Chat ``{"messages", "where"}`` examples through the tokenizer's chat template, labels on the assistant turns
    (:class:`ChatCollator`); scored by the held-out loss of the assistant tokens."""

    def collate(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Callable[[list[dict[str, Any]]], Batch]:
        chat.check_chat_template(tokenizer, (self.train or self.eval)[0]["where"])
        return ChatCollator(tokenizer, max_length)
