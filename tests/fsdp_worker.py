"""ScaLoRA under FSDP2 (`fully_shard`) on CPU (gloo), shared by tests/test_fsdp.py.

Every rank builds the model of each case in `CASES` in float64 (the tiny LoRA Llama of `dist_worker_common`, a tiny
GPT-2 with scalora's layers, or a tiny Llama or GPT-2 with PEFT's), shards it with ``fully_shard`` per decoder block
and at the root (each rank then holds half the rows of every weight, LoRA factor and moment), trains it with ScaLoRA
around AdamW on its shard of the global batch, and saves the whole model (gathered) to ``OUTDIR/{case}_rank{R}.pt``.
The test compares it with one process trained on the global batch.

Launch with ``torch.multiprocessing.start_processes(spawn_entry, ...)``, or under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py OUTDIR``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from dist_worker_common import LR, STEPS, VOCAB, build_model, local_batch, process_group, rendezvous_on
from tiny import tiny_gpt2, tiny_llama, train_steps
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from scalora import LoraConfig, apply_lora
from scalora.optim import ScaLoRA

GPT2_VOCAB = 97


def peft_llama(dtype: torch.dtype) -> nn.Module:
    """The tiny Llama with PEFT's LoRA layers, seeded; rank 3 on every linear layer, so that two ranks hold unequal
    shards of lora_A (2 rows and 1)."""
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules="all-linear")
    return peft.get_peft_model(tiny_llama(seed=0), config).to(dtype).train()


def peft_gpt2(dtype: torch.dtype) -> nn.Module:
    """A tiny GPT-2 with PEFT's LoRA on its Conv1D layers (W0 stored (in, out): ``fan_in_fan_out``), seeded; in eval
    mode, since GPT-2's dropout would draw other masks on each rank's half of the batch than on the whole batch."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's note that Conv1D needs fan_in_fan_out
        return peft.get_peft_model(tiny_gpt2(seed=0), config).to(dtype).eval()


def scalora_gpt2(dtype: torch.dtype) -> nn.Module:
    """The same GPT-2 with scalora's layers on its Conv1D layers, in eval mode (see `peft_gpt2`)."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])
    return apply_lora(tiny_gpt2(seed=0), config).to(dtype).eval()


@dataclass(frozen=True)
class Case:
    """One sharded run: the model builder (by dtype), its vocabulary, and ScaLoRA's rule and c."""

    build: Callable[[torch.dtype], nn.Module]
    vocab: int
    rule: str
    c: float | None = None
    engine: str = "fully_shard"  # or "accelerate": accelerate's FSDP2 plugin shards it (`accelerate_fsdp2`)


#: every run: scalora's layers under both rules (the optimiser-aware default and the paper's); GPT-2's Conv1D with
#: scalora's layers; PEFT's layers; scalora's and PEFT's Llama sharded by accelerate
CASES: dict[str, Case] = {
    "scalora-optimizer": Case(build_model, VOCAB, "optimizer"),
    "scalora-paper": Case(build_model, VOCAB, "paper", 1.0),
    "peft-llama": Case(peft_llama, VOCAB, "optimizer"),
    "scalora-gpt2-conv1d": Case(scalora_gpt2, GPT2_VOCAB, "optimizer"),
    "peft-gpt2-conv1d": Case(peft_gpt2, GPT2_VOCAB, "optimizer"),
    "accelerate-scalora": Case(build_model, VOCAB, "optimizer", engine="accelerate"),
    "accelerate-peft-llama": Case(peft_llama, VOCAB, "optimizer", engine="accelerate"),
}


def make_optimizer(model: nn.Module, case: Case) -> ScaLoRA:
    extra = {} if case.c is None else {"c": case.c}
    return ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR), rule=case.rule, **extra)


def whole_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered."""
    return {name: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().clone()
            for name, value in model.state_dict().items()}


def shard(model: nn.Module) -> nn.Module:
    """The usual FSDP2 wrapping: ``fully_shard`` on each decoder block (Llama's or GPT-2's), then on the root."""
    for module in model.modules():
        if type(module).__name__ in ("LlamaDecoderLayer", "GPT2Block"):
            fully_shard(module)
    fully_shard(model)
    return model


def accelerate_fsdp2(model: nn.Module, case: Case) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Shard `model` with accelerate's FSDP2 plugin (each decoder block, then the root) and prepare ScaLoRA with it,
    built over the plain AdamW first: the order accelerate supports (model and optimiser prepared together).

    On CPU accelerate ignores the plugin: `AcceleratorState.__init__` (accelerate 1.15, state.py) sets
    ``DistributedType.FSDP`` only for accelerator devices (MULTI_GPU, MULTI_XPU, …), and `prepare` wraps a MULTI_CPU
    run's model in DistributedDataParallel. So on CPU the state is
    switched to FSDP once built; the rest (``fully_shard`` per the plugin's wrap policy, the optimiser's parameters
    swapped for their shards) is accelerate's own `prepare`.
    """
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per case in this process
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    accelerator = Accelerator(fsdp_plugin=plugin, cpu=True)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    prepared, optimizer = accelerator.prepare(model, make_optimizer(model, case))
    assert isinstance(prepared, FSDPModule), f"accelerate prepared a {type(prepared).__name__}, not FSDP2"
    return prepared, optimizer


def train_single(name: str, world_size: int = 2) -> dict[str, torch.Tensor]:
    """One process, no sharding, on the whole global batch."""
    case = CASES[name]
    model = case.build(torch.float64)
    train_steps(model, make_optimizer(model, case), lambda step: torch.cat(
        [local_batch(step, rank, world_size, case.vocab) for rank in range(world_size)]), STEPS)
    return whole_state(model)


def output_path(outdir: str | Path, name: str, rank: int) -> Path:
    return Path(outdir) / f"{name}_rank{rank}.pt"


def run(rank: int, world_size: int, outdir: str | Path) -> None:
    """One rank's work: join the gloo group (env:// rendezvous), train every case sharded, save the gathered model."""
    with process_group(rank, world_size):
        for name, case in CASES.items():
            model = case.build(torch.float64)
            if case.engine == "accelerate":
                model, optimizer = accelerate_fsdp2(model, case)
            else:
                model = shard(model)
                optimizer = make_optimizer(model, case)
            train_steps(model, optimizer, lambda step, case=case: local_batch(step, rank, world_size, case.vocab),
                        STEPS)
            torch.save(whole_state(model), output_path(outdir, name, rank))


def spawn_entry(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Target for ``torch.multiprocessing.start_processes`` (which passes the rank first)."""
    rendezvous_on(port, rank, world_size)
    run(rank, world_size, outdir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: fsdp_worker.py OUTDIR")
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
