"""The planted-teacher task (scalora.train.planted) and the demo's part built on it."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA
from scalora.train.demo import rank_demo
from scalora.train.planted import PlantedMethod, lr_schedule, pretrained_mlp, teacher_of, train_planted


def test_teacher_is_a_full_rank_change_of_the_student():
    student = pretrained_mlp(0)
    teacher = teacher_of(student, 0)
    diff = teacher[2].weight - student[2].weight
    assert torch.linalg.matrix_rank(diff) == 256
    assert not any(p.requires_grad for p in teacher.parameters())


def test_lora_stays_at_rank_r_while_scalora_and_full_fine_tuning_do_not():
    ranks = {}
    for name, method in {"full": PlantedMethod(0), "lora": PlantedMethod(4),
                         "scalora": PlantedMethod(4, ScaLoRA)}.items():
        curve = train_planted(method, 3e-3, seed=0, steps=40, eval_every=20)
        assert curve[0]["loss"] == 1.0 and [row["step"] for row in curve] == [0, 20, 40]
        assert curve[-1]["loss"] < 1.0, name
        ranks[name] = curve[-1]["rank"]
    assert ranks["lora"] == 4
    assert ranks["scalora"] > 4 * 4 and ranks["full"] > 4 * 4


def test_relora_method_takes_its_options():
    curve = train_planted(PlantedMethod(4, ReLoRA, {"reset_every": 10}), 3e-3, seed=1, steps=30, eval_every=30)
    assert curve[-1]["rank"] > 4  # three merges of rank 4


def test_rank_demo_writes_its_files(tmp_path):
    table = rank_demo(tmp_path, steps=24)
    assert "LoRA r=4" in table and "ScaLoRA r=4" in table and "full fine-tuning" in table
    curves = json.loads((tmp_path / "rank_decides.json").read_text())
    assert set(curves) == {"full fine-tuning", "LoRA r=4", "ScaLoRA r=4"}
    assert (tmp_path / "rank_decides.png").stat().st_size > 0


def test_lr_schedule_decays_to_zero_and_rewarms_relora_after_each_restart() -> None:
    assert lr_schedule(PlantedMethod(4), 100, "constant") is None
    cosine = lr_schedule(PlantedMethod(4), 100, "cosine")
    values = [cosine(step) for step in range(101)]
    assert values[0] == 1.0 and values[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in itertools.pairwise(values))  # monotone: no restart dips without ReLoRA
    jagged = lr_schedule(PlantedMethod(4, ReLoRA, {"reset_every": 40}), 100, "cosine")
    assert jagged(40) < cosine(40) / 5 and jagged(50) == pytest.approx(cosine(50))  # re-warm-up over 10 steps
    with pytest.raises(ValueError, match="schedule"):
        lr_schedule(PlantedMethod(4), 100, "linear")


def test_lr_schedule_warms_up_linearly_before_the_cosine() -> None:
    warm = lr_schedule(PlantedMethod(4), 100, "cosine", warmup=10)
    assert [warm(step) for step in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warm(100) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="cosine"):
        lr_schedule(PlantedMethod(4), 100, "constant", warmup=10)
