"""Smoke test of the facts arm of benchmarks/rank_decides.py (benchmarks/facts.py): a few steps of three methods."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rank_decides.py"


def test_facts_arm_writes_its_results(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("rank_decides", SCRIPT)
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study  # dataclasses look their module up there
    spec.loader.exec_module(study)
    study.main(["--size", "facts-micro", "--jobs", "1", "--methods", "full,lora-r4,scalora", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "rank_decides_facts-micro.json").read_text())
    assert result["tuning"]["full"]["grid"].keys() == {"0.0003"}  # full fine-tuning on its own grid
    assert result["tuning"]["scalora"]["grid"].keys() == {"0.001", "0.002"}
    lora = result["table"]["lora-r4"]
    assert lora["ratio_to_lora_r4"] == [1.0] and lora["final_rank"][0] <= 4
    runs = result["runs"]
    assert len({run["curve"][0]["loss"] for run in runs}) == 1  # one model, table and head for all methods
    assert all(run["final"] < run["curve"][0]["loss"] for run in runs)  # four steps already lower the loss
    assert "Gate:" in (tmp_path / "rank_decides_facts-micro.md").read_text()
