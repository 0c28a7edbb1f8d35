"""Smoke test of benchmarks/rank_decides.py at its micro size: tuning, held-out seeds, gate, tables, figure."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "rank_decides.py"


def test_micro_study_writes_its_results(tmp_path):
    spec = importlib.util.spec_from_file_location("rank_decides", SCRIPT)
    study = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = study  # dataclasses look their module up there
    spec.loader.exec_module(study)
    study.main(["--size", "micro", "--jobs", "1", "--methods", "full,lora-r4,relora,scalora,scalora-paper",
                "--out", str(tmp_path)])
    result = json.loads((tmp_path / "rank_decides_micro.json").read_text())
    assert set(result["table"]) == {"full", "lora-r4", "relora", "scalora", "scalora-paper"}
    assert set(result["gate"]) == {"full", "lora_r4", "ratio", "passed"}
    for name, row in result["tuning"].items():
        assert row["best_lr"] in (1e-3, 3e-3, 1e-2), name
    lora = result["table"]["lora-r4"]
    assert lora["ratio_to_lora_r4"] == [1.0] and lora["final_rank"] == [4]
    assert result["table"]["scalora"]["final_rank"][0] > 4
    assert "Gate:" in (tmp_path / "rank_decides_micro.md").read_text()
    assert (tmp_path / "rank_decides_micro.png").stat().st_size > 0
    assert set(result["factor_norm"]) == {"0.3"}
