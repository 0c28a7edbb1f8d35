"""ScaLoRA under DistributedDataParallel (gloo, CPU, two ranks on the loopback interface).

DDP has averaged the gradients when `ScaLoRA.step` runs, so every rank solves the same scales and folds the same
residual into its base weights, which DDP never synchronises (they are frozen): the ranks stay identical, and equal
to one process trained on the whole global batch.

Bitwise across ranks: DDP divides each gradient bucket by the world size (2: exact) and all-reduces it; with two ranks
the reduction is a single addition a + b, which IEEE arithmetic makes commutative, so both ranks receive the same
bits, and all that follows (solve, fold, rescale, AdamW) is the same deterministic computation on the same inputs.

Against the single process only the order of the batch reductions differs (the mean of two half-batch gradients
instead of one full-batch gradient), ~1e-7 relative in float32. AdamW's elementwise m / √v turns that into a relative
error of the same absolute size in the steps of entries with small gradients, so float32 entries are compared
relative to their tensor's largest entry (plain LoRA + AdamW under DDP already differs by ~6e-6 of that, ScaLoRA by
~2e-5); in float64 the same comparison holds to ~1e-14.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import ddp_worker
import dist_worker_common
import pytest
import torch
import torch.distributed as dist

WORLD_SIZE = 2
# Largest allowed |DDP − single| per tensor, relative to the tensor's largest entry.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10}
CASE_IDS = [f"interval{interval}-{str(dtype).removeprefix('torch.')}" for interval, dtype in ddp_worker.CASES]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _load(outdir: Path, interval: int, dtype: torch.dtype) -> list[dict[str, Any]]:
    return [torch.load(ddp_worker.output_path(outdir, interval, dtype, rank)) for rank in range(WORLD_SIZE)]


def _assert_bitwise_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["moments"].keys() == b["moments"].keys()
    for index, state in a["moments"].items():
        for key, tensor in state.items():
            assert torch.equal(tensor, b["moments"][index][key]), (index, key)
    assert a["stats"] == b["stats"]
    assert a["identity_total"] == b["identity_total"]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    scale = float(expected.abs().max())
    diff = float((actual - expected).abs().max())
    assert diff <= tol * scale, f"{what}: max |DDP - single| = {diff:.3g}, {diff / scale:.3g} of max |single|"


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both ranks' results for every case of ddp_worker.CASES, from one torch.multiprocessing.start_processes.

    Forked where that is safe (Linux): the ranks then inherit torch and transformers instead of importing them again,
    which takes seconds instead of most of a minute here; each rank pins itself to one thread first, as DataLoader's
    forked workers do. A fresh interpreter per rank is covered by the torchrun test.
    """
    outdir = tmp_path_factory.mktemp("ddp")
    dist_worker_common.start_ranks(ddp_worker.spawn_entry, WORLD_SIZE, str(outdir))
    return outdir


@pytest.fixture(scope="module")
def single() -> dict[tuple[int, torch.dtype], dict[str, Any]]:
    """The one-process reference on the global batches, for every case, with one thread like the ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {case: ddp_worker.train_single(*case, world_size=WORLD_SIZE) for case in ddp_worker.CASES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("interval", "dtype"), ddp_worker.CASES, ids=CASE_IDS)
def test_ranks_stay_bitwise_identical(launched: Path, interval: int, dtype: torch.dtype) -> None:
    rank0, rank1 = _load(launched, interval, dtype)
    # ScaLoRA found the LoRA layers through the DDP wrapper (their names carry its "module." prefix) ...
    assert len(rank0["layer_names"]) == dist_worker_common.LORA_LAYERS
    assert all(name.startswith("module.") for name in rank0["layer_names"])
    # ... and really rescaled on the last step (a multiple of every interval).
    assert dist_worker_common.STEPS % interval == 0
    assert rank0["stats"]["scalora/step"] == dist_worker_common.STEPS
    assert rank0["stats"]["scalora/layers"] == dist_worker_common.LORA_LAYERS
    assert rank0["stats"]["scalora/identity"] < 1.0
    # The ranks saw different data ...
    assert rank0["losses"][0] != rank1["losses"][0]
    # ... yet hold the same bits: base weights, factors, AdamW moments, scaling statistics.
    _assert_bitwise_equal(rank0, rank1)


@pytest.mark.parametrize(("interval", "dtype"), ddp_worker.CASES, ids=CASE_IDS)
def test_ddp_matches_single_process_on_global_batch(launched: Path, single: dict, interval: int,
                                                    dtype: torch.dtype) -> None:
    rank0, rank1 = _load(launched, interval, dtype)
    reference = single[interval, dtype]
    tol = TOLERANCE[dtype]
    # Each step's global loss is the mean of the ranks' local losses (equal local batches, no padding); transformers
    # computes the cross-entropy in float32 whatever the model's dtype, hence float32 tolerance for both.
    mean_losses = [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"], strict=True)]
    assert mean_losses == pytest.approx(reference["losses"], rel=1e-6, abs=0)
    # The base weights moved under ScaLoRA, so the comparison below covers the folded residuals too.
    initial = dist_worker_common.build_model(dtype).state_dict()
    folded = [name for name in reference["model"] if name.endswith("base_layer.weight")]
    assert len(folded) == dist_worker_common.LORA_LAYERS
    for name in folded:
        assert not torch.equal(reference["model"][name], initial[name]), name
    assert rank0["model"].keys() == reference["model"].keys()
    for name, expected in reference["model"].items():
        _assert_close(rank0["model"][name], expected, tol, name)
    assert rank0["moments"].keys() == reference["moments"].keys()
    for index, state in reference["moments"].items():
        for key, expected in state.items():
            _assert_close(rank0["moments"][index][key], expected, tol, f"{key} of parameter {index}")
    assert rank0["identity_total"] == reference["identity_total"]
    assert rank0["stats"].keys() == reference["stats"].keys()
    for key, value in reference["stats"].items():
        assert rank0["stats"][key] == pytest.approx(value, rel=tol, abs=tol), key


def test_torchrun_launch(tmp_path: Path) -> None:
    """The worker also runs as a script under torch.distributed.run (torchrun), its rank taken from the environment."""
    worker = Path(ddp_worker.__file__)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={WORLD_SIZE}",
               "--master_addr=127.0.0.1", f"--master_port={dist_worker_common.free_port()}", str(worker), str(tmp_path)]
    done = subprocess.run(command, cwd=worker.parent, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    for interval, dtype in ddp_worker.CASES:
        rank0, rank1 = _load(tmp_path, interval, dtype)
        assert rank0["losses"][0] != rank1["losses"][0]
        assert rank0["stats"]["scalora/layers"] == dist_worker_common.LORA_LAYERS
        _assert_bitwise_equal(rank0, rank1)

