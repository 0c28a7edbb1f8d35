"""Data-parallel ScaLoRA training on CPU (gloo), shared by tests/test_ddp.py.

Every rank trains the tiny LoRA Llama of `dist_worker_common`, wrapped in DistributedDataParallel, with ScaLoRA
around AdamW on its shard of a global batch, once per (interval, dtype) in `CASES`, and saves its final model state
(base weights included), AdamW's moments and the last scaling statistics to
``OUTDIR/interval{I}_{dtype}_rank{R}.pt``. `train_single` trains the same model in one process on the whole global
batch.

Launch with ``torch.multiprocessing.start_processes(spawn_entry, ...)``, or as a script under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 ... ddp_worker.py OUTDIR``, which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from dist_worker_common import LR, STEPS, build_model, global_batch, local_batch, process_group, rendezvous_on
from tiny import train_steps
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalora.optim import ScaLoRA

# (interval, dtype) of every run; 6 steps rescale 6 resp. 3 times. float64 makes the reduction-order noise tiny.
CASES: tuple[tuple[int, torch.dtype], ...] = tuple(
    (interval, dtype) for dtype in (torch.float32, torch.float64) for interval in (1, 2)
)


def snapshot(module: nn.Module, opt: ScaLoRA, losses: list[float]) -> dict[str, Any]:
    """What the test compares: model state (base weights included), AdamW's moments, the last ScaLoRA statistics."""
    return {
        "model": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "moments": {i: {k: v.clone() for k, v in s.items()} for i, s in opt.state_dict()["optimizer"]["state"].items()},
        "stats": opt.last_stats.as_dict(),
        "identity_total": opt.identity_total,
        "losses": losses,
        "layer_names": [name for name, _ in opt.layers],
    }


def train_single(interval: int, dtype: torch.dtype, world_size: int = 2, steps: int = STEPS) -> dict[str, Any]:
    """One process on the whole global batch (the loss is its mean, as DDP's averaged gradient is)."""
    model = build_model(dtype)
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR), interval=interval)
    losses = train_steps(model, opt, lambda step: global_batch(step, world_size), steps)
    return snapshot(model, opt, losses)


def train_ddp(rank: int, world_size: int, interval: int, dtype: torch.dtype, steps: int = STEPS) -> dict[str, Any]:
    """Train on this rank's shard, ScaLoRA wrapped around the DDP model itself (not ``ddp.module``)."""
    ddp = DistributedDataParallel(build_model(dtype))  # gradient_as_bucket_view=False, the default
    opt = ScaLoRA(ddp, torch.optim.AdamW(ddp.parameters(), lr=LR), interval=interval)
    losses = train_steps(ddp, opt, lambda step: local_batch(step, rank, world_size), steps)
    return snapshot(ddp.module, opt, losses)


def output_path(outdir: str | Path, interval: int, dtype: torch.dtype, rank: int) -> Path:
    return Path(outdir) / f"interval{interval}_{str(dtype).removeprefix('torch.')}_rank{rank}.pt"


def run(rank: int, world_size: int, outdir: str | Path) -> None:
    """One rank's work: join the gloo group (env:// rendezvous), train every case, save each result."""
    with process_group(rank, world_size):
        for interval, dtype in CASES:
            torch.save(train_ddp(rank, world_size, interval, dtype), output_path(outdir, interval, dtype, rank))


def spawn_entry(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Target for ``torch.multiprocessing.start_processes`` (which passes the rank first)."""
    rendezvous_on(port, rank, world_size)
    run(rank, world_size, outdir)


def main(argv: Sequence[str]) -> None:
    """``torchrun --nproc_per_node=N ... ddp_worker.py OUTDIR`` (one node)."""
    if len(argv) != 1:
        raise SystemExit("usage: ddp_worker.py OUTDIR")
    rank, world_size, local_rank = (int(os.environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if local_rank != rank:
        raise SystemExit(f"expected a single node (LOCAL_RANK == RANK), got LOCAL_RANK={local_rank}, RANK={rank}")
    run(rank, world_size, argv[0])


if __name__ == "__main__":
    main(sys.argv[1:])
