"""The ``scalora`` command: help, train, eval, compare, assets, demo, and how user mistakes are reported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from scalora import cli_compare
from scalora.cli import build_parser, main
from scalora.cli_options import parse_target_modules, training_values
from scalora.train import assets
from scalora.train.compare import error_line, option_flag, to_argv
from scalora.train.config import TrainConfig
from scalora.train.models import tiny_model
from scalora.train.registry import METHODS
from scalora.train.tasks import BUILTIN_TASKS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a busy machine makes them much slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env_one_thread():
    """Environment for subprocesses: one thread, offline hub (no network waits)."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny saved models (BERT classifier, Llama causal LM) and small data files for them."""
    root = tmp_path_factory.mktemp("cli")
    out = {}
    for arch in ("bert", "llama"):
        model, tokenizer = tiny_model(arch, hidden=32, layers=2)
        model.save_pretrained(root / f"tiny-{arch}")
        tokenizer.save_pretrained(root / f"tiny-{arch}")
        out[arch] = root / f"tiny-{arch}"
    words = {0: "bad awful poor dull", 1: "good great fine nice"}
    out["cls"] = _write_jsonl(root / "cls.jsonl", [{"text": f"{words[i % 2]} {i}", "label": i % 2} for i in range(60)])
    out["lm"] = _write_jsonl(root / "lm.jsonl", [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(30)])
    return out


def _train_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(files["bert"]), "--train-file", str(files["cls"]), "--steps", "4",
            "--batch-size", "8", "--max-length", "24", "--no-tensorboard", "--threads", "1", "--output-dir", str(out),
            *extra]


@pytest.fixture(scope="module")
def lora_run(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA run on the tiny BERT model (shared by the tests that need an existing run)."""
    out = tmp_path_factory.mktemp("runs") / "lora"
    assert main(_train_args(files, out, "--method", "lora", "--eval-every", "2")) == 0
    return out


def _user_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """Run ``argv``, expect a reported user error, and return stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------------------
# The parser.


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["compare"], ["demo"], ["assets"], ["assets", "status"],
                                     ["assets", "fetch"]])
def test_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: scalora" in out
    if command and command[0] in ("train", "compare", "demo"):
        assert all(m in out for m in METHODS)
        assert all(t in out for t in BUILTIN_TASKS) and "hf:" in out
        assert "minilm" in out and "smollm2-135m" in out
        assert "examples:" in out
    if command == ["train"]:
        assert "--rank" in out and "--no-progress" in out and "all-linear" in out


def test_every_config_field_has_a_flag_and_help(capsys: pytest.CaptureFixture) -> None:
    names = {f.name for f in fields(TrainConfig)}
    assert all(f.metadata.get("help") for f in fields(TrainConfig))  # a new field needs its help text
    for command in ("train", "compare", "demo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        missing = [option_flag(n) for n in names if option_flag(n) not in out and n != "method"]
        assert not missing, (command, missing)


def test_flags_round_trip() -> None:
    values = {"method": "scalora", "lr": 0.0003, "max_grad_norm": None, "target_modules": ["query", "value"],
              "progress": False, "resume": True, "steps": 7, "scalora_mode": "scalar", "train_file": "a.jsonl"}
    args = build_parser().parse_args(["train", *to_argv(values)])
    assert training_values(args) == values


def test_target_modules_spec() -> None:
    assert parse_target_modules("all-linear") == "all-linear"
    assert parse_target_modules("query, value") == ["query", "value"]
    assert parse_target_modules("query") == ["query"]
    assert parse_target_modules(r".*\.(query|value)") == r".*\.(query|value)"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------------------
# train and eval, end to end.


def test_train_classification(lora_run: Path, files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["steps"] == 4 and summary["metric"] == "accuracy"
    assert (lora_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (lora_run / "adapter" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and "eval/accuracy" in rows[1]

    assert main(["eval", "--run", str(lora_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == pytest.approx(summary["eval"])  # the saved adapter reproduces the run's score
    assert main(["eval", "--model", str(files["bert"]), "--train-file", str(files["cls"]),
                 "--adapter", str(lora_run / "adapter")]) == 0
    assert f"accuracy {summary['eval']:.4f}" in capsys.readouterr().out


def test_train_causal_lm_scalora(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "lm"
    argv = ["train", "--model", str(files["llama"]), "--train-file", str(files["lm"]), "--method", "scalora",
            "--steps", "3", "--batch-size", "4", "--max-length", "16", "--target-modules", "q_proj,v_proj",
            "--no-tensorboard", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "effective rank" in printed  # the summary table
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "scalora" and summary["metric"] == "exact_match"
    assert (out / "model" / "config.json").is_file()  # ScaLoRA folds its updates: a plain model is saved
    assert main(["eval", "--run", str(out)]) == 0
    assert "exact_match" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# Errors: exit code 2, the cause on stderr, no traceback.


def test_data_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "run")
    err = _user_error(capsys, _train_args(files, Path(out)) + ["--train-file", str(tmp_path / "missing.jsonl")])
    assert "missing.jsonl" in err and "no such file" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": 0}\n{"text": "broken", "label": 1\n')
    err = _user_error(capsys, _train_args(files, Path(out)) + ["--train-file", str(bad)])
    assert "line 2" in err and "invalid JSON" in err

    wrong = _write_jsonl(tmp_path / "wrong.jsonl", [{"sentence": "x", "label": 0}])
    err = _user_error(capsys, _train_args(files, Path(out)) + ["--train-file", str(wrong)])
    assert "line 1" in err and "'text' and 'label'" in err and "'sentence'" in err

    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"text": "x", "label": 0}, {"text": "y"}])
    err = _user_error(capsys, _train_args(files, Path(out)) + ["--train-file", str(partial)])
    assert "line 2" in err and "missing field 'label'" in err


def test_model_task_method_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    err = _user_error(capsys, _train_args(files, out) + ["--model", str(tmp_path / "no-such-model")])
    assert "no model folder" in err and "minilm" in err

    err = _user_error(capsys, ["train", "--task", "no-such-task", "--output-dir", str(out)])
    assert "unknown task 'no-such-task'" in err and "sarcasm" in err

    with pytest.raises(SystemExit) as exc:  # argparse checks the choice
        main(_train_args(files, out) + ["--method", "no-such-method"])
    assert exc.value.code == 2
    assert "invalid choice: 'no-such-method'" in capsys.readouterr().err

    err = _user_error(capsys, ["compare", "--methods", "lora,no-such-method", "--output-dir", str(out)])
    assert "unknown method 'no-such-method'" in err and "scalora" in err


def test_adapter_errors(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    err = _user_error(capsys, _train_args(files, out) + ["--r", "64"])
    assert "r=64" in err and "at most 32" in err

    err = _user_error(capsys, _train_args(files, out) + ["--target-modules", "no_such_layer"])
    assert "matches no module" in err and "attention.self.query" in err

    err = _user_error(capsys, _train_args(files, out) + ["--target-modules", r".*\.nothing"])
    assert "matches no module" in err


def test_run_folder_errors(lora_run: Path, files: dict[str, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture) -> None:
    err = _user_error(capsys, _train_args(files, lora_run, "--method", "lora"))
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err

    err = _user_error(capsys, _train_args(files, lora_run, "--method", "lora", "--resume", "--lr", "0.001"))
    assert "different configuration" in err and "lr" in err

    err = _user_error(capsys, _train_args(files, tmp_path / "fresh", "--resume"))
    assert "no checkpoint to resume" in err

    err = _user_error(capsys, ["eval", "--run", str(tmp_path / "fresh")])
    assert "no finished run" in err


def test_interrupt_says_how_to_resume(lora_run: Path, files: dict[str, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(cfg, log=print):
        raise KeyboardInterrupt

    monkeypatch.setattr("scalora.train.loop.train", interrupted)
    assert main(_train_args(files, lora_run, "--method", "lora", "--overwrite")) == 130
    err = capsys.readouterr().err
    assert str(lora_run / "checkpoint") in err and "step 4 of 4" in err
    assert "--resume" in err and "--overwrite" not in err

    assert main(_train_args(files, tmp_path / "new")) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint" in err and "--save-every" in err


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path],
                                                tmp_path: Path) -> None:
    def broken(cfg, log=print):
        raise RuntimeError("a bug")

    monkeypatch.setattr("scalora.train.loop.train", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(_train_args(files, tmp_path / "run"))


def test_subprocess_error_and_module_entry_point(files: dict[str, Path], tmp_path: Path, env_one_thread) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": 0}\nnot json\n')
    cmd = [sys.executable, "-m", "scalora", *_train_args(files, tmp_path / "run")[:-2], "--train-file", str(bad),
           "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env_one_thread, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "line 2" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# compare.


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def _quick_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """One thread per training subprocess and an offline hub: tiny models, no network waits."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_compare(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                 monkeypatch: pytest.MonkeyPatch) -> None:
    _quick_subprocesses(monkeypatch)
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,scalora", "--model", str(files["bert"]), "--train-file", str(files["cls"]),
            "--steps", "4", "--batch-size", "8", "--max-length", "24", "--eval-every", "2", "--no-tensorboard",
            "--threads", "1", "--output-dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    table = (out / "comparison.md").read_text()
    for method in ("lora", "scalora"):
        assert f"| {method} | " in table and f"| {method} | " in printed
        assert (out / method / "summary.json").is_file() and (out / method / "train.log").is_file()
    assert "eval accuracy" in table and "peak memory (MiB)" in table and "effective rank (mean)" in table
    for name in ("train_loss.png", "eval_metric.png", "effective_rank.png"):
        assert _is_png(out / name), name
    data = json.loads((out / "comparison.json").read_text())
    assert [m["method"] for m in data["methods"]] == ["lora", "scalora"]
    assert all(r["status"] == "ok" and r["summary"]["steps"] == 4 for r in data["runs"])

    err = _user_error(capsys, argv)  # the runs exist: refuse rather than train over them
    assert "already holds a run" in err
    assert main([*argv, "--resume"]) == 0  # finished runs are reused, not trained again
    assert printed.count("training 4 steps") == 2 and "reusing" in capsys.readouterr().out


def test_compare_reports_a_failed_method(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _quick_subprocesses(monkeypatch)
    out = tmp_path / "cmp"
    # α-LoRA holds out 256 training examples; the file has 54, so that run fails and the other one goes on
    argv = ["compare", "--methods", "alpha-lora,lora", "--model", str(files["bert"]), "--train-file",
            str(files["cls"]), "--steps", "2", "--batch-size", "8", "--max-length", "24", "--no-tensorboard",
            "--output-dir", str(out)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    table = (out / "comparison.md").read_text()
    assert "| alpha-lora | failed |" in table and "alpha-holdout" in table
    assert re.search(r"\| lora \| [01]\.\d{4} \|", table) and "failed" in captured.err
    assert _is_png(out / "train_loss.png")


def test_compare_interrupt_says_how_to_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("scalora.train.compare._run_job", interrupted)
    argv = ["compare", "--methods", "lora,scalora", "--steps", "3", "--output-dir", str(tmp_path / "cmp"),
            "--overwrite"]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert "lora: interrupted" in captured.out
    assert "scalora compare --methods lora,scalora" in captured.err and captured.err.rstrip().endswith("--resume")
    assert "--overwrite" not in captured.err


def test_demo_uses_one_thread_on_a_busy_machine(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    assert cli_compare._busy_machine_threads() == 1 and "busy (load 7.5 on 2 CPUs)" in capsys.readouterr().out
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.2, 0.1))
    assert cli_compare._busy_machine_threads() is None


def test_error_line() -> None:
    assert error_line("loading\nerror: the data is bad\n", 2) == "the data is bad"
    tb = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n"
    assert error_line(tb, 1) == "RuntimeError: boom"
    assert "SIGKILL" in error_line("", -9)


def test_compare_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = _user_error(capsys, ["compare", "--methods", "lora,lora", "--output-dir", str(tmp_path)])
    assert "more than once" in err
    err = _user_error(capsys, ["compare", "--seed", "1", "--seeds", "0,1", "--output-dir", str(tmp_path)])
    assert "--seeds" in err
    err = _user_error(capsys, ["compare", "--steps", "0", "--output-dir", str(tmp_path)])
    assert "steps must be a positive integer" in err


# ---------------------------------------------------------------------------------------------------------
# assets and demo.


def test_assets_status(capsys: pytest.CaptureFixture) -> None:
    assert main(["assets"]) == 0
    out = capsys.readouterr().out
    for name in assets.ASSETS:
        assert name in out
    assert ("present" in out or "missing" in out) and str(assets.cache_dir()) in out
    assert main(["assets", "status"]) == 0
    assert capsys.readouterr().out == out


def test_assets_fetch_errors(capsys: pytest.CaptureFixture) -> None:
    assert "unknown asset 'nope'" in _user_error(capsys, ["assets", "fetch", "nope"])
    assert "--all" in _user_error(capsys, ["assets", "fetch"])


def test_demo_fetches_the_assets_of_its_model_and_task() -> None:
    assert cli_compare.required_assets({"model": "minilm", "task": "sarcasm"}) == ["minilm", "evals"]
    assert cli_compare.required_assets({"model": "./mine", "task": "gsm"}) == ["reasoning-gym"]
    assert cli_compare.required_assets({"model": "./mine", "task": None}) == []


@pytest.mark.slow
def test_demo(minilm_path: Path, evals_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--steps", "6", "--train-size", "96", "--eval-size", "48",
            "--eval-every", "3", "--no-tensorboard"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "asset minilm: present" in printed and "demo finished" in printed
    table = (out / "comparison.md").read_text()
    for method in ("lora", "rslora", "scalora"):
        assert f"| {method} | " in table
    assert all(_is_png(out / name) for name in ("train_loss.png", "eval_metric.png", "effective_rank.png"))
    assert main(argv) == 0  # a second demo replaces the first
