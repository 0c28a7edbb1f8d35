"""ScaLoRA under DeepSpeed ZeRO on CPU (``DS_ACCELERATOR=cpu``, gloo), shared by tests/test_deepspeed.py.

Every rank trains the tiny LoRA Llama of `dist_worker_common` in float32 with a DeepSpeed engine around plain AdamW
and `scalora.zero.ZeroScaLoRA` between ``engine.backward`` and ``engine.step``, on its shard of the global batch, for
each run of `RUNS`, and saves the whole model (gathered under ZeRO-3) and the number of layers each scaling step
solved to ``OUTDIR/{run}_rank{R}.pt``. In bf16 it saves how far the factors' working copies are from their fp32
masters right after a scaling step (``OUTDIR/bf16_rank{R}.pt``). It then passes ScaLoRA itself as the client
optimiser (the wrong usage) under ZeRO-2 and ZeRO-3 and saves the errors raised to ``OUTDIR/misuse_rank{R}.pt``.
`train_single` trains the same model with `scalora.optim.ScaLoRA` in one process on the whole global batch.

Launch with ``torch.multiprocessing.start_processes(spawn_entry, ...)``, or under torchrun
(``python -m torch.distributed.run --nproc_per_node=2 tests/deepspeed_worker.py OUTDIR``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
from dist_worker_common import LENGTH, LOCAL_BATCH, LR, STEPS, VOCAB, build_model, process_group, rendezvous_on
from tiny import tiny_gpt2, token_batch, train_steps
from torch import nn

from scalora.errors import ConfigError
from scalora.optim import ScaLoRA

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported (in the functions below)

PARTITIONED = {"stage3_param_persistence_threshold": 0}

#: run name → (model, ZeRO stage, extra zero_optimization settings, micro-batches per step, ScaLoRA's interval). Under
#: ZeRO-3 the tiny models' parameters are all below DeepSpeed's default persistence threshold (kept whole on every
#: rank): `PARTITIONED` sets it to 0, so that every W0 and every factor is partitioned; "zero3_persistent" keeps the
#: default. "gpt2_peft" is PEFT's LoRA on GPT-2, whose Conv1D weights are stored (in, out).
RUNS: dict[str, tuple[str, int, dict[str, Any], int, int]] = {
    "zero2": ("llama", 2, {}, 1, 1),
    "zero3": ("llama", 3, PARTITIONED, 1, 1),
    "zero3_persistent": ("llama", 3, {}, 1, 1),
    "zero3_accumulation": ("llama", 3, PARTITIONED, 2, 2),
    "zero2_gpt2_peft": ("gpt2_peft", 2, {}, 1, 1),
    "zero3_gpt2_peft": ("gpt2_peft", 3, PARTITIONED, 1, 1),
}

#: the vocabulary of each model's token batches
VOCABS = {"llama": VOCAB, "gpt2_peft": 97}


def build(model: str) -> nn.Module:
    """The same float32 LoRA model in every process: `dist_worker_common`'s Llama, or PEFT's LoRA on GPT-2."""
    if model == "llama":
        return build_model(torch.float32)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # PEFT initialises A from the global generator
    config = LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    model = get_peft_model(tiny_gpt2(seed=0), config).train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # GPT-2's dropout draws differ between processes
    return model


def batch(model: str, step: int, shard: int, shards: int) -> torch.Tensor:
    """Shard `shard` of `shards` of step `step`'s global batch (shards × LOCAL_BATCH sequences) for `model`."""
    ids = token_batch(VOCABS[model], batch=shards * LOCAL_BATCH, length=LENGTH, seed=100 + step)
    return ids[shard * LOCAL_BATCH:(shard + 1) * LOCAL_BATCH]


def config(stage: int, extra: dict[str, Any], accumulation: int = 1) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": LOCAL_BATCH, "gradient_accumulation_steps": accumulation,
            "zero_optimization": {"stage": stage, **extra}, "steps_per_print": 10**9}


def output_path(outdir: str | Path, run: str, rank: int) -> Path:
    return Path(outdir) / f"{run}_rank{rank}.pt"


def train_single(model_name: str, world_size: int = 2, accumulation: int = 1,
                 interval: int = 1) -> dict[str, torch.Tensor]:
    """One process, no DeepSpeed, on the whole global batch (all ranks' micro-batches of a step)."""
    model = build(model_name)
    shards = world_size * accumulation
    train_steps(model, ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=LR), interval=interval),
                lambda step: torch.cat([batch(model_name, step, k, shards) for k in range(shards)]), STEPS)
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def train_engine(model_name: str, stage: int, extra: dict[str, Any], accumulation: int, interval: int, rank: int,
                 world_size: int) -> dict[str, Any]:
    """The model, and the layers each optimiser step solved (None: no scaling step), after `STEPS` steps under
    DeepSpeed with `ZeroScaLoRA`; micro-batch m of a step is shard m·world_size + rank of its global batch."""
    import deepspeed

    from scalora.zero import ZeroScaLoRA

    model = build(model_name)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config=config(stage, extra, accumulation))
    scalora = ZeroScaLoRA(engine, interval=interval)
    layers = []
    for step in range(STEPS):
        for micro in range(accumulation):
            ids = batch(model_name, step, micro * world_size + rank, world_size * accumulation)
            engine.backward(engine(ids, labels=ids).loss)
            stats = scalora.before_step()
            if micro == accumulation - 1:
                layers.append(None if stats is None else stats.layers)
            engine.step()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
    return {"state": state, "layers": layers}


def bf16_copies(stage: int, rank: int, world_size: int) -> float:
    """In bf16, right after a scaling step (before ``engine.step``): the largest difference between a LoRA factor's
    working copy and its fp32 master rounded to bf16, over all factors (0 when both hold the rescaled factors)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from scalora.factors import lora_factors
    from scalora.zero import ZeroScaLoRA

    model = build_model(torch.float32)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config={**config(stage, {"stage3_param_persistence_threshold": 0}),
                                              "bf16": {"enabled": True}})
    scalora = ZeroScaLoRA(engine)
    for step in range(2):
        ids = batch("llama", step, rank, world_size)
        engine.backward(engine(ids, labels=ids).loss)
        scalora.before_step()
        if step == 0:
            engine.step()
    factors = [p for _, layer in lora_factors(model) for p in (layer.lora_A, layer.lora_B)]
    masters = [safe_get_full_fp32_param(p).to(torch.bfloat16) for p in factors]
    with deepspeed.zero.GatheredParameters(factors, enabled=stage == 3):
        return max(float((p.detach() - master.view_as(p)).abs().max())
                   for p, master in zip(factors, masters, strict=True))


def int8_compensated(rank: int, world_size: int) -> dict[str, Any]:
    """ZeRO-2 in bf16 with ``compensate="int8"``: after two steps, every layer's W0 (in its (out, in) layout) and
    its int8 fold compensation, and W0 as it started."""
    import deepspeed

    from scalora.factors import lora_factors
    from scalora.zero import ZeroScaLoRA

    model = build_model(torch.float32)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                      config={**config(2, {}), "bf16": {"enabled": True}})
    start = {name: layer.base_weight_oi().detach().clone() for name, layer in lora_factors(model)}
    scalora = ZeroScaLoRA(engine, compensate="int8")
    for step in range(2):
        ids = batch("llama", step, rank, world_size)
        engine.backward(engine(ids, labels=ids).loss)
        scalora.before_step()
        engine.step()
    layers = lora_factors(model)
    return {"start": start, "weight": {name: layer.base_weight_oi().detach().clone() for name, layer in layers},
            "compensation": {name: layer.base_compensation.clone() for name, layer in layers}}


def misuse(stage: int, rank: int, world_size: int) -> dict[str, str]:
    """The errors raised when ScaLoRA itself is DeepSpeed's client optimiser (which DeepSpeed accepts only with
    ``zero_allow_untested_optimizer``): by ``ZeroScaLoRA(engine)`` ("hook") and by ``engine.step()`` ("step")."""
    import deepspeed

    from scalora.zero import ZeroScaLoRA

    model = build_model(torch.float32)
    engine, *_ = deepspeed.initialize(model=model, optimizer=ScaLoRA(model, torch.optim.AdamW(model.parameters())),
                                      config={**config(stage, {}), "zero_allow_untested_optimizer": True})
    errors = {"hook": "no error", "step": "no error"}
    try:
        ZeroScaLoRA(engine)
    except ConfigError as error:
        errors["hook"] = str(error)
    ids = batch("llama", 0, rank, world_size)
    engine.backward(engine(ids, labels=ids).loss)
    try:
        engine.step()
    except ConfigError as error:
        errors["step"] = str(error)
    return errors


def run(rank: int, world_size: int, outdir: str | Path) -> None:
    """One rank's work: join the gloo group, train every run of `RUNS`, then try the wrong usage."""
    import deepspeed

    with process_group(rank, world_size):
        deepspeed.init_distributed(dist_backend="gloo")
        for name, settings in RUNS.items():
            torch.save(train_engine(*settings, rank, world_size), output_path(outdir, name, rank))
        torch.save({stage: bf16_copies(stage, rank, world_size) for stage in (2, 3)}, output_path(outdir, "bf16", rank))
        torch.save({stage: misuse(stage, rank, world_size) for stage in (2, 3)}, output_path(outdir, "misuse", rank))
        torch.save(int8_compensated(rank, world_size), output_path(outdir, "int8", rank))


def spawn_entry(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Target for ``torch.multiprocessing.start_processes`` (which passes the rank first)."""
    rendezvous_on(port, rank, world_size)
    run(rank, world_size, outdir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: deepspeed_worker.py OUTDIR")
    run(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), sys.argv[1])
