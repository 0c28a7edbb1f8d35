"""Smoke tests of the two study scripts (benchmarks/rslora_rank.py, benchmarks/alpha_lora_practice.py) on tiny
random models and tiny data files: they run end to end, write the JSON and PNG, and their numbers are consistent."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest

from scalora.train.models import tiny_model

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


rslora_rank = _load("rslora_rank")
alpha_lora_practice = _load("alpha_lora_practice")


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    """Tiny BERT and Llama folders (character tokenizer) and tiny classification / prompt-completion files."""
    root = tmp_path_factory.mktemp("tiny-study")
    for arch in ("bert", "llama"):
        model, tokenizer = tiny_model(arch, hidden=32, layers=2)
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
    rng = random.Random(0)
    with (root / "cls.jsonl").open("w") as f:
        for i in range(120):
            label = i % 2
            f.write(json.dumps({"text": ("good fun " if label else "bad sad ") * rng.randint(1, 3), "label": label})
                    + "\n")
    with (root / "lm.jsonl").open("w") as f:
        for _ in range(120):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "completion": f" {a + b}"}) + "\n")
    return {"bert": str(root / "bert"), "llama": str(root / "llama"), "cls": str(root / "cls.jsonl"),
            "lm": str(root / "lm.jsonl")}


def _tiny_args(assets: dict[str, str]) -> list[str]:
    return ["--minilm-model", assets["bert"], "--minilm-train-file", assets["cls"], "--smollm2-model",
            assets["llama"], "--smollm2-train-file", assets["lm"], "--batch-size", "4", "--max-length", "32",
            "--train-size", "80"]


def test_rslora_rank_main(tiny_assets, tmp_path) -> None:
    out = tmp_path / "out"
    argv = [*_tiny_args(tiny_assets), "--ranks", "4", "--steps", "3", "--last-k", "2", "--grad-steps", "2",
            "--sweep-rank", "4", "--sweep-lrs", "2.5e-4", "--out-dir", str(out), "--work-dir", str(tmp_path / "runs")]
    data = rslora_rank.main(argv)
    saved = json.loads((out / rslora_rank.OUT_JSON).read_text())
    assert (out / rslora_rank.OUT_FIG).stat().st_size > 0
    assert (out / rslora_rank.OUT_SWEEP_FIG).stat().st_size > 0
    assert {"study", "command", "size", "environment", "settings", "results", "runtime_s", "figures"} <= set(saved)
    assert saved["command"].startswith("python ") and "--sweep-lrs" in saved["command"]
    assert data["runtime_s"] > 0
    minilm, smol = saved["results"]["minilm"], saved["results"]["smollm2"]
    # the largest rank the tiny layers allow: BERT 32 (hidden), Llama 16 (2 KV heads x 8)
    assert minilm["ranks"] == [4, 32] and minilm["max_rank"] == 32
    assert smol["ranks"] == [4, 16] and smol["max_rank"] == 16
    tables = (out / rslora_rank.OUT_MD).read_text()
    assert tables.count("| r | s (α/r) |") == 2 and "| 32 | " in tables and "| lr | α/r | α/√r |" in tables
    for res in (minilm, smol):
        by_method = res["summary"]["by_method"]
        assert set(by_method) == {"lora", "rslora"}
        assert [row["r"] for row in by_method["lora"]["rows"]] == res["ranks"]
        for row in by_method["rslora"]["rows"]:
            assert math.isfinite(row["final_loss"]["mean"]) and row["adapter_grad_norm"]["mean"] > 0
        assert {p["lr"] for p in res["summary"]["lr_sweep"]["lora"]} == {2.5e-4, 5e-4}
        assert res["summary"]["lr_sqrt_r_pairs"][0]["lora_lr"] == pytest.approx(5e-4)  # rslora 2.5e-4 x √4
    # the probe replays the logged run exactly
    assert all(run["probe_max_loss_diff"] == 0.0 for run in minilm["runs"])
    # step 1: B = 0, so A has no gradient and B's gradient is proportional to the scale s (same batch, same A init)
    for r in (4, 32):
        lora, rs = (next(x for x in minilm["runs"] if x["method"] == m and x["r"] == r and x["lr"] == 5e-4)
                    for m in ("lora", "rslora"))
        assert lora["probe"]["A"][0] == 0.0
        assert lora["probe"]["B"][0] / rs["probe"]["B"][0] == pytest.approx(1 / math.sqrt(r), rel=1e-5)
    # the runs were kept in the work dir, and --reuse reads them (and the probes) back instead of training again
    assert (tmp_path / "runs" / "minilm" / "lora-r4-lr0.0005-s0" / "metrics.jsonl").is_file()
    again = rslora_rank.main([*argv, "--reuse", "--tag", "again"])
    assert (out / "rslora_rank_again.json").is_file()
    runs = again["results"]["minilm"]["runs"] + again["results"]["smollm2"]["runs"]
    assert all(run["reused"] for run in runs)
    assert [run["final_loss"] for run in runs] == [run["final_loss"] for run in minilm["runs"] + smol["runs"]]
    assert [run["probe"] for run in again["results"]["minilm"]["runs"]] == [run["probe"] for run in minilm["runs"]]


def test_alpha_lora_practice_main(tiny_assets, tmp_path) -> None:
    out = tmp_path / "out"
    argv = [*_tiny_args(tiny_assets), "--steps", "6", "--alpha-holdout", "16", "--alpha-every", "2", "--seeds", "0",
            "1", "--out-dir", str(out)]
    alpha_lora_practice.main(argv)
    saved = json.loads((out / alpha_lora_practice.OUT_JSON).read_text())
    assert (out / alpha_lora_practice.OUT_FIG).stat().st_size > 0
    tables = (out / alpha_lora_practice.OUT_MD).read_text()
    assert "| α-LoRA − LoRA |" in tables and "seed agreement (r)" in tables
    assert all(f"| {part}, " in tables for part in saved["results"])
    assert {"study", "command", "size", "environment", "settings", "results", "runtime_s", "figures"} <= set(saved)
    for name, n_types in (("minilm", 6), ("smollm2", 7)):
        res = saved["results"][name]
        summ = res["summary"]
        assert set(summ["accuracy"]) == {"lora", "alpha-lora", "alpha-frozen"} and summ["accuracy"]["lora"]["n"] == 2
        for key in ("alpha_minus_lora", "alpha_minus_frozen", "frozen_minus_lora"):
            assert summ[f"paired_difference_{key}"]["n"] == 2
        assert summ["alpha_steps"] == 3
        assert summ["alpha_seed_agreement"]["seeds"] == 2  # read back from the runs' adapters
        assert len(summ["alpha_by_type"]) == n_types
        for info in summ["alpha_by_type"].values():
            assert [e["depth"] for e in info["by_depth"]] == [0, 1]
        alpha_runs = [x for x in res["runs"] if x["method"] == "alpha-lora"]
        assert len(alpha_runs) == 2
        for run in alpha_runs:
            assert len(run["alpha_heldout_loss"]) == 3  # steps 2, 4, 6
            # the vectors moved from 1 (3 Adam steps of lr 5e-3), but not far
            assert 0 < run["alpha_overall"]["std"] < 0.05 and abs(run["alpha_overall"]["mean"] - 1) < 0.05
        # the control keeps α at 1 (learning rate 1e-12) on the same split and batches as alpha-lora
        for run in (x for x in res["runs"] if x["method"] == "alpha-frozen"):
            assert abs(run["alpha_overall"]["min"] - 1) < 1e-6 and abs(run["alpha_overall"]["max"] - 1) < 1e-6
            twin = next(x for x in alpha_runs if x["seed"] == run["seed"])
            assert run["loss_curve"][0] == twin["loss_curve"][0]  # same first batch, α not yet stepped
    assert len(saved["results"]["smollm2"]["base_model"]) == 2  # the untrained model, per seed
