"""Record formats of user data: chat messages, plain text and Alpaca records, from JSONL, CSV and ``datasets``."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest

from scalora.cli import main
from scalora.train import formats
from scalora.train.chat import IGNORE_INDEX, encode_chat
from scalora.train.models import char_tokenizer, tiny_model
from scalora.train.tasks import ChatTask, DataError, GenerationTask, LanguageModelTask, load_task, task_from_datasets

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok"},
    {"role": "assistant", "content": "k"},
]


def chat_tokenizer():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def write(path: Path, rows: list[dict[str, Any]]) -> Path:
    """JSON Lines, or CSV (with lists as JSON strings) for a .csv path."""
    if path.suffix == ".csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat_row(i: int) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}


ROWS = {
    "chat": chat_row,
    "text": lambda i: {"text": f"the number {i} comes before {i + 1}."},
    "alpaca": lambda i: {"instruction": "add one", "input": str(i) if i % 2 else "", "output": str(i + 1)},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny saved Llama models: one whose tokenizer has a chat template, one without."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for name, tok in (("chat", chat_tokenizer()), ("plain", char_tokenizer())):
        model, tok = tiny_model("llama", tok, hidden=32, layers=2)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def train(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--train-file", str(data), "--method", "lora", "--steps", "2",
            "--batch-size", "4", "--max-length", "64", "--max-new-tokens", "3", "--no-tensorboard", "--threads", "1",
            "--output-dir", str(out), *extra]


# ---------------------------------------------------------------------------------------------------------
# The loss mask.


def test_chat_labels_exactly_the_assistant_turns() -> None:
    tok = chat_tokenizer()
    pieces = [("<system>S\n<user>hi\n<assistant>", False), ("yo[EOS]\n", True), ("<user>ok\n<assistant>", False),
              ("k[EOS]\n", True)]  # what the template writes, by hand
    want_ids: list[int] = []
    want_labels: list[int] = []
    for text, assistant in pieces:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want_ids += ids
        want_labels += ids if assistant else [IGNORE_INDEX] * len(ids)
    ids, labels = encode_chat(tok, {"messages": CONVERSATION, "where": "x"}, 100)
    assert ids == want_ids and labels == want_labels
    assert tok.decode([t for t in labels if t != IGNORE_INDEX]) == "yo[EOS]\nk[EOS]\n"
    assert ids == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]


def test_chat_batches_pad_and_truncate() -> None:
    tok = chat_tokenizer()
    short = {"messages": CONVERSATION[1:3], "where": "f line 1"}
    task = ChatTask(name="t", train=[short, {"messages": CONVERSATION, "where": "f line 2"}], eval=[])
    batch = task.collate(tok, 100)(task.train)
    n = len("<user>hi\n<assistant>yo") + 2  # [EOS] is one token, then "\n"
    assert batch["attention_mask"][0].sum() == n and (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["labels"][0, n - 4 : n] != IGNORE_INDEX).all() and (batch["labels"][0, : n - 4] == IGNORE_INDEX).all()
    with pytest.raises(DataError, match=r"f line 1: no assistant token within the first 10 tokens"):
        task.collate(tok, 10)([short])


def test_text_is_learned_everywhere_and_alpaca_uses_its_template() -> None:
    tok = char_tokenizer()
    task = LanguageModelTask(name="t", train=[formats.FORMATS["text"].parse({"text": "abc"}, "w")], eval=[])
    batch = task.collate(tok, 16)(task.train)
    assert batch["labels"].tolist() == [tok("abc")["input_ids"] + [tok.eos_token_id]]
    no_input = formats.FORMATS["alpaca"].parse({"instruction": "Do.", "output": "Done."}, "w")
    assert no_input["prompt"].endswith("### Instruction:\nDo.\n\n### Response:\n") and no_input["completion"] == "Done."
    with_input = formats.FORMATS["alpaca"].parse({"instruction": "Do.", "input": "x", "output": "y"}, "w")
    assert with_input["prompt"].endswith("### Instruction:\nDo.\n\n### Input:\nx\n\n### Response:\n")


# ---------------------------------------------------------------------------------------------------------
# Each format from the command line.


@pytest.mark.parametrize(("fmt", "suffix"), [("chat", ".jsonl"), ("chat", ".csv"), ("text", ".jsonl"),
                                             ("alpaca", ".jsonl"), ("alpaca", ".csv")])
def test_each_format_trains(fmt: str, suffix: str, models: dict[str, Path], tmp_path: Path,
                            capsys: pytest.CaptureFixture) -> None:
    data = write(tmp_path / f"{fmt}{suffix}", [ROWS[fmt](i) for i in range(20)])
    assert main(train(models["chat"], data, tmp_path / "run", "--seed", "3")) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == {"format": fmt, "train_file": str(data), "eval_split": "held_out", "held_out": 2,
                               "held_out_from": str(data), "seed": 3}
    assert summary["metric"] == ("exact_match" if fmt == "alpaca" else "loss")
    assert f"{fmt} records" in capsys.readouterr().out


def test_eval_file_is_named_in_the_summary(models: dict[str, Path], tmp_path: Path) -> None:
    data = write(tmp_path / "train.jsonl", [chat_row(i) for i in range(8)])
    dev = write(tmp_path / "dev.csv", [chat_row(i) for i in range(3)])
    assert main(train(models["chat"], data, tmp_path / "run", "--eval-file", str(dev))) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == {"format": "chat", "train_file": str(data), "eval_split": "file", "eval_file": str(dev)}
    assert main(["eval", "--run", str(tmp_path / "run")]) == 0


def _user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


GOOD = json.dumps(chat_row(0))


@pytest.mark.parametrize(("lines", "expected"), [
    ([GOOD, '{"messages": {"role": "user"}}'], r"line 2: field 'messages' must be a list"),
    ([GOOD, '{"messages": []}'], r"line 2: field 'messages' is empty"),
    ([GOOD, '{"messages": [{"role": "user", "content": "a"}]}'], r"line 2: no assistant turn"),
    ([GOOD, '{"messages": [{"role": "bot", "content": "a"}]}'], r"line 2: messages\[0\] has the unknown role 'bot'"),
    ([GOOD, '{"messages": [{"role": "assistant"}]}'], r"line 2: messages\[0\] must be an object with 'role' and"),
    ([GOOD, '{"messages": [{"role": "assistant", "content": 5}]}'], r"line 2: messages\[0\]: 'content' must be a str"),
    ([GOOD, '{"text": "plain"}'], r"line 2: missing field 'messages'.*looks like text data: use one format per file"),
    (['{"text": "plain"}', '{"text": "a", "label": 1}'], r"line 2: this record looks like classification data, but"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "c"}'], r"line 2: missing field 'output'"),
    (['{"instruction": "a", "output": 3}'], r"line 1: field 'output' must be a string"),
    (['{"instruction": "a", "input": 3, "output": "b"}'], r"line 1: field 'input' must be a string"),
    (['{"text": ""}'], r"line 1: field 'text' is empty"),
])
def test_bad_records_name_the_line(lines: list[str], expected: str, models: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    err = _user_error(capsys, train(models["chat"], data, tmp_path / "run"))
    assert "bad.jsonl " in err
    assert re.search(expected, err), err


def test_bad_csv_messages_and_a_template_less_tokenizer(models: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "bad.csv"
    data.write_text('messages\n"[{""role"": ""user"", ""content"": ""a""}]"\n"[{not json"\n')
    err = _user_error(capsys, train(models["chat"], data, tmp_path / "run"))
    assert "bad.csv line 2: no assistant turn" in err
    data.write_text('messages\n"[{""role"": ""assistant"", ""content"": ""a""}]"\n"[{not json"\n')
    err = _user_error(capsys, train(models["chat"], data, tmp_path / "run"))
    assert "bad.csv line 3: field 'messages' is a string but not a JSON list" in err
    good = write(tmp_path / "chat.jsonl", [chat_row(i) for i in range(10)])
    err = _user_error(capsys, train(models["plain"], good, tmp_path / "run"))
    assert "chat.jsonl line " in err and "need a tokenizer with a chat template" in err


# ---------------------------------------------------------------------------------------------------------
# `datasets` data sets.


def test_datasets_in_each_format(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    for fmt, cls in (("chat", ChatTask), ("text", LanguageModelTask), ("alpaca", GenerationTask)):
        rows = [ROWS[fmt](i) for i in range(10)]
        dd = datasets.DatasetDict(train=datasets.Dataset.from_list(rows))
        task = task_from_datasets(dd, f"hf:{fmt}", train_size=None, eval_size=2, seed=1)
        assert type(task) is cls and task.data == {"format": fmt, "eval_split": "held_out", "held_out": 2,
                                                   "held_out_from": f"hf:{fmt} train", "seed": 1}
        dd["validation"] = datasets.Dataset.from_list(rows[:3])
        task = task_from_datasets(dd, f"hf:{fmt}", train_size=None, eval_size=None, seed=1)
        assert task.data == {"format": fmt, "eval_split": "validation"} and len(task.eval) == 3
    task = load_task("hf:csv", train_file=write(tmp_path / "chat.csv", [chat_row(i) for i in range(10)]))
    assert isinstance(task, ChatTask) and task.train[0]["messages"][1]["role"] == "assistant"
    assert task.train[0]["where"].startswith("hf:csv train row ")
