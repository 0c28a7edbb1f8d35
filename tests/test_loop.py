"""The training loop end to end: every method on tiny local models and on MiniLM, saved results, exact resume
(in-process and after a real SIGKILL), checkpoint write failures, configuration and data errors, NaN handling."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tiny import write_jsonl
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import scalora
from scalora.errors import ConfigError, ScaloraError
from scalora.train import checkpoint as ckpt_mod
from scalora.train import loop, statefile
from scalora.train.checkpoint import CheckpointError
from scalora.train.config import TrainConfig
from scalora.train.data import DataError
from scalora.train.loop import TrainingError, train
from scalora.train.models import load_model, tiny_model
from scalora.train.registry import METHODS
from scalora.train.tasks import load_task

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER_METHODS = tuple(m.name for m in METHODS.values() if m.result == "adapter")
R = 2
NEG = ("bad awful poor", "terrible sad dull", "ugly broken wrong", "boring slow weak")
POS = ("good nice great", "lovely happy fine", "bright clever right", "fun quick strong")


# ---------------------------------------------------------------------------------------------------------
# Tiny models and data files, written once per module.


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loop")
    bert, tok = tiny_model("bert", num_labels=2, hidden=32, layers=2)
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    llama, tok = tiny_model("llama", hidden=32, layers=2)
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    gpt2, tok = tiny_model("gpt2", hidden=32, layers=2)  # tied input and output embeddings
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    cls_rows = [{"text": f"{(POS if i % 2 else NEG)[i % 4]} {i}", "label": i % 2} for i in range(64)]
    lm_rows = [{"prompt": f"{i} plus one is", "completion": f" {i + 1}"} for i in range(40)]
    return {"bert": root / "bert", "llama": root / "llama", "gpt2": root / "gpt2",
            "cls": write_jsonl(root / "cls.jsonl", cls_rows), "lm": write_jsonl(root / "lm.jsonl", lm_rows)}


def make_cfg(out: Path, model: Path | str, train_file: Path | None, method: str = "lora",
             **overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = dict(
        model=str(model), task=None, train_file=str(train_file), method=method, steps=10, batch_size=8, r=R,
        max_length=32, eval_size=8, eval_batch_size=16, alpha_holdout=8, alpha_every=2, output_dir=str(out),
        progress=False, tensorboard=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def quiet_train(cfg: TrainConfig) -> loop.RunResult:
    return train(cfg, log=lambda _: None)


def metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / loop.METRICS).read_text().splitlines() if line.strip()]


def probe_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(["good nice great 7", "bad awful 12", "3 plus one is"], padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def capture_final_logits(monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Record the trained model's logits on `probe_batch` just before the loop saves (and maybe merges) it."""
    captured: dict[str, torch.Tensor] = {}
    original = loop._save_result

    def wrapper(cfg: TrainConfig, out: Path, model: torch.nn.Module, tokenizer: Any, pretrained: Any) -> Any:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            captured["logits"] = model(**probe_batch(tokenizer)).logits.detach().clone()
        model.train(was_training)
        return original(cfg, out, model, tokenizer, pretrained)

    monkeypatch.setattr(loop, "_save_result", wrapper)
    return captured


def logits_of(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**probe_batch(tokenizer)).logits


def check_run(result: loop.RunResult, cfg: TrainConfig, kind: str, captured: dict[str, torch.Tensor]) -> None:
    """summary.json, one metrics row per step, the saved result of the right kind giving the trained model's
    logits and eval."""
    out = result.output_dir
    summary = json.loads((out / loop.SUMMARY).read_text())
    assert summary["method"] == cfg.method and summary["steps"] == cfg.steps
    assert math.isfinite(summary["final_train_loss"]) and 0.0 <= summary["eval"] <= 1.0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, cfg.steps + 1))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert f"eval/{summary['metric']}" in rows[-1]
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == cfg.steps

    task = load_task(None, train_file=cfg.train_file, eval_size=cfg.eval_size, seed=cfg.seed)
    if cfg.method in ADAPTER_METHODS:
        assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "model").exists()
        assert summary["saved"] == {"adapter": str(out / "adapter")}
        fresh, tokenizer = load_model(cfg.model, kind, num_labels=task.num_labels)
        scalora.load_adapter(fresh, out / "adapter")
        assert torch.equal(logits_of(fresh, tokenizer), captured["logits"])
    else:
        assert (out / "model" / "config.json").is_file() and not (out / "adapter").exists()
        assert summary["saved"] == {"model": str(out / "model")}
        auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
        fresh = auto.from_pretrained(out / "model")
        tokenizer = AutoTokenizer.from_pretrained(out / "model")
        torch.testing.assert_close(logits_of(fresh, tokenizer), captured["logits"], rtol=1e-5, atol=1e-5)
    evaluated = task.evaluate(fresh, tokenizer, max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                              limit=cfg.eval_limit)
    assert evaluated[task.metric] == summary["eval"]


# ---------------------------------------------------------------------------------------------------------
# Every method, end to end.


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_classification(method: str, files: dict[str, Path], tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    captured = capture_final_logits(monkeypatch)
    interval = 3 if method == "scalora-i" else None  # scalora-i's default of 10 would scale only once here
    cfg = make_cfg(tmp_path / method, files["bert"], files["cls"], method, scalora_interval=interval)
    result = quiet_train(cfg)
    check_run(result, cfg, "classification", captured)
    rows, summary = metrics(result.output_dir), result.summary
    scaling = [r for r in rows if "scalora/column" in r]
    if method == "scalora":
        assert [r["step"] for r in scaling] == list(range(1, cfg.steps + 1))
    elif method == "scalora-i":
        assert [r["step"] for r in scaling] == [3, 6, 9]
    else:
        assert not scaling
    for row in scaling:
        assert row["scalora/layers"] > 0
        assert math.isclose(row["scalora/column"] + row["scalora/scalar"] + row["scalora/identity"], 1.0)
    if method == "alpha-lora":
        assert [r["step"] for r in rows if "alpha/heldout_loss" in r] == [2, 4, 6, 8, 10]
    if method in ("lora", "rslora"):
        assert summary["rank/max"] <= R
    if method in ("scalora", "relora", "full"):
        assert summary["rank/max"] > R  # the accumulated update leaves rank r
    assert summary["label_names"] == ["0", "1"]


@pytest.mark.parametrize("method", ["lora", "scalora"])
def test_causal_lm_from_prompt_completion_file(method: str, files: dict[str, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    captured = capture_final_logits(monkeypatch)
    cfg = make_cfg(tmp_path / method, files["llama"], files["lm"], method, eval_limit=4)
    result = quiet_train(cfg)
    check_run(result, cfg, "causal_lm", captured)
    assert result.summary["metric"] == "exact_match"
    if method == "scalora":
        assert all("scalora/column" in r for r in metrics(result.output_dir))
        assert result.summary["rank/max"] > R
    else:
        assert result.summary["rank/max"] <= R


@pytest.mark.parametrize("method", ["lora", "scalora"])
def test_minilm_sarcasm(method: str, minilm_path: Path, evals_path: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="minilm", task="sarcasm", method=method, steps=3, batch_size=8, r=4, max_length=32,
                      train_size=32, eval_size=16, eval_limit=16, output_dir=str(tmp_path / method), progress=False,
                      tensorboard=False, rank_layers=2)
    result = quiet_train(cfg)
    summary = json.loads((tmp_path / method / loop.SUMMARY).read_text())
    assert summary["task"] == "sarcasm" and math.isfinite(summary["final_train_loss"])
    assert 0.0 <= summary["eval"] <= 1.0 and summary["label_names"] == ["not sarcastic", "sarcastic"]
    rows = metrics(result.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    if method == "scalora":
        assert all("scalora/column" in r for r in rows)
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / method / "model")
        assert model.config.id2label == {0: "not sarcastic", 1: "sarcastic"}
    else:
        assert (tmp_path / method / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("kind", [
    "causal_lm",
    "classification",
])
def test_export_rank_reproduces_the_merged_model(kind: str, files: dict[str, Path], tmp_path: Path) -> None:
    model_dir, data = (files["llama"], files["lm"]) if kind == "causal_lm" else (files["bert"], files["cls"])
    cfg = make_cfg(tmp_path, model_dir, data, "scalora", export_rank=16, eval_limit=2)
    saved = quiet_train(cfg).summary["saved"]
    assert saved["export"] == str(tmp_path / "adapter-rank16") and float(saved["export_max_residual"]) < 1e-4
    auto = AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM
    merged = auto.from_pretrained(tmp_path / "model")
    fresh, tokenizer = load_model(model_dir, kind, num_labels=2)
    scalora.load_adapter(fresh, tmp_path / "adapter-rank16")
    torch.testing.assert_close(logits_of(fresh, tokenizer), logits_of(merged, tokenizer), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Exact resume.


def final_state(out: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = out / "checkpoint"
    return load_file(folder / "model.safetensors"), ckpt_mod.read_state(folder)


def assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same final weights, optimiser (and α optimiser) state, schedule, and per-step losses."""
    ref_model, ref_state = final_state(reference)
    new_model, new_state = final_state(resumed)
    assert_identical(ref_model, new_model, "model")
    for key in ("optimizer", "scheduler", "alpha"):
        assert_identical(ref_state.get(key), new_state.get(key), key)
    assert_identical(ref_state["rng"]["torch"], new_state["rng"]["torch"], "rng")
    assert [r["loss"] for r in metrics(reference)] == [r["loss"] for r in metrics(resumed)]
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        if (reference / name).exists():
            assert_identical(load_file(reference / name), load_file(resumed / name), name)


def interrupt_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    """Make the k-th call of `train_step` (the forward/backward of step k) raise KeyboardInterrupt."""
    original = loop.train_step
    calls = {"n": 0}

    def step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return original(model, batches)

    monkeypatch.setattr(loop, "train_step", step)


@pytest.mark.parametrize(("method", "model", "extra"), [
    ("lora", "bert", {}),
    ("scalora", "bert", {}),  # its base weights change
    ("alpha-lora", "bert", {}),  # its α vectors, their own optimiser, the held-out batches
    ("scalora-i", "bert", {"scalora_interval": 3, "grad_accum": 2, "lora_dropout": 0.1}),
    ("relora", "bert", {"relora_every": 2}),  # resets, pruned moments, jagged schedule
    ("full", "gpt2", {"eval_limit": 2}),  # tied input and output embeddings
], ids=["lora", "scalora", "alpha-lora", "scalora-i-accum-dropout", "relora", "full-gpt2-tied"])
def test_resume_after_interrupt_is_bitwise_identical(method: str, model: str, extra: dict[str, Any],
                                                     files: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    data = files["cls"] if model == "bert" else files["lm"]
    reference = make_cfg(tmp_path / "reference", files[model], data, method, steps=6, save_every=2, **extra)
    quiet_train(reference)

    cfg = make_cfg(tmp_path / "killed", files[model], data, method, steps=6, save_every=2, **extra)
    interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        quiet_train(cfg)
    monkeypatch.undo()
    out = Path(cfg.output_dir)
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"] == 4
    assert not (out / loop.SUMMARY).exists()

    resumed = quiet_train(make_cfg(out, files[model], data, method, steps=6, save_every=2, resume=True, **extra))
    assert_same_run(Path(reference.output_dir), out)
    assert resumed.summary["eval"] == json.loads((Path(reference.output_dir) / loop.SUMMARY).read_text())["eval"]


KILL_SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from scalora.train import loop
    from scalora.train.loop import train
    from scalora.train.config import TrainConfig
    torch.set_num_threads(1)
    original, calls = loop.train_step, [0]
    def slow_step(model, batches):  # from step k on, leave time to kill it; the computation is unchanged
        calls[0] += 1
        if calls[0] >= int(sys.argv[2]):
            time.sleep(0.5)
        return original(model, batches)
    loop.train_step = slow_step
    train(TrainConfig(**json.loads(sys.argv[1])), log=lambda _: None)
""")


def test_resume_after_sigkill_is_bitwise_identical(files: dict[str, Path], tmp_path: Path) -> None:
    steps, k = 12, 4
    reference = make_cfg(tmp_path / "reference", files["bert"], files["cls"], "scalora", steps=steps, save_every=2)
    quiet_train(reference)

    cfg = make_cfg(tmp_path / "killed", files["bert"], files["cls"], "scalora", steps=steps, save_every=2)
    out = Path(cfg.output_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfg.to_dict()), str(k)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "trainer_state.json"
    deadline = time.monotonic() + 240
    try:
        while True:
            try:
                if json.loads(state.read_text())["step"] >= k:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, f"the training process ended early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint appeared in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    saved_step = json.loads(ckpt_mod.find(out).joinpath("trainer_state.json").read_text())["step"]
    assert k <= saved_step < steps and not (out / loop.SUMMARY).exists()

    quiet_train(make_cfg(out, files["bert"], files["cls"], "scalora", steps=steps, save_every=2, resume=True))
    assert_same_run(Path(reference.output_dir), out)
    assert not list(out.glob(".checkpoint-*")) and not list(out.glob(".model-*"))


# ---------------------------------------------------------------------------------------------------------
# Checkpoint write failures.


def fail_on_call(n: int, original: Callable[..., Any], condition: Callable[..., bool] = lambda *a: True
                 ) -> Callable[..., Any]:
    """`original`, except that its n-th call for which `condition` holds raises OSError (a full disk)."""
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if condition(*args):
            calls["n"] += 1
            if calls["n"] == n:
                raise OSError(28, "No space left on device")
        return original(*args, **kwargs)

    return wrapper


def new_checkpoint_rename(src: Any, dst: Any) -> bool:
    return Path(dst).name == "checkpoint" and Path(src).name.startswith(ckpt_mod.TMP_PREFIX)


@pytest.mark.parametrize("where", ["weights", "training state", "rename"])
def test_failed_checkpoint_write_keeps_previous_checkpoint(where: str, files: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    reference = make_cfg(tmp_path / "reference", files["bert"], files["cls"], "lora", steps=4, save_every=2)
    quiet_train(reference)

    cfg = make_cfg(tmp_path / "run", files["bert"], files["cls"], "lora", steps=4, save_every=2)
    out = Path(cfg.output_dir)
    if where == "weights":
        monkeypatch.setattr(ckpt_mod, "save_file", fail_on_call(2, ckpt_mod.save_file))
    elif where == "training state":  # the weights are already written when the training state fails
        monkeypatch.setattr(statefile, "save_file", fail_on_call(2, statefile.save_file))
    else:  # between moving the old checkpoint aside and putting the new one in place
        monkeypatch.setattr(os, "replace", fail_on_call(2, os.replace, new_checkpoint_rename))
    with pytest.raises(OSError, match="No space left"):
        quiet_train(cfg)
    monkeypatch.undo()

    assert not list(out.glob(".checkpoint-*"))
    folder = ckpt_mod.find(out)
    assert folder is not None and folder.name == ("checkpoint.old" if where == "rename" else "checkpoint")
    assert ckpt_mod.load(out, cfg).step == 2
    if where == "rename":  # resumed from checkpoint.old, the next save fails too: checkpoint.old must survive it
        monkeypatch.setattr(os, "replace", fail_on_call(1, os.replace, new_checkpoint_rename))
        with pytest.raises(OSError, match="No space left"):
            quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=4, save_every=2, resume=True))
        monkeypatch.undo()
        assert ckpt_mod.load(out, cfg).step == 2
    quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=4, save_every=2, resume=True))
    assert_same_run(Path(reference.output_dir), out)
    assert not (out / "checkpoint.old").exists() and not list(out.glob(".checkpoint-*"))


def test_unreadable_checkpoint_is_a_checkpoint_error(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, files["bert"], files["cls"], "lora", steps=2)
    quiet_train(cfg)
    (tmp_path / "checkpoint" / ckpt_mod.STATE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot be read"):
        quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "lora", steps=2, resume=True))


def test_checkpoint_missing_a_trained_tensor_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, files["bert"], files["cls"], "alpha-lora", steps=2)
    quiet_train(cfg)
    path = tmp_path / "checkpoint" / "model.safetensors"
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(".alpha_vector")}
    from safetensors.torch import save_file

    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="alpha_vector"):
        quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "alpha-lora", steps=2, resume=True))


# ---------------------------------------------------------------------------------------------------------
# Existing runs, resume and overwrite.


def test_resume_overwrite_and_existing_runs(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"

    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=3, resume=True))

    quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=3))
    with pytest.raises(ScaloraError, match="already holds a run.*--resume.*--overwrite"):
        quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=3))

    for field, value in [("lr", 1e-3), ("method", "rslora"), ("seed", 1), ("steps", 4)]:
        with pytest.raises(CheckpointError, match=rf"different configuration \({field}: checkpoint"):
            quiet_train(make_cfg(out, files["bert"], files["cls"], **{"method": "lora", "steps": 3, "resume": True,
                                                                     field: value}))

    # options that do not change the computation may differ; the finished run is evaluated again
    again = quiet_train(make_cfg(out, files["bert"], files["cls"], "lora", steps=3, resume=True, log_every=5,
                                 eval_every=7))
    assert [r["step"] for r in metrics(out)] == [1, 2, 3] and math.isfinite(again.summary["eval"])

    # overwrite starts over, and no file of the old run survives beside the new one
    (out / "adapter-rank2").mkdir()
    fresh = quiet_train(make_cfg(out, files["bert"], files["cls"], "scalora", steps=2, overwrite=True))
    assert fresh.summary["method"] == "scalora"
    assert [r["step"] for r in metrics(out)] == [1, 2]
    assert (out / "model").is_dir() and not (out / "adapter").exists() and not (out / "adapter-rank2").exists()
    assert json.loads((out / "checkpoint" / "trainer_state.json").read_text())["config"]["method"] == "scalora"


# ---------------------------------------------------------------------------------------------------------
# Custom data.


def test_csv_with_string_labels(files: dict[str, Path], tmp_path: Path) -> None:
    lines = ["text,label"] + [f'"{(POS if i % 2 else NEG)[i % 4]}, {i}",{"pos" if i % 2 else "neg"}'
                              for i in range(40)]
    data = tmp_path / "reviews.csv"
    data.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tmp_path / "run", files["bert"], data, "full", steps=2)
    result = quiet_train(cfg)
    assert result.summary["task"] == "reviews" and result.summary["label_names"] == ["neg", "pos"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}


def test_jsonl_with_three_string_labels_and_eval_file(files: dict[str, Path], tmp_path: Path) -> None:
    names = ("angry", "calm", "happy")
    train_rows = [{"text": f"{names[i % 3]} words {i}", "label": names[i % 3]} for i in range(30)]
    eval_rows = [{"text": f"{names[i % 3]} other {i}", "label": names[i % 3]} for i in range(6)]
    bert, tok = tiny_model("bert", num_labels=3, hidden=32, layers=2)
    bert.save_pretrained(tmp_path / "bert3")
    tok.save_pretrained(tmp_path / "bert3")
    cfg = make_cfg(tmp_path / "run", tmp_path / "bert3", write_jsonl(tmp_path / "train.jsonl", train_rows), "lora",
                   steps=2, eval_file=str(write_jsonl(tmp_path / "eval.jsonl", eval_rows)), eval_size=None)
    result = quiet_train(cfg)
    assert result.summary["label_names"] == list(names)
    state = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert state["base_model.model.classifier.weight"].shape[0] == 3


def test_model_with_a_head_of_another_size(files: dict[str, Path], tmp_path: Path) -> None:
    rows = [{"text": f"{('a', 'b', 'c')[i % 3]} {i}", "label": i % 3} for i in range(30)]
    result = quiet_train(make_cfg(tmp_path / "run", files["bert"], write_jsonl(tmp_path / "three.jsonl", rows),
                                  steps=1))
    assert result.summary["label_names"] == ["0", "1", "2"]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("broken.jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": "c", "label": \n',
     r"broken.jsonl line 3: invalid JSON"),
    ("missing.jsonl", '{"text": "a", "label": 0}\n{"text": "b"}\n', r"missing.jsonl line 2: missing field 'label'"),
    ("wide.csv", 'text,label\na,0\nb,1\nc,0,extra\n', r"wide.csv line 4: more values"),
    ("header.csv", 'sentence,y\na,0\n', r"header.csv line 1: the header has columns"),
])
def test_malformed_file_names_the_line(name: str, content: str, message: str, files: dict[str, Path],
                                       tmp_path: Path) -> None:
    data = tmp_path / name
    data.write_text(content)
    with pytest.raises(DataError, match=message):
        quiet_train(make_cfg(tmp_path / "run", files["bert"], data, "lora", steps=2))


def test_alpha_lora_needs_enough_data_for_its_holdout(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="alpha-holdout"):
        quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "alpha-lora", alpha_holdout=60))


# ---------------------------------------------------------------------------------------------------------
# NaN and infinite values.


def test_divergence_raises_and_keeps_last_good_checkpoint(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, files["bert"], files["cls"], "full", lr=1e6, max_grad_norm=None, save_every=1)
    with pytest.raises(TrainingError, match="NaN or infinite"):
        quiet_train(cfg)
    saved = ckpt_mod.load(tmp_path, cfg)
    assert 1 <= saved.step < cfg.steps
    assert all(bool(t.isfinite().all()) for t in saved.model.values() if t.is_floating_point())


def inject(monkeypatch: pytest.MonkeyPatch, install: Callable[[torch.nn.Module], None]) -> None:
    """Let `install` add hooks to the model the loop loads."""
    original = loop.load_model

    def load(*args: Any, **kwargs: Any) -> Any:
        model, tokenizer = original(*args, **kwargs)
        install(model)
        return model, tokenizer

    monkeypatch.setattr(loop, "load_model", load)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nan_stops_before_a_bad_checkpoint_and_resume_recovers(what: str, files: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN loss (or, with clipping, an infinite gradient) at step 3: TrainingError, checkpoint 2 intact."""
    calls = {"n": 0}

    def install(model: torch.nn.Module) -> None:
        if what == "loss":
            def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
                if module.training:
                    calls["n"] += 1
                    return output * float("nan") if calls["n"] == 3 else None
                return None

            model.classifier.register_forward_hook(hook)
        else:
            def grad_hook(grad: torch.Tensor) -> torch.Tensor | None:
                calls["n"] += 1
                return torch.full_like(grad, float("inf")) if calls["n"] == 3 else None

            model.classifier.weight.register_hook(grad_hook)

    inject(monkeypatch, install)
    cfg = make_cfg(tmp_path, files["bert"], files["cls"], "scalora", steps=4, save_every=1)
    with pytest.raises(TrainingError, match="NaN or infinite"):
        quiet_train(cfg)
    monkeypatch.undo()
    saved = ckpt_mod.load(tmp_path, cfg)
    assert saved.step == 2
    assert all(bool(t.isfinite().all()) for t in saved.model.values() if t.is_floating_point())
    result = quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "scalora", steps=4, save_every=1,
                                  resume=True))
    assert math.isfinite(result.summary["final_train_loss"])


def test_overwrite_with_a_bad_option_keeps_the_old_run(files: dict[str, Path], tmp_path: Path) -> None:
    quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "lora", steps=2))
    before = (tmp_path / loop.SUMMARY).read_text()
    with pytest.raises(DataError):
        quiet_train(make_cfg(tmp_path, files["bert"], tmp_path / "typo.jsonl", "lora", steps=2, overwrite=True))
    assert (tmp_path / loop.SUMMARY).read_text() == before
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_full_fine_tuning_ignores_the_adapter_rank(files: dict[str, Path], tmp_path: Path) -> None:
    result = quiet_train(make_cfg(tmp_path, files["bert"], files["cls"], "full", steps=2, r=64))
    assert math.isfinite(result.summary["final_train_loss"])


def test_library_api_trains_from_a_file_without_naming_a_task(files: dict[str, Path], tmp_path: Path) -> None:
    cfg = TrainConfig(model=str(files["bert"]), train_file=str(files["cls"]), steps=1, batch_size=4, eval_size=4,
                      output_dir=str(tmp_path), progress=False, tensorboard=False)
    assert cfg.task is None
    assert quiet_train(cfg).summary["steps"] == 1
