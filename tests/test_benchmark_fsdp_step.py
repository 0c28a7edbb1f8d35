"""Smoke test of benchmarks/fsdp_step.py: the computed traffic of a 7 B Llama, and a tiny 2-process run whose
measured collectives equal the computed ones."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_step.py"
_SPEC = importlib.util.spec_from_file_location("fsdp_step", SCRIPT)
fsdp_step = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = fsdp_step  # the forked ranks look the worker up there
_SPEC.loader.exec_module(fsdp_step)


def test_llama_7b_scaling_step_traffic() -> None:
    shapes = fsdp_step.llama_linear_shapes(32, 4096, 11008, 4096)
    assert len(shapes) == 224
    traffic = fsdp_step.scaling_step_traffic(shapes, 8)
    # one all-gather per shape group (q/k/v/o, gate/up, down), one all-reduce for all layers' systems
    assert traffic["all_gather"]["calls"] == 3 and traffic["all_reduce"]["calls"] == 1
    assert traffic["all_reduce"]["bytes"] == 224 * (4 * 64 + 2 * 8 + 1) * 4  # H, λ's B block, B's norms, ‖U_B U_A‖²
    assert traffic["all_gather"]["bytes"] == 3 * 8 * 4 * 32 * (6 * 4096 + 11008)
    assert fsdp_step.llama_parameters(32, 4096, 11008, 4096) == 6_738_415_616
    paper = fsdp_step.scaling_step_traffic(shapes, 8, rule="paper")
    assert paper["all_gather"]["bytes"] == traffic["all_gather"]["bytes"] * 2 // 3


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_small_run_writes_report(tmp_path: Path) -> None:
    out = tmp_path / "fsdp_step.json"
    fsdp_step.main(["--small", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"command", "environment", "settings", "step_ms", "ratio_scalora_lora", "collectives", "llama_7b"} \
        <= set(report)
    assert "--small" in report["command"]
    rounds = fsdp_step.SMALL["rounds"]
    for stats in report["step_ms"].values():
        assert len(stats["per_round"]) == rounds and stats["median"] > 0
    assert report["ratio_scalora_lora"]["median"] > 0
    measured = report["collectives"]["measured"]
    assert measured["lora"]["optimizer_step"] == {}  # AdamW on shards communicates nothing
    assert report["collectives"]["scalora_step_extra"]["agree"] is True
    assert report["llama_7b"]["six_grams_bytes"] == 344_064
    assert out.with_suffix(".md").read_text().startswith("# ScaLoRA against LoRA under FSDP2")
