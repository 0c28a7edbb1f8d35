"""Data-parallel ScaLoRA training on CPU (gloo), shared by tests/test_ddp.py.

Every rank trains the same tiny LoRA Llama, wrapped in DistributedDataParallel, with ScaLoRA around AdamW on its
shard of a global batch, once per (interval, dtype) in `CASES`, and saves its final model state (base weights
included), AdamW's moments and the last scaling statistics to ``OUTDIR/interval{I}_{dtype}_rank{R}.pt``.
`train_single` trains the same model in one process on the whole global batch.

Launch with ``torch.multiprocessing.start_processes(spawn_entry, ...)``, or as a script under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 ... ddp_worker.py OUTDIR``, which sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tiny import tiny_llama, token_batch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from scalora import LoraConfig, apply_lora
from scalora.optim import ScaLoRA

VOCAB = 101
LOCAL_BATCH = 2  # sequences per rank; equal on every rank, so the mean of the ranks' mean losses is the global mean
LENGTH = 12
STEPS = 6
LR = 1e-2
LORA_LAYERS = 14  # 2 decoder layers × (q, k, v, o, gate, up, down)
# (interval, dtype) of every run; 6 steps rescale 6 resp. 3 times. float64 makes the reduction-order noise tiny.
CASES: tuple[tuple[int, torch.dtype], ...] = tuple(
    (interval, dtype) for dtype in (torch.float32, torch.float64) for interval in (1, 2)
)


def loopback_interface() -> str | None:
    """The name of the loopback network interface ("lo" on Linux, "lo0" on macOS), if there is one."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in ("lo", "lo0") if name in names), None)


def keep_gloo_on_loopback() -> None:
    """Make gloo connect the ranks over the loopback interface, whatever the host name resolves to."""
    interface = loopback_interface()
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)


def build_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """The same LoRA model in every process: seeded tiny Llama, rank-4 adapters on every linear layer."""
    model = apply_lora(tiny_llama(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model.to(dtype).train()


def global_batch(step: int, world_size: int) -> torch.Tensor:
    """Step `step`'s global batch: world_size × LOCAL_BATCH sequences, rank r's shard being rows r·LOCAL_BATCH…"""
    return token_batch(VOCAB, batch=world_size * LOCAL_BATCH, length=LENGTH, seed=100 + step)


def local_batch(step: int, rank: int, world_size: int) -> torch.Tensor:
    return global_batch(step, world_size)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


def train(model: nn.Module, opt: torch.optim.Optimizer, batch: Callable[[int], torch.Tensor],
          steps: int) -> list[float]:
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


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
    losses = train(model, opt, lambda step: global_batch(step, world_size), steps)
    return snapshot(model, opt, losses)


def train_ddp(rank: int, world_size: int, interval: int, dtype: torch.dtype, steps: int = STEPS) -> dict[str, Any]:
    """Train on this rank's shard, ScaLoRA wrapped around the DDP model itself (not ``ddp.module``)."""
    ddp = DistributedDataParallel(build_model(dtype))  # gradient_as_bucket_view=False, the default
    opt = ScaLoRA(ddp, torch.optim.AdamW(ddp.parameters(), lr=LR), interval=interval)
    losses = train(ddp, opt, lambda step: local_batch(step, rank, world_size), steps)
    return snapshot(ddp.module, opt, losses)


def output_path(outdir: str | Path, interval: int, dtype: torch.dtype, rank: int) -> Path:
    return Path(outdir) / f"interval{interval}_{str(dtype).removeprefix('torch.')}_rank{rank}.pt"


def run(rank: int, world_size: int, outdir: str | Path) -> None:
    """One rank's work: join the gloo group (env:// rendezvous), train every case, save each result."""
    torch.set_num_threads(1)
    keep_gloo_on_loopback()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for interval, dtype in CASES:
            torch.save(train_ddp(rank, world_size, interval, dtype), output_path(outdir, interval, dtype, rank))
    finally:
        dist.destroy_process_group()


def spawn_entry(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Target for ``torch.multiprocessing.start_processes`` (which passes the rank first)."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
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
