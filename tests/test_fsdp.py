"""ScaLoRA under FSDP2 (`fully_shard`, gloo, CPU, two ranks) equals one process on the global batch, on scalora's
layers and on PEFT's (Llama's linear layers, GPT-2's Conv1D stored (in, out)), sharded by ``fully_shard`` or by
accelerate's FSDP2 plugin; FSDP1, ReLoRA on FSDP2 and an optimiser accelerate already prepared are refused with a
clear message.

Each rank holds half the rows of every weight, factor and moment: the system is summed from the ranks' partial
r × r products and every rank folds into its own rows of W0 (`scalora.sharded`; a W0 stored (in, out) takes its
rows' columns of the update, from B whole). In float64 the only difference from one process is the order of the sums
(gradients reduce-scattered, Grams all-reduced), ~1e-14 of each tensor's largest entry.
"""

from __future__ import annotations

from pathlib import Path

import dist_worker_common
import fsdp_worker
import pytest
import torch
import torch.distributed as dist
from torch.nn import Linear, Sequential

from scalora import ConfigError, LoraConfig, apply_lora, lora_factors
from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA

WORLD_SIZE = 2
TOLERANCE = 1e-10  # of the tensor's largest entry, float64

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both ranks' gathered models for every case, from one torch.multiprocessing.start_processes (forked on Linux,
    as in tests/test_ddp.py)."""
    outdir = tmp_path_factory.mktemp("fsdp")
    dist_worker_common.start_ranks(fsdp_worker.spawn_entry, WORLD_SIZE, str(outdir))
    return outdir


@pytest.mark.parametrize("case", list(fsdp_worker.CASES))
def test_fsdp2_equals_one_process_on_the_global_batch(launched: Path, case: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = fsdp_worker.train_single(case, WORLD_SIZE)
    finally:
        torch.set_num_threads(threads)
    built = fsdp_worker.CASES[case].build(torch.float64)
    start = built.state_dict()
    ranks = [torch.load(fsdp_worker.output_path(launched, case, rank)) for rank in range(WORLD_SIZE)]
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    folded = 0
    for name, expected in single.items():
        for rank, state in enumerate(ranks):
            diff = float((state[name] - expected).abs().max())
            assert diff <= TOLERANCE * float(expected.abs().max()), f"{name} on rank {rank}: {diff:.3g}"
        folded += "base_layer" in name and not torch.equal(expected, start[name])
    assert folded == len(lora_factors(built)), "ScaLoRA must have folded into every base weight"


@pytest.mark.parametrize("engine", ["fsdp1", "fsdp2"])
def test_unsupported_sharding_is_refused_with_a_clear_message(engine: str, tmp_path: Path) -> None:
    """FSDP1's flat parameters hold no whole row of W0 or B: refused. Under FSDP2 ReLoRA is refused, and so is a
    ScaLoRA compensation buffer, also one asked for before the model was sharded (as accelerate shards it after
    ScaLoRA is built): the first scaling step refuses it. Every message names what to use instead."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = _small_lora_model()
        if engine == "fsdp1":
            model = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
            with pytest.raises(ConfigError, match=r"FullyShardedDataParallel.*DistributedDataParallel"):
                ScaLoRA(model, torch.optim.AdamW(model.parameters()))
        else:
            fully_shard(model)
            ScaLoRA(model, torch.optim.AdamW(model.parameters()))
            with pytest.raises(ConfigError, match=r"compensate=True.*stochastic rounding"):
                ScaLoRA(model, torch.optim.AdamW(model.parameters()), compensate=True)
            early = _small_lora_model()
            optimizer = ScaLoRA(early, torch.optim.AdamW(early.parameters()), compensate=True)
            fully_shard(early)
            with pytest.raises(ConfigError, match=r"compensate=True.*stochastic rounding"):
                optimizer.rescale()
        with pytest.raises(ConfigError, match="DistributedDataParallel"):
            ReLoRA(model, torch.optim.AdamW(model.parameters()), reset_every=2)
    finally:
        dist.destroy_process_group()


def test_an_optimiser_prepared_by_accelerate_is_refused_naming_the_order_that_works() -> None:
    """accelerate's FSDP2 swaps the optimiser's parameters for their shards when it prepares model and optimiser
    together, so ScaLoRA goes into `prepare` with the model (tests/fsdp_worker.py), not around its result."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = _small_lora_model()
    try:
        prepared = Accelerator(cpu=True).prepare(torch.optim.AdamW(model.parameters()))
        with pytest.raises(ConfigError, match=r"accelerator\.prepare\(model, ScaLoRA\(model, "):
            ScaLoRA(model, prepared)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def _small_lora_model() -> Sequential:
    return apply_lora(Sequential(Linear(8, 8), Linear(8, 4)), LoraConfig(r=2, target_modules=["0", "1"]))
