"""benchmarks/step_ops.py: a ScaLoRA step's operations grow by one per adapted layer (its fold), not per layer's
rescaling: the pieces, rescalings, moment transforms and optimiser directions are multi-tensor or batched per group."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_ops.py"
sys.path.insert(0, str(_PATH.parent))
_SPEC = importlib.util.spec_from_file_location("step_ops", _PATH)
step_ops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(step_ops)


def test_a_scaling_step_adds_one_operation_per_adapted_layer(tmp_path) -> None:
    report = step_ops.main(["--blocks", "1", "3", "--hidden", "32", "--r", "4", "--out", str(tmp_path / "ops.json")])
    rows = report["rows"]
    assert [row["layers"] for row in rows] == [7, 21]
    assert all(row["scalora"] > row["adamw"] > 0 for row in rows)
    assert report["extra_per_layer"] <= 2.0, report["extra_per_layer"]  # the fold, one addmm_ per layer
    assert (tmp_path / "ops.md").read_text().count("|") > 10
