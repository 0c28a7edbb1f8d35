"""The ScaLoRA study (benchmarks/scalora_study.py): a micro smoke run on a tiny local model, and time-to-target."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

from scalora.train.models import char_tokenizer, tiny_model

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scalora_study.py"
_SPEC = importlib.util.spec_from_file_location("scalora_study", _PATH)
study = importlib.util.module_from_spec(_SPEC)
sys.modules["scalora_study"] = study
_SPEC.loader.exec_module(study)


@pytest.fixture
def tiny_setup(tmp_path: Path) -> tuple[Path, Path]:
    model, tokenizer = tiny_model("bert", char_tokenizer(), num_labels=2, hidden=32, layers=2)
    folder = tmp_path / "tiny-bert"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    rng = random.Random(0)
    rows = []
    for i in range(80):
        label = i % 2
        word = rng.choice(["great", "fine", "nice"] if label else ["awful", "bad", "poor"])
        rows.append({"text": f"the {word} thing {i}", "label": label})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data


def test_main_micro_writes_json_and_figures(tmp_path: Path, tiny_setup: tuple[Path, Path]) -> None:
    model, data = tiny_setup
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--size", "micro", "--tasks", "sarcasm", "--methods", "lora,scalora", "--model", str(model),
            "--train-file", str(data), "--jobs", "0", "--window", "3", "--c-grid", "1", "10", "--lr-grid", "4",
            "--work-dir", str(work), "--out-dir", str(out)]
    result = study.main(argv)
    saved = json.loads((out / "scalora_study.json").read_text())
    for key in ("results", "table", "time_to_target", "ablations", "tables", "runs", "sizes", "environment"):
        assert key in saved, key
    assert not saved["failed"]
    assert {"lora", "scalora", "scalora-i", "scalora-scalar", "scalora-no-moments", "scalora-I100",
            "scalora-paper-c1", "scalora-paper-c10"} <= set(saved["results"]["sarcasm"])
    assert set(saved["ablations"]) == {"scaling", "moment transfer", "interval I", "c (paper rule)"}
    assert [r["setting"] for r in saved["ablations"]["c (paper rule)"]] == ["1", "10"]
    lora = saved["time_to_target"]["sarcasm"]["lora"]
    assert lora["reached"] == 1 and lora["seeds"][0]["step_ratio"] == pytest.approx(1.0)
    assert {"results", "loss", "rank", "time_to_target", "ablations", "lr_grid"} <= set(saved["tables"])
    # every method at 1× and 4× its learning rate, paired on the same seeds
    assert set(saved["lr_grid"]) == {"lora", "scalora"}
    for x in saved["lr_grid"].values():
        assert [r["mult"] for r in x["rows"]] == [1.0, 4.0]
        assert x["rows"][1]["lr"] == pytest.approx(4 * x["rows"][0]["lr"])
        assert x["best_mult_by_eval"] in (1.0, 4.0) and x["best_mult_by_loss"] in (1.0, 4.0)
    for name in ("scalora_study_curves.png", "scalora_study_rank.png", "scalora_study_ablations.png",
                 "scalora_study_lr_grid.png"):
        assert (out / name).stat().st_size > 0, name
    # LoRA's accumulated update stays within rank r = 8
    assert saved["results"]["sarcasm"]["lora"]["rank_max"] <= 8
    # re-running finds every run finished and runs nothing
    summaries = sorted(work.rglob("summary.json"))
    stamps = [p.stat().st_mtime_ns for p in summaries]
    study.main(argv)
    assert [p.stat().st_mtime_ns for p in summaries] == stamps
    assert result["runtime_s"] > 0


def test_time_to_target_uses_the_trailing_mean() -> None:
    steps = list(range(1, 11))
    times = [0.5] * 10
    losses = [5.0, 4.0, 3.0, 1.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    # one step at 1.0 (step 4) is not enough: the trailing mean of 3 must get there
    hit = study.time_to_target(steps, losses, times, target=2.0, window=3)
    # trailing means: s3=4, s4=2.67, s5=2.33, s6=2.0 → reached at step 6
    assert hit == {"step": 6, "time_s": pytest.approx(3.0)}
    assert study.time_to_target(steps, losses, times, target=0.5, window=3) is None
    # the target defined as the final trailing mean is always reached, at the latest on the last step
    target = study.final_loss(losses, 3)
    assert study.time_to_target(steps, losses, times, target, 3)["step"] <= 10
    slow = [x + 0.5 for x in losses]
    assert study.time_to_target(steps, slow, times, target, 3) is None
    with pytest.raises(ValueError):
        study.time_to_target(steps, losses[:-1], times, 2.0, 3)


def test_running_mean_starts_after_a_full_window() -> None:
    assert study.running_mean([1.0, 2.0, 3.0, 4.0], 2) == [None, 1.5, 2.5, 3.5]
