"""ScaLoRA against LoRA under FSDP2 (``fully_shard``) on 2 CPU processes: step time, and what a scaling step
communicates, measured on a small Llama and computed for a 7 B Llama.

Two gloo processes on the loopback interface (one torch thread each) build the same randomly initialised Llama
(``--hidden`` wide, MLPs twice as wide, ``--layers`` blocks, 4 heads, 2 key-value heads) with scalora's LoRA (rank
``--r`` on every linear layer, float32), shard it with ``fully_shard`` per block and at the root, and train two copies
of it side by side: LoRA (AdamW) and ScaLoRA around the same AdamW (rescaling every step). A step is forward,
backward, ``optimizer.step()`` and ``zero_grad()`` on each rank's ``--batch`` × ``--length`` tokens. In each of
``--rounds`` rounds both methods run ``--steps`` steps, in alternating order, between barriers; a step's time is the
block's wall time over its steps (rank 0's clock), the ratio ScaLoRA / LoRA is taken within each round and the median
over rounds is reported.

Communication: one extra step of each method runs under a dispatch mode that sees every collective
(``c10d`` and functional collectives: FSDP2's own gathers and reduce-scatters, and the gathers of DTensor's
``full_tensor``) and records its kind and payload (the whole tensor: a gather's output, a reduce-scatter's input, an
all-reduce's tensor). ScaLoRA's extra traffic is what its ``optimizer.step()`` makes (LoRA's AdamW step makes
none). `scaling_step_traffic` computes the same from the layer shapes (`scalora.sharded`: per group of layers of one
shape, one all-gather of every layer's A, its gradient and, for the optimiser-aware rule, the optimiser's direction
for A, r × in each; and for all groups together (one rank r) one all-reduce of the partial systems, 4r² + 2r + 1
numbers per layer (4r² + r for the paper's rule), float32 for float32 factors); the measured counts must equal it, and
it is then
evaluated for a 7 B Llama.

Run ``python benchmarks/fsdp_step.py`` (``--small`` for a seconds-long smoke run).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORLD_SIZE = 2
VOCAB = 256
LR = 1e-4
DEFAULT_OUT = Path("benchmarks/results/fsdp_step.json")
DEFAULTS = {"hidden": 384, "layers": 4, "r": 8, "batch": 4, "length": 64, "rounds": 9, "steps": 5, "warmup": 2}
SMALL = {"hidden": 32, "layers": 2, "r": 4, "batch": 2, "length": 8, "rounds": 2, "steps": 1, "warmup": 1}
#: Llama-2 7B: 32 blocks, hidden 4096, MLP 11008, no grouped key-value heads; r = 8 on every linear layer
LLAMA_7B = {"layers": 32, "hidden": 4096, "intermediate": 11008, "kv_hidden": 4096, "r": 8}
#: the issue's figure from a prototype (per scaling step on the 7 B shape)
PROTOTYPE_BYTES = 344e3
KINDS = {"allgather": "all_gather", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
         "allreduce": "all_reduce", "all_reduce": "all_reduce", "broadcast": "broadcast", "alltoall": "all_to_all",
         "all_to_all": "all_to_all"}


def llama_linear_shapes(layers: int, hidden: int, intermediate: int, kv_hidden: int) -> list[tuple[int, int]]:
    """(in, out) of every linear layer of a Llama's blocks: q, k, v, o, gate, up, down."""
    block = [(hidden, hidden), (hidden, kv_hidden), (hidden, kv_hidden), (hidden, hidden),
             (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return block * layers


def llama_parameters(layers: int, hidden: int, intermediate: int, kv_hidden: int, vocab: int = 32000) -> int:
    """The parameters of a Llama with untied input and output embeddings (Llama-2 7B: 6,738,415,616)."""
    linear = sum(fan_in * fan_out for fan_in, fan_out in llama_linear_shapes(1, hidden, intermediate, kv_hidden))
    return 2 * vocab * hidden + layers * (linear + 2 * hidden) + hidden


def scaling_step_traffic(shapes: Sequence[tuple[int, int]], r: int, rule: str = "optimizer",
                         element_bytes: int = 4) -> dict[str, dict[str, int]]:
    """Collectives (calls and payload bytes by kind) of one ScaLoRA scaling step under FSDP2, for LoRA layers of
    (in, out) `shapes` with rank `r` and factors of `element_bytes` each (see the module docstring)."""
    gathers = 3 if rule == "optimizer" else 2
    system = 4 * r * r + r + (r + 1 if rule == "optimizer" else 0)  # H, λ's B block (+ B's norms, ‖U_B U_A‖²)
    groups = len(set(shapes))
    return {"all_gather": {"calls": groups,
                           "bytes": sum(gathers * r * fan_in for fan_in, _ in shapes) * element_bytes},
            "all_reduce": {"calls": 1, "bytes": len(shapes) * system * element_bytes}}


def totals(traffic: dict[str, dict[str, int]]) -> dict[str, int]:
    return {"calls": sum(kind["calls"] for kind in traffic.values()),
            "bytes": sum(kind["bytes"] for kind in traffic.values())}


class CollectiveCounter(TorchDispatchMode):
    """Counts the collectives dispatched while active (calls and payload bytes, by kind)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::")[1]
            kind = next((kind for key, kind in KINDS.items() if key in name), None)
            if kind is not None:
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                payload = max(t.numel() * t.element_size() for t in tensors)
                if name == "all_gather_into_tensor":  # functional: the output is not among the arguments
                    payload *= args[1]
                self.calls[kind] += 1
                self.bytes[kind] += payload
        return func(*args, **(kwargs or {}))

    def traffic(self) -> dict[str, dict[str, int]]:
        return {kind: {"calls": self.calls[kind], "bytes": self.bytes[kind]} for kind in sorted(self.calls)}


def build(settings: dict[str, int], scalora: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The sharded LoRA Llama (same seed in every process) and its optimiser: AdamW, or ScaLoRA around it."""
    from torch.distributed.fsdp import fully_shard

    from scalora import LoraConfig, apply_lora
    from scalora.optim import ScaLoRA
    from scalora.train.models import tiny_network

    model = tiny_network("llama", VOCAB, hidden=settings["hidden"], layers=settings["layers"], positions=256, seed=0)
    config = LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], target_modules="all-linear")
    model = apply_lora(model, config).train()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    return model, (ScaLoRA(model, optimizer) if scalora else optimizer)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               counter: CollectiveCounter | None = None) -> None:
    """One step; with `counter`, the optimiser step's collectives are counted in it."""
    model(ids, labels=ids).loss.backward()
    if counter is None:
        optimizer.step()
    else:
        with counter:
            optimizer.step()
    optimizer.zero_grad()


def worker(rank: int, settings: dict[str, int], port: int, out: str) -> None:
    """One rank: time both methods side by side, count one step's collectives, rank 0 saves the figures."""
    common.init_worker(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        methods = {"lora": build(settings, False), "scalora": build(settings, True)}
        generator = torch.Generator().manual_seed(rank)

        def batch() -> torch.Tensor:
            return torch.randint(2, VOCAB, (settings["batch"], settings["length"]), generator=generator)

        for model, optimizer in methods.values():
            for _ in range(settings["warmup"]):
                train_step(model, optimizer, batch())
        step_ms: dict[str, list[float]] = {name: [] for name in methods}
        for round_ in range(settings["rounds"]):
            for name in (list(methods) if round_ % 2 == 0 else list(methods)[::-1]):
                model, optimizer = methods[name]
                dist.barrier()
                start = time.perf_counter()
                for _ in range(settings["steps"]):
                    train_step(model, optimizer, batch())
                dist.barrier()
                step_ms[name].append(1e3 * (time.perf_counter() - start) / settings["steps"])
        steps: dict[str, Any] = {}
        for name, (model, optimizer) in methods.items():
            whole, opt = CollectiveCounter(), CollectiveCounter()
            with whole:
                train_step(model, optimizer, batch(), opt)
            steps[name] = {"whole_step": whole.traffic(), "optimizer_step": opt.traffic()}
        if rank == 0:
            torch.save({"step_ms": step_ms, "collectives": steps}, out)
    finally:
        dist.destroy_process_group()


def measure(settings: dict[str, int]) -> dict[str, Any]:
    """Run both ranks (forked processes) and return rank 0's figures."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank0.pt")
        mp.start_processes(worker, args=(settings, port, out), nprocs=WORLD_SIZE, join=True,
                           start_method="fork" if sys.platform.startswith("linux") else "spawn")
        return torch.load(out)


def report(settings: dict[str, int], measured: dict[str, Any], argv: Sequence[str] | None) -> dict[str, Any]:
    """The JSON report: timings, ratios, measured and computed collectives, the 7 B figures."""
    step_ms = measured["step_ms"]
    ratios = [s / lo for s, lo in zip(step_ms["scalora"], step_ms["lora"], strict=True)]
    h = settings["hidden"]
    shapes = llama_linear_shapes(settings["layers"], h, 2 * h, h // 2)
    extra = measured["collectives"]["scalora"]["optimizer_step"]
    computed = scaling_step_traffic(shapes, settings["r"])
    big = dict(LLAMA_7B)
    r = big.pop("r")
    big_shapes = llama_linear_shapes(**big)
    big_traffic = scaling_step_traffic(big_shapes, r)
    # FSDP2 gathers every bf16 weight in the forward and again in the backward (reshard_after_forward=True)
    fsdp2_gathers = 2 * 2 * llama_parameters(**big)
    return {
        "command": common.command_line(__file__, argv),
        "environment": common.environment(),
        "settings": settings,
        "step_ms": {name: {"per_round": values, "median": statistics.median(values)}
                    for name, values in step_ms.items()},
        "ratio_scalora_lora": {"per_round": ratios, "median": statistics.median(ratios)},
        "collectives": {
            "measured": measured["collectives"],
            "scalora_step_extra": {"measured": extra, "computed": computed, "agree": extra == computed},
        },
        "llama_7b": {
            "shape": LLAMA_7B,
            "lora_layers": len(big_shapes),
            "scaling_step": big_traffic,
            "total": totals(big_traffic),
            # the prototype's figure: six r × r float32 Grams per layer, all-reduced; A never gathered
            "six_grams_bytes": 6 * r * r * 4 * len(big_shapes),
            # gathering A whole once (the fold into W0's rows needs it), float32
            "A_whole_bytes": sum(r * fan_in for fan_in, _ in big_shapes) * 4,
            "prototype_bytes": PROTOTYPE_BYTES,
            "fsdp2_step_gather_bytes_bf16": fsdp2_gathers,
            "extra_fraction": totals(big_traffic)["bytes"] / fsdp2_gathers,
        },
    }


def _size(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,.0f} B)"
    return f"{n:,.0f} B"


def to_markdown(rep: dict[str, Any]) -> str:
    s, env = rep["settings"], rep["environment"]
    lines = [
        "# ScaLoRA against LoRA under FSDP2 (2 CPU processes)", "",
        f"Command: `{rep['command']}`", "",
        f"torch {env['torch']}, {env['cpu_count']} CPUs, 1 torch thread per process, gloo on loopback, load average "
        f"{env.get('load_average_1_5_15_min')}. Llama with hidden {s['hidden']}, MLP {2 * s['hidden']}, "
        f"{s['layers']} blocks, LoRA r = {s['r']} on every linear layer, float32; {s['batch']} × {s['length']} tokens "
        f"per rank; {s['rounds']} rounds of {s['steps']} steps per method after {s['warmup']} warm-up steps, "
        f"alternating.", "",
        "| method | step ms per round | median ms |", "|---|---|---:|",
    ]
    for name, values in rep["step_ms"].items():
        lines.append(f"| {name} | {', '.join(f'{v:.1f}' for v in values['per_round'])} | {values['median']:.1f} |")
    ratio = rep["ratio_scalora_lora"]
    lines += ["", f"ScaLoRA / LoRA step time, per round: {', '.join(f'{v:.3f}' for v in ratio['per_round'])}; "
                  f"**median {ratio['median']:.3f}**.", "",
              "## Collectives per step (measured on this model)", "",
              "| method | part | kind | calls | payload |", "|---|---|---|---:|---:|"]
    for name, parts in rep["collectives"]["measured"].items():
        for part, kinds in parts.items():
            for kind, figures in kinds.items():
                lines.append(f"| {name} | {part} | {kind} | {figures['calls']} | {_size(figures['bytes'])} |")
    extra = rep["collectives"]["scalora_step_extra"]
    lora_bytes = sum(kind["bytes"] for kind in rep["collectives"]["measured"]["lora"]["whole_step"].values())
    extra_bytes = sum(kind["bytes"] for kind in extra["measured"].values())
    lines += ["", f"ScaLoRA's scaling step, measured = computed from the layer shapes: **{extra['agree']}**. It adds "
                  f"{_size(extra_bytes)} to the {_size(lora_bytes)} that FSDP2 moves in a LoRA step "
                  f"({100 * extra_bytes / lora_bytes:.1f} %).", ""]
    big = rep["llama_7b"]
    lines += [f"## Computed for a 7 B Llama ({big['shape']['layers']} blocks, hidden {big['shape']['hidden']}, MLP "
              f"{big['shape']['intermediate']}, r = {big['shape']['r']} on all {big['lora_layers']} linear layers, "
              f"float32 factors and systems)", "",
              "| collective | calls per scaling step | payload |", "|---|---:|---:|"]
    for kind, figures in big["scaling_step"].items():
        lines.append(f"| {kind} | {figures['calls']} | {_size(figures['bytes'])} |")
    lines.append(f"| total | {big['total']['calls']} | {_size(big['total']['bytes'])} |")
    lines += ["", f"FSDP2 itself gathers every weight in the forward and again in the backward: "
                  f"{big['fsdp2_step_gather_bytes_bf16'] / 2**30:.1f} GiB per step in bf16, so a scaling step adds "
                  f"{100 * big['extra_fraction']:.2f} % to the traffic, in {big['total']['calls']} calls."]
    lines += ["", f"The prototype's ≈ {big['prototype_bytes'] / 1e3:.0f} KB is six r × r float32 Gram matrices per "
                  f"layer all-reduced: {_size(big['six_grams_bytes'])}. It leaves out A: the fold into a rank's rows "
                  f"of W0 needs A whole, at least one gather of r × in per layer, {_size(big['A_whole_bytes'])}; "
                  f"ScaLoRA gathers A, its gradient and the optimiser's direction for A (three per layer, one call "
                  f"per shape group), and all-reduces the partial systems (4r² + 2r + 1 numbers per layer) instead of "
                  f"six Grams.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({SMALL[key]} with --small)")
    parser.add_argument("--small", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    base = SMALL if args.small else DEFAULTS
    settings = {key: base[key] if getattr(args, key) is None else getattr(args, key) for key in DEFAULTS}
    rep = report(settings, measure(settings), argv)
    common.save_report(args.out, rep, to_markdown)
    return rep


if __name__ == "__main__":
    main()
