"""The synthetic ScaLoRA benchmark (benchmarks/scalora_synthetic.py): a smoke run and its central claims."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scalora_synthetic.py"
_SPEC = importlib.util.spec_from_file_location("scalora_synthetic", _PATH)
syn = importlib.util.module_from_spec(_SPEC)
sys.modules["scalora_synthetic"] = syn
_SPEC.loader.exec_module(syn)


def test_main_writes_json_and_figures(tmp_path) -> None:
    argv = ["--size", "small", "--steps", "30", "--lrs", "0.03", "--c-grid", "1", "10", "--targets", "gaussian",
            "--workers", "1", "--out-dir", str(tmp_path)]
    results = syn.main(argv)
    data = json.loads((tmp_path / "scalora_synthetic.json").read_text())
    assert (tmp_path / "scalora_synthetic.png").stat().st_size > 0
    assert (tmp_path / "scalora_c_sweep.png").stat().st_size > 0
    assert set(data["summary"]["gaussian"]) == set(syn.METHODS)
    assert [row["c"] for row in data["c_sweep"]["gaussian"]["by_lr"]["0.03"]["rows"]] == [1.0, 10.0]
    assert set(data["tuned"]["gaussian"]["methods"]) == set(syn.SCALORA_VARIANTS)
    run = data["runs"][0]
    assert run["curves"]["step"][-1] == 30 and len(run["curves"]["loss"]) == len(run["curves"]["step"])
    assert results["runtime_s"]["total"] > 0


def test_lora_stops_at_the_rank_floor_full_ft_and_scalora_go_below() -> None:
    w0, delta = syn.make_problem("gaussian", 0)
    floor = syn.rank_floor(delta)
    # The floor is the population loss of the best rank-4 update (Eckart–Young): W0 + D_4.
    u, s, vh = torch.linalg.svd(delta)
    best_rank4 = w0 + (u[:, :4] * s[:4]) @ vh[:4]
    assert abs(syn.population_loss(best_rank4, w0 + delta) - floor) < 1e-10
    assert 0.7 < floor < 0.85  # most of a Gaussian 64 × 64 matrix's energy is outside its top 4 directions

    def run(method: str, lr: float) -> dict:
        return syn.train(syn.RunSpec("gaussian", method, lr, seed=0, steps=300, eval_every=100, batch=128))

    lora, full, scalora = run("lora", 1e-2), run("full", 1e-2), run("scalora", 3e-2)
    assert lora["final_rank"] <= 4
    assert floor - 1e-6 <= lora["final_loss"] <= 1.02 * floor, (lora["final_loss"], floor)
    assert full["final_loss"] < 1e-3 * floor
    assert scalora["final_rank"] > 4 * 4, scalora["final_rank"]
    assert scalora["final_loss"] < 0.5 * floor, (scalora["final_loss"], floor)
    assert scalora["max_preservation_error"] < 1e-5
