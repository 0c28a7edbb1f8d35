"""Smoke test of benchmarks/step_time.py: a tiny run of two methods writes the expected report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"
_SPEC = importlib.util.spec_from_file_location("step_time", _PATH)
step_time = importlib.util.module_from_spec(_SPEC)
sys.modules["step_time"] = step_time
_SPEC.loader.exec_module(step_time)


def _run(step_s: list[float], rss: float) -> dict:
    return {"step_s": step_s, "peak_rss_mib": rss, "rss_before_training_mib": rss - 10.0}


def test_ratios_are_taken_per_round_then_median():
    rounds = [
        {"lora": _run([1.0, 1.0, 1.0], 100.0), "scalora": _run([1.2, 1.2, 1.2], 101.0)},
        {"lora": _run([2.0, 2.0, 2.0], 100.0), "scalora": _run([2.0, 2.0, 2.0], 100.0)},
        {"lora": _run([1.0, 1.0, 1.0], 100.0), "scalora": _run([1.05, 1.05, 1.05], 100.0)},
    ]
    by_name = {r["name"]: r for r in step_time.ratios(rounds)}
    time_ratio = by_name["scalora/lora time"]
    assert time_ratio["per_round"] == pytest.approx([1.2, 1.0, 1.05])
    assert time_ratio["median"] == pytest.approx(1.05)
    assert time_ratio["passed"] is True
    assert by_name["scalora/lora peak RSS"]["median"] == pytest.approx(1.0)
    assert by_name["lora/peft-lora time"]["median"] is None  # PEFT not measured
    assert by_name["lora/peft-lora time"]["passed"] is None


def test_percentile_matches_linear_interpolation():
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert step_time.percentile(xs, 0) == 1.0
    assert step_time.percentile(xs, 50) == 3.0
    assert step_time.percentile(xs, 90) == pytest.approx(4.6)


def test_small_run_writes_report(tmp_path):
    pytest.importorskip("transformers")
    from scalora.train import assets

    try:
        assets.path("minilm")
    except assets.AssetMissingError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "step_time.json"
    step_time.main(["--small", "--methods", "lora,scalora", "--threads", "1", "--out", str(out)])

    report = json.loads(out.read_text())
    assert {"command", "environment", "args", "methods", "ratios", "targets"} <= set(report)
    assert {"torch", "threads", "cpu_model", "date"} <= set(report["environment"])
    assert "--small" in report["command"]
    assert list(report["methods"]) == ["lora", "scalora"]
    for stats in report["methods"].values():
        for key in ("median_ms", "p10_ms", "p90_ms", "peak_rss_mib", "trainable_params"):
            assert stats[key] > 0
        assert stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
        assert stats["measured_steps"] == step_time.SMALL["steps"]
    assert report["methods"]["lora"]["trainable_params"] == report["methods"]["scalora"]["trainable_params"]
    targets = report["targets"]
    assert targets["scalora/lora time"]["median"] > 0
    assert targets["scalora/lora peak RSS"]["passed"] in (True, False)
    assert targets["lora/peft-lora time"]["passed"] is None
    assert out.with_suffix(".md").read_text().startswith("# Training step time")
