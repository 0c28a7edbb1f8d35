"""ScaLoRA under DeepSpeed ZeRO-2 and ZeRO-3 (`scalora.zero.ZeroScaLoRA`; CPU accelerator, gloo, two ranks) equals
one process on the global batch; ScaLoRA passed as DeepSpeed's client optimiser is refused with a clear message.

ZeRO runs in float32 here (its fp32 master weights and moments), so the comparison is the one of tests/test_ddp.py:
each tensor relative to its largest entry. Only the order of the reductions differs from one process, and AdamW's
m / √v turns that into errors of the same absolute size in entries with small gradients. Measured after 6 steps, as a
fraction of each tensor's largest entry, plain LoRA (AdamW) under DeepSpeed against one process / ScaLoRA under
DeepSpeed against one process: ZeRO-2 7e-6 / 1.4e-5, ZeRO-3 4.2e-5 / 2.8e-5, ZeRO-3 with two micro-batches per step
6.5e-5 / 1.2e-4; ScaLoRA on PEFT's GPT-2 (ZeRO-2 and ZeRO-3) 1.5e-6. ScaLoRA and plain LoRA differ by more than
the largest entry itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import dist_worker_common
import pytest
import torch
import torch.distributed as dist

from scalora import ConfigError
from scalora.factors import lora_factors

WORLD_SIZE = 2
TOLERANCE = 3e-4  # of the tensor's largest entry, float32

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install --no-build-isolation -e '.[deepspeed]')"),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                       reason="torch.distributed with gloo is not available"),
]


@pytest.fixture(scope="module")
def worker():
    import deepspeed_worker

    return deepspeed_worker


@pytest.fixture(scope="module")
def launched(worker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both ranks' results for every run, from one torch.multiprocessing.start_processes (forked on Linux)."""
    outdir = tmp_path_factory.mktemp("deepspeed")
    dist_worker_common.start_ranks(worker.spawn_entry, WORLD_SIZE, str(outdir))
    return outdir


@pytest.mark.parametrize("run", ["zero2", "zero3", "zero3_persistent", "zero3_accumulation", "zero2_gpt2_peft",
                                 "zero3_gpt2_peft"])
def test_zero_equals_one_process_on_the_global_batch(worker, launched: Path, run: str) -> None:
    """Gradient accumulation too (two micro-batches per step, rescaling every second step), and PEFT's layers over
    GPT-2's Conv1D weights, stored (in, out)."""
    model, _, _, accumulation, interval = worker.RUNS[run]
    single = worker.train_single(model, WORLD_SIZE, accumulation, interval)
    layers = len(lora_factors(worker.build(model)))
    ranks = [torch.load(worker.output_path(launched, run, rank)) for rank in range(WORLD_SIZE)]
    solved = [None if step % interval else layers for step in range(1, dist_worker_common.STEPS + 1)]
    for rank, result in enumerate(ranks):
        assert result["layers"] == solved, f"rank {rank}"
        assert result["state"].keys() == single.keys()
        for name, expected in single.items():
            diff = float((result["state"][name] - expected).abs().max())
            assert diff <= TOLERANCE * float(expected.abs().max()), f"{name} on rank {rank}: {diff:.3g}"
    start = worker.build(model).state_dict()
    folded = sum("base_layer" in name and not torch.equal(expected, start[name]) for name, expected in single.items())
    assert folded == layers, "ScaLoRA must have folded into every base weight"


def test_in_bf16_the_working_copy_and_the_fp32_master_both_hold_the_rescaled_factors(worker, launched: Path) -> None:
    for rank in range(WORLD_SIZE):
        assert torch.load(worker.output_path(launched, "bf16", rank)) == {2: 0.0, 3: 0.0}


def test_zero2_keeps_an_int8_fold_compensation_the_same_on_every_rank(worker, launched: Path) -> None:
    """ZeRO-2 in bf16 with compensate='int8': every layer keeps an int8 buffer that holds something, W0 has moved,
    and both ranks (each folding into its whole W0 with the same random numbers) hold the same W0 and buffer."""
    ranks = [torch.load(worker.output_path(launched, "int8", rank)) for rank in range(WORLD_SIZE)]
    for result in ranks:
        assert all(c.dtype == torch.int8 for c in result["compensation"].values())
        assert any(bool(c.any()) for c in result["compensation"].values())
        assert all(not torch.equal(result["weight"][name], start) for name, start in result["start"].items())
    for key in ("weight", "compensation"):
        assert all(torch.equal(ranks[0][key][name], ranks[1][key][name]) for name in ranks[0][key])


def test_scalora_as_the_client_optimiser_is_refused_with_a_clear_message(worker, launched: Path) -> None:
    """ZeRO-2 replaces its client optimiser's parameter groups; ZeRO-3 steps it with no gradient in .grad. Both are
    refused, naming what to do instead, and so is ZeroScaLoRA over an engine whose client optimiser is ScaLoRA."""
    for rank in range(WORLD_SIZE):
        errors = torch.load(worker.output_path(launched, "misuse", rank))
        assert "cannot be DeepSpeed's client optimiser" in errors[2]["step"]
        assert "found no LoRA layer with gradients" in errors[3]["step"]
        for stage in (2, 3):
            assert "scalora.zero.ZeroScaLoRA(engine).before_step()" in errors[stage]["step"]
            assert "client optimiser is ScaLoRA: pass the plain optimiser" in errors[stage]["hook"]


@pytest.mark.parametrize(("stage", "fp16", "match"), [(1, False, "supports ZeRO stages 2 and 3, not stage 1"),
                                                      (3, True, "does not support DeepSpeed's fp16 mode")])
def test_unsupported_engines_are_refused(stage: int, fp16: bool, match: str) -> None:
    from scalora.zero import ZeroScaLoRA

    engine = SimpleNamespace(zero_optimization_stage=lambda: stage, fp16_enabled=lambda: fp16)
    with pytest.raises(ConfigError, match=match):
        ZeroScaLoRA(engine)


@pytest.mark.parametrize("compensate", [True, "int8"])
def test_a_compensation_buffer_under_zero3_is_refused(compensate: bool | str) -> None:
    """ZeRO-3 partitions W0, so a buffer the size of the whole weight (bf16 or int8) is refused, naming the way out."""
    from scalora.zero import ZeroScaLoRA

    engine = SimpleNamespace(zero_optimization_stage=lambda: 3, fp16_enabled=lambda: False,
                             optimizer=SimpleNamespace(optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1)))
    with pytest.raises(ConfigError, match=r"compensate=True or 'int8'.*leave compensate unset"):
        ZeroScaLoRA(engine, compensate=compensate)
