"""Tasks: built-in data sets, user files, batching (masking), and evaluation."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tiny import write_jsonl

from scalora.errors import ScaloraError
from scalora.train import task_types, tasks
from scalora.train.data import DataError
from scalora.train.models import tiny_model
from scalora.train.tasks import (
    ClassificationTask,
    GenerationTask,
    MathTask,
    MultipleChoiceTask,
    choice_loglikelihoods,
    completion_loss,
    extract_number,
    generate,
    load_task,
)

# ---------------------------------------------------------------------------------------------------------
# Built-in tasks.


def test_sarcasm(evals_path: Path) -> None:
    task = load_task("sarcasm", train_size=300, eval_size=100, seed=1)
    assert isinstance(task, ClassificationTask)
    assert (task.kind, task.metric, task.num_labels) == ("classification", "accuracy", 2)
    assert len(task.train) == 300 and len(task.eval) == 100
    assert {ex["label"] for ex in task.train} == {0, 1}
    assert all(isinstance(ex["text"], str) and ex["text"] for ex in task.train)
    assert not {ex["text"] for ex in task.train} & {ex["text"] for ex in task.eval}
    again = load_task("sarcasm", train_size=50, eval_size=100, seed=1)
    assert again.eval == task.eval  # the eval set does not move with train_size
    assert again.train == task.train[:50]
    assert load_task("sarcasm", train_size=50, eval_size=100, seed=2).eval != task.eval
    with pytest.raises(DataError, match="28498 examples"):
        load_task("sarcasm", train_size=30_000, eval_size=10)


def test_socialiqa(evals_path: Path) -> None:
    task = load_task("socialiqa", eval_size=200, seed=0)
    assert isinstance(task, MultipleChoiceTask)
    assert (task.kind, task.metric) == ("causal_lm", "accuracy")
    assert len(task.train) + len(task.eval) == 2224 and len(task.eval) == 200
    for ex in task.train[:50] + task.eval[:50]:
        assert len(ex["choices"]) == 3 and ex["completion"] == ex["choices"][ex["label"]]
        assert ex["prompt"].startswith("Question: ") and ex["prompt"].endswith("\nAnswer:")
        assert all(c.startswith(" ") and not c.endswith(".") for c in ex["choices"])
    assert {ex["label"] for ex in task.eval} == {0, 1, 2}


def test_gsm(reasoning_gym_installed: Path) -> None:
    task = load_task("gsm", train_size=40, eval_size=10, seed=3, max_new_tokens=32)
    assert isinstance(task, MathTask)
    assert (task.kind, task.metric, task.max_new_tokens) == ("causal_lm", "exact_match", 32)
    assert len(task.train) == 40 and len(task.eval) == 10
    for ex in task.train + task.eval:
        assert ex["completion"].rstrip().endswith(f"\n#### {ex['answer']}") or ex["completion"].startswith(" ####")
        assert extract_number(ex["completion"]) == tasks.normalize_number(ex["answer"])
    assert load_task("gsm", train_size=40, eval_size=10, seed=3).eval == task.eval
    assert load_task("gsm", train_size=5, eval_size=10, seed=3).max_new_tokens == 256


def test_unknown_task_lists_known() -> None:
    with pytest.raises(DataError) as info:
        load_task("glue")
    assert isinstance(info.value, ScaloraError)
    for name in ("sarcasm", "socialiqa", "gsm", "--train-file", "hf:"):
        assert name in str(info.value)
    with pytest.raises(DataError, match="own data"):
        load_task("sarcasm", train_file="x.jsonl")
    with pytest.raises(DataError, match="--train-file"):
        load_task()


# ---------------------------------------------------------------------------------------------------------
# Batching.

CAUSAL = [
    {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"},
    {"prompt": "Q: name a colour\nA:", "completion": " blue, or green"},
    {"prompt": "", "completion": "no prompt at all"},
]


def test_classification_collate(char_tok) -> None:
    task = ClassificationTask(name="t", train=[], eval=[], num_labels=2)
    batch = task.collate(char_tok, 8)([{"text": "abc", "label": 1}, {"text": "a much longer text", "label": 0}])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 8)  # truncated to max_length
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"].tolist() == [1, 0]


def test_causal_collate_masks_prompt_tokens_exactly(char_tok) -> None:
    task = GenerationTask(name="t", train=CAUSAL, eval=[])
    batch = task.collate(char_tok, 128)(CAUSAL)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    eos, pad = char_tok.eos_token_id, char_tok.pad_token_id
    for row, ex in enumerate(CAUSAL):
        n_prompt, n_completion = len(ex["prompt"]), len(ex["completion"])  # one token per character
        length = n_prompt + n_completion + 1
        assert char_tok.decode(ids[row, :n_prompt]) == ex["prompt"]
        assert (labels[row, :n_prompt] == -100).all()
        assert labels[row, n_prompt : length - 1].tolist() == ids[row, n_prompt : length - 1].tolist()
        assert char_tok.decode(labels[row, n_prompt : length - 1]) == ex["completion"]
        assert labels[row, length - 1] == eos == ids[row, length - 1]  # EOS appended and learned
        assert (labels[row, length:] == -100).all() and (ids[row, length:] == pad).all()
        assert mask[row, :length].all() and not mask[row, length:].any()


def test_causal_collate_with_eos_as_pad_still_learns_eos(char_tok) -> None:
    char_tok.pad_token = char_tok.eos_token
    batch = GenerationTask(name="t", train=[], eval=[]).collate(char_tok, 64)(CAUSAL[:2])
    short = len(CAUSAL[0]["prompt"]) + len(CAUSAL[0]["completion"]) + 1
    assert batch["labels"][0, short - 1] == char_tok.eos_token_id
    assert (batch["labels"][0, short:] == -100).all()


def test_causal_collate_truncates_the_prompt_first(char_tok) -> None:
    ex = {"prompt": "x" * 50 + "END", "completion": " answer"}
    batch = GenerationTask(name="t", train=[], eval=[]).collate(char_tok, 16)([ex])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ids.shape == (16,)
    assert char_tok.decode(ids[:8]) == "xxxxxEND"  # the end of the prompt is kept
    assert (labels[:8] == -100).all() and char_tok.decode(labels[8:15]) == " answer"
    assert labels[15] == char_tok.eos_token_id


def test_multiple_choice_trains_on_the_correct_answer(char_tok) -> None:
    ex = {"prompt": "Q?\nA:", "completion": " yes", "choices": [" no", " yes"], "label": 1}
    batch = MultipleChoiceTask(name="t", train=[ex], eval=[]).collate(char_tok, 32)([ex])
    labels = batch["labels"][0]
    assert (labels[:5] == -100).all() and char_tok.decode(labels[5:9]) == " yes"


def test_collate_output_feeds_the_model(tiny_llama_model, tiny_gpt2_model, tiny_bert_model) -> None:
    for model, tok in (tiny_llama_model, tiny_gpt2_model):
        loss = model(**GenerationTask(name="t", train=[], eval=[]).collate(tok, 64)(CAUSAL)).loss
        assert torch.isfinite(loss)
    model, tok = tiny_bert_model
    batch = ClassificationTask(name="t", train=[], eval=[], num_labels=2).collate(tok, 32)(
        [{"text": "yes", "label": 1}, {"text": "no no", "label": 0}]
    )
    assert torch.isfinite(model(**batch).loss)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


def test_evaluate_builtin_tasks_on_tiny_models(
    evals_path: Path, reasoning_gym_installed: Path, tiny_bert_model, tiny_llama_model, tiny_gpt2_model
) -> None:
    model, tok = tiny_bert_model
    model.train()
    result = load_task("sarcasm", train_size=10, eval_size=20).evaluate(model, tok, 64, 8)
    assert 0 <= result["accuracy"] <= 1 and result["n"] == 20
    assert model.training  # mode restored

    model, tok = tiny_llama_model
    result = load_task("socialiqa", eval_size=20).evaluate(model, tok, 256, 8, limit=6)
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["accuracy_norm"] <= 1 and result["n"] == 6
    assert not model.training

    model, tok = tiny_gpt2_model
    result = load_task("gsm", train_size=2, eval_size=4, max_new_tokens=4).evaluate(model, tok, 256, 4)
    assert result["exact_match"] == 0.0 and result["n"] == 4.0 and math.isfinite(result["loss"]) and result["loss"] > 0


class FavouriteTokenLM(torch.nn.Module):
    """A stand-in causal LM: every position predicts ``favourite`` with log-probability ~0 and every other
    token with ~-20, so the log-likelihood of a continuation is -20 per token that is not ``favourite``."""

    def __init__(self, vocab: int, favourite: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[favourite] = 20.0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_multiple_choice_picks_the_highest_loglikelihood(char_tok) -> None:
    model = FavouriteTokenLM(len(char_tok), char_tok.convert_tokens_to_ids("x"))
    examples = [
        {"prompt": "Pick:", "choices": ["ab", "xx", "xa"], "label": 1, "completion": "xx"},
        {"prompt": "Pick:", "choices": ["xxxxxxx", "xab", "ax"], "label": 0, "completion": "xxxxxxx"},
        {"prompt": "Pick again:", "choices": ["abc", "xbc", "xxc"], "label": 0, "completion": "abc"},
    ]
    scores = choice_loglikelihoods(model, char_tok, [("Pick:", "ab"), ("Pick:", "xx"), ("Pick:", "xa")], 64, 2)
    assert scores[1] == pytest.approx(0, abs=1e-3)
    assert scores[0] == pytest.approx(2 * scores[2], rel=1e-3) and scores[2] < -19
    task = MultipleChoiceTask(name="t", train=[], eval=examples)
    result = task.evaluate(model, char_tok, 64, batch_size=4)
    # Sums pick "xx", then "xxxxxxx" (longest but most likely), then "xxc" (wrong).
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["n"] == 3


def test_batched_scoring_matches_one_at_a_time(tiny_llama_model) -> None:
    model, tok = tiny_llama_model
    pairs = [("Question: why?\nAnswer:", " because"), ("Q:", " a much longer answer here"), ("Hi", " x")]
    batched = choice_loglikelihoods(model, tok, pairs, 128, batch_size=3)
    for (ctx, cont), got in zip(pairs, batched, strict=True):
        ids = tok(ctx + cont, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        targets = ids[0, 1:]
        expected = logprobs[torch.arange(len(targets)), targets][len(ctx) - 1 :].sum()
        assert got == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_batched_generation_matches_one_at_a_time(arch: str) -> None:
    model, tok = tiny_model(arch)
    prompts = ["Question: 1+1?\nAnswer:", "Hi", "A longer prompt, to force left padding:"]
    batched = generate(model, tok, prompts, max_length=128, batch_size=3, max_new_tokens=6)
    single = [generate(model, tok, [p], max_length=128, batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) and "[PAD]" not in t for t in batched)


def test_math_task_scores_the_final_number(monkeypatch: pytest.MonkeyPatch, char_tok) -> None:
    outputs = [" 3 + 4 = 7\n#### 7", " so the answer is 12.0", " #### 1,000 apples", " no idea"]
    monkeypatch.setattr(task_types, "generate", lambda *args, **kwargs: outputs)
    monkeypatch.setattr(task_types, "completion_loss", lambda *args, **kwargs: 1.5)
    examples = [{"prompt": "q", "completion": " x", "answer": a} for a in ("7", "12", "1000", "5")]
    task = MathTask(name="m", train=[], eval=examples)
    assert task.evaluate(torch.nn.Linear(1, 1), char_tok, 64, 4) == {"exact_match": 0.75, "loss": 1.5, "n": 4.0}


def test_generation_task_exact_match(monkeypatch: pytest.MonkeyPatch, char_tok) -> None:
    monkeypatch.setattr(task_types, "generate", lambda *args, **kwargs: [" Paris ", "Lyon"])
    monkeypatch.setattr(task_types, "completion_loss", lambda *args, **kwargs: 0.25)
    examples = [{"prompt": "a", "completion": " Paris"}, {"prompt": "b", "completion": " Rome"}]
    result = GenerationTask(name="g", train=[], eval=examples).evaluate(torch.nn.Linear(1, 1), char_tok, 64, 2)
    assert result == {"exact_match": 0.5, "loss": 0.25, "n": 2.0}


def test_completion_loss_is_token_weighted_over_completions(char_tok) -> None:
    # "xx" + EOS: 1 unlikely token (EOS) of 3; "ab" + EOS: 3 of 3. Prompts are not scored.
    model = FavouriteTokenLM(len(char_tok), char_tok.convert_tokens_to_ids("x"))
    examples = [{"prompt": "Say:", "completion": "xx"}, {"prompt": "Say something longer:", "completion": "ab"}]
    expected = 20.0 * 4 / 6
    assert completion_loss(model, char_tok, examples, 64, batch_size=2) == pytest.approx(expected, rel=1e-3)
    assert completion_loss(model, char_tok, examples, 64, batch_size=1) == pytest.approx(expected, rel=1e-3)
    assert completion_loss(model, char_tok, examples[:1], 64, batch_size=1) == pytest.approx(20.0 / 3, rel=1e-3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step one: 3 * 4 = 12\n#### 12", "12"),
        ("#### 1,234", "1234"),
        ("####  -5", "-5"),
        ("#### $12.50", "12.5"),
        ("#### 16.0", "16"),
        ("#### 7\nQuestion: what is 9 + 1?\nAnswer: 10\n#### 10", "7"),  # the first marker
        ("so she has 3 apples and 15 pears, 18 in total.", "18"),  # no marker: the last number
        ("the answer is .5", "0.5"),
        ("it costs $1,000,000.", "1000000"),
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_number(text: str, expected: str | None) -> None:
    assert extract_number(text) == expected


# ---------------------------------------------------------------------------------------------------------
# User files.


def test_jsonl_classification_with_string_labels(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": ["pos", "neg"][i % 2]} for i in range(6)])
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"text": "e1", "label": "neg"}, {"text": "e2", "label": "pos"}])
    task = load_task(train_file=train, eval_file=ev)
    assert isinstance(task, ClassificationTask)
    assert task.label_names == ["neg", "pos"] and task.num_labels == 2
    assert [ex["label"] for ex in task.train] == [1, 0, 1, 0, 1, 0]
    assert [ex["label"] for ex in task.eval] == [0, 1]
    assert task.name == "train" and task.metric == "accuracy"


def test_csv_classification_with_integer_labels(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text('text,label,extra\n"hello, world",1,x\nbye,0,y\n"multi\nline",2,z\n')
    task = load_task("file", train_file=tmp_path / "d.csv", eval_file=tmp_path / "d.csv")
    assert task.num_labels == 3 and task.label_names == ["0", "1", "2"]
    assert task.train == [
        {"text": "hello, world", "label": 1},
        {"text": "bye", "label": 0},
        {"text": "multi\nline", "label": 2},
    ]


def test_prompt_completion_file_and_holdout(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(30)]
    task = load_task(train_file=write_jsonl(tmp_path / "pc.jsonl", rows), seed=4, max_new_tokens=12)
    assert isinstance(task, GenerationTask) and task.max_new_tokens == 12
    assert (len(task.train), len(task.eval)) == (27, 3)
    assert sorted(task.train + task.eval, key=lambda r: int(r["prompt"][1:])) == rows
    assert load_task(train_file=tmp_path / "pc.jsonl", seed=4).eval == task.eval
    small = load_task(train_file=tmp_path / "pc.jsonl", train_size=5, eval_size=10)
    assert (len(small.train), len(small.eval)) == (5, 10)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", '{"text": "a", "label": 1}\n\n{"text": "b", "label": 0\n', r"bad\.jsonl line 3: invalid JSON"),
        ("miss.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', r"miss\.jsonl line 2: missing field 'label'"),
        ("pc.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n', r"line 2: missing field 'completion'"),
        ("kind.jsonl", '{"input": "a", "output": "b"}\n', r"kind\.jsonl line 1: expected fields 'messages' \(chat\)"),
        ("empty.jsonl", "\n\n", r"empty\.jsonl: the file is empty"),
        ("empty.csv", "", r"empty\.csv: the file is empty"),
        ("obj.jsonl", '["a", 1]\n', r"obj\.jsonl: found a JSON array"),
        ("list.jsonl", '{"text": "a", "label": 1}\n3\n', r"line 2: expected a JSON object"),
        ("type.jsonl", '{"text": 5, "label": 1}\n', r"line 1: field 'text' must be a string"),
        ("blank.jsonl", '{"text": "a", "label": 1}\n{"text": " ", "label": 1}\n', r"line 2: field 'text' is empty"),
        ("float.jsonl", '{"text": "a", "label": 0.5}\n', r"line 1: field 'label' must be an integer or a non-empty"),
        ("neg.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": -1}\n', r"neg\.jsonl line 2: label -1"),
        ("hdr.csv", "body,target\na,1\n", r"hdr\.csv line 1: the header has columns 'body', 'target'; expected"),
        ("short.csv", "text,label\na,1\nb\n", r"short\.csv line 3: missing field 'label'"),
        ("long.csv", "text,label\na,1\nb,2,3\n", r"long\.csv line 3: more values than the 2 header columns"),
        ("data.txt", "hello\n", r"unsupported file type '\.txt'"),
    ],
)
def test_file_errors_name_the_line(tmp_path: Path, name: str, content: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        load_task(train_file=path)


def test_file_errors_other(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_task(train_file=tmp_path / "missing.jsonl")
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 0}, {"text": "y", "label": 1}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError, match="same format"):
        load_task(train_file=a, eval_file=b)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "a"}])
    with pytest.raises(DataError, match="at least two labels"):
        load_task(train_file=one, eval_file=one)
    (tmp_path / "latin.csv").write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_task(train_file=tmp_path / "latin.csv")


# ---------------------------------------------------------------------------------------------------------
# `datasets` names.


def test_hf_spec_reads_local_files_through_datasets(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    train = write_jsonl(
        tmp_path / "tr.jsonl", [{"sentence": f"s{i}", "label": ["bad", "good"][i % 2]} for i in range(8)]
    )
    ev = write_jsonl(tmp_path / "ev.jsonl", [{"sentence": "e", "label": "good"}])
    task = load_task("hf:json", train_file=train, eval_file=ev)
    assert isinstance(task, ClassificationTask) and task.label_names == ["bad", "good"]
    assert task.train[:2] == [{"text": "s0", "label": 0}, {"text": "s1", "label": 1}]
    assert task.eval == [{"text": "e", "label": 1}]


def test_hf_dataset_with_class_labels_and_pairs(char_tok) -> None:
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "sentence1": datasets.Value("string"),
            "sentence2": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
        }
    )

    def split(n: int, unlabelled: bool = False) -> Any:
        rows = {
            "sentence1": [f"a{i}" for i in range(n)],
            "sentence2": [f"b{i}" for i in range(n)],
            "label": [-1 if unlabelled else i % 2 for i in range(n)],
        }
        return datasets.Dataset.from_dict(rows, features=features)

    dd = datasets.DatasetDict({"train": split(20), "test": split(5, unlabelled=True), "validation": split(4)})
    task = tasks.task_from_datasets(dd, "hf:mrpc", train_size=10, eval_size=None, seed=0)
    assert task.label_names == ["not_equivalent", "equivalent"]  # a ClassLabel keeps its ids
    assert len(task.train) == 10 and len(task.eval) == 4
    assert task.eval[:2] == [
        {"text": "a0", "text_pair": "b0", "label": 0},
        {"text": "a1", "text_pair": "b1", "label": 1},
    ]
    assert task.collate(char_tok, 16)(task.eval)["input_ids"].shape[0] == 4

    only_test = datasets.DatasetDict({"train": split(20), "test": split(5, unlabelled=True)})
    task = tasks.task_from_datasets(only_test, "hf:x", train_size=None, eval_size=None, seed=0)
    assert (len(task.train), len(task.eval)) == (18, 2)  # unlabelled test split: hold out part of train

    bad = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"foo": ["a"], "bar": [1]})})
    with pytest.raises(DataError, match="columns: foo, bar"):
        tasks.task_from_datasets(bad, "hf:bad", train_size=None, eval_size=None, seed=0)


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        load_task("hf:nyu-mll/glue:sst2")
    with pytest.raises(DataError, match="hf:DATASET"):
        load_task("hf:")
