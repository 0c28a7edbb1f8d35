"""ScaLoRA under FSDP2 (`fully_shard`) on CPU (gloo), shared by tests/test_fsdp.py.

Every rank builds the tiny LoRA Llama of `dist_worker_common` in float64, shards it with ``fully_shard`` per decoder
layer and at the root (each rank then holds half the rows of every weight, LoRA factor and moment), trains it with
ScaLoRA around AdamW on its shard of the global batch for each rule in `RULES`, and saves the whole model (gathered)
to ``OUTDIR/{rule}_rank{R}.pt``. The test compares it with one process trained on the global batch.

Launch with ``torch.multiprocessing.start_processes(spawn_entry, ...)``, or under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py OUTDIR``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from dist_worker_common import LR, STEPS, build_model, local_batch, process_group, rendezvous_on
from tiny import train_steps
from torch.distributed.fsdp import fully_shard

from scalora.optim import ScaLoRA

#: (rule, c) of every run: the optimiser-aware default and the paper's rule
RULES: dict[str, dict] = {"optimizer": {}, "paper": {"c": 1.0}}


def make_optimizer(model: torch.nn.Module, rule: str) -> ScaLoRA:
    return ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR), rule=rule, **RULES[rule])


def whole_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for name, value in model.state_dict().items()}


def train_single(rule: str, world_size: int = 2) -> dict[str, torch.Tensor]:
    """One process, no sharding, on the whole global batch."""
    model = build_model(torch.float64)
    train_steps(model, make_optimizer(model, rule), lambda step: torch.cat(
        [local_batch(step, rank, world_size) for rank in range(world_size)]), STEPS)
    return whole_state(model)


def output_path(outdir: str | Path, rule: str, rank: int) -> Path:
    return Path(outdir) / f"{rule}_rank{rank}.pt"


def run(rank: int, world_size: int, outdir: str | Path) -> None:
    """One rank's work: join the gloo group (env:// rendezvous), train every rule sharded, save the gathered model."""
    with process_group(rank, world_size):
        for rule in RULES:
            model = build_model(torch.float64)
            for layer in model.model.layers:  # the usual wrapping: each decoder layer, then the rest
                fully_shard(layer)
            fully_shard(model)
            train_steps(model, make_optimizer(model, rule), lambda step: local_batch(step, rank, world_size), STEPS)
            torch.save(whole_state(model), output_path(outdir, rule, rank))


def spawn_entry(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Target for ``torch.multiprocessing.start_processes`` (which passes the rank first)."""
    rendezvous_on(port)
    run(rank, world_size, outdir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: fsdp_worker.py OUTDIR")
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
