"""What the distributed test workers share: the tiny LoRA Llama, its batches and the gloo group.

`ddp_worker` (DistributedDataParallel) and `fsdp_worker` (FSDP2) train this same model on the same batches (with
`tiny.train_steps`), so each test can compare its ranks with one process trained on the global batch.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import tiny_llama, token_batch
from torch import nn

from scalora import LoraConfig, apply_lora

VOCAB = 101
LOCAL_BATCH = 2  # sequences per rank; equal on every rank, so the mean of the ranks' mean losses is the global mean
LENGTH = 12
STEPS = 6
LR = 1e-2
LORA_LAYERS = 14  # 2 decoder layers × (q, k, v, o, gate, up, down)


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


def global_batch(step: int, world_size: int, vocab: int = VOCAB) -> torch.Tensor:
    """Step `step`'s global batch: world_size × LOCAL_BATCH sequences, rank r's shard being rows r·LOCAL_BATCH…"""
    return token_batch(vocab, batch=world_size * LOCAL_BATCH, length=LENGTH, seed=100 + step)


def local_batch(step: int, rank: int, world_size: int, vocab: int = VOCAB) -> torch.Tensor:
    """Rank `rank`'s shard of step `step`'s global batch."""
    return global_batch(step, world_size, vocab)[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]


@contextmanager
def process_group(rank: int, world_size: int) -> Iterator[None]:
    """One rank in a gloo group (env:// rendezvous) on one thread, left again on exit."""
    torch.set_num_threads(1)
    keep_gloo_on_loopback()
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rendezvous_on(port: int, rank: int, world_size: int) -> None:
    """Meet the other ranks at ``127.0.0.1:port``: the variables torchrun would set (accelerate reads them too)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(entry: Callable[..., None], world_size: int, outdir: str) -> None:
    """Run ``entry(rank, world_size, port, outdir)`` on `world_size` processes meeting on a free loopback port, and
    wait for them. Forked where that is safe (Linux): the ranks then inherit torch and transformers instead of
    importing them again, which takes seconds instead of most of a minute."""
    start_method = "fork" if sys.platform.startswith("linux") else "spawn"
    mp.start_processes(entry, args=(world_size, free_port(), outdir), nprocs=world_size, join=True,
                       start_method=start_method)
