"""benchmarks/bf16_memory.py's table: every method's peak and tensor bytes as ratios to LoRA's, and the JSON it
belongs to (the training runs themselves need a SmolLM2-sized model and are left to the benchmark)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bf16_memory.py"
sys.path.insert(0, str(_PATH.parent))
_SPEC = importlib.util.spec_from_file_location("bf16_memory", _PATH)
bf16_memory = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bf16_memory)


def _row(method: str, peak: float, before: float, params: float, buffers: float) -> dict:
    return {"method": method, "peak_rss_mib": peak, "rss_before_mib": before, "peak_reset": True,
            "tensor_mib": {"params": params, "buffers": buffers}}


def test_markdown_reports_ratios_to_lora_and_names_its_json() -> None:
    report = {"command": "python benchmarks/bf16_memory.py --batch 4 --length 512",
              "args": {"steps": "1", "batch": "4", "length": "512", "out": "results/bf16_memory_2048.json"},
              "results": {"lora": _row("lora", 1000.0, 900.0, 250.0, 0.0),
                          "scalora-int8": _row("scalora-int8", 1040.0, 950.0, 250.0, 100.0)}}
    table = bf16_memory.markdown(report)
    assert "with `bf16_memory_2048.json`" in table
    assert "4 × 512 tokens" in table
    assert "| lora | 1000 | 1.000 | 100 | 250 | 1.000 |" in table
    assert "| scalora-int8 | 1040 | 1.040 | 90 | 350 | 1.400 |" in table
