"""How many operations a ScaLoRA step dispatches, against AdamW's own: the kernel launches a GPU would pay.

On a GPU a small step is bound by kernel launches (a few microseconds each), which timings on CPU do not show. This
script counts, with a dispatch mode, every tensor operation that computes something (views and host reads of the
optimiser's step counters excluded) during one ``optimizer.step()`` of AdamW alone and of ScaLoRA around the same
AdamW, on tiny Llamas with LoRA r = 8 on every linear layer (7 layers per block, 4 shapes), for several block
counts; the growth per adapted layer is the slope between the smallest and largest model. Multi-tensor operations
(``torch._foreach_*``) count once, as they launch a few kernels for many tensors on CUDA. Counts do not depend on the
machine, so one run suffices.

    python benchmarks/step_ops.py                 # blocks 2, 4, 8
    python benchmarks/step_ops.py --blocks 2 4 --out /tmp/ops.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from common import command_line, environment, save_report
from torch.utils._python_dispatch import TorchDispatchMode

#: operations that only describe memory (no kernel), and host reads of the optimiser's host-side step counters
NOT_LAUNCHED = {"view", "_unsafe_view", "unsqueeze", "squeeze", "expand", "select", "slice", "t", "transpose",
                "permute", "as_strided", "alias", "detach", "split", "split_with_sizes", "unbind", "reshape",
                "_local_scalar_dense", "_record_function_enter_new", "_record_function_exit"}
VOCAB = 256
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "step_ops.json"


class OpCounter(TorchDispatchMode):
    """Counts the dispatched operations by name while active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launched(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in NOT_LAUNCHED)


def count(blocks: int, hidden: int, r: int, scalora: bool) -> dict[str, Any]:
    """Operations of one optimiser step (the fourth, so every state exists) on a Llama of `blocks` blocks."""
    from scalora import LoraConfig, ScaLoRA, apply_lora, lora_factors
    from scalora.train.models import tiny_network

    model = tiny_network("llama", VOCAB, hidden=hidden, layers=blocks, positions=64, seed=0)
    model = apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if scalora:
        optimizer = ScaLoRA(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    counter = OpCounter()
    for step in range(4):
        ids = torch.randint(2, VOCAB, (2, 16), generator=generator)
        model(ids, labels=ids).loss.backward()
        if step == 3:
            with counter:
                optimizer.step()
        else:
            optimizer.step()
        optimizer.zero_grad()
    return {"blocks": blocks, "layers": len(lora_factors(model)), "launched": counter.launched,
            "by_op": dict(counter.counts.most_common())}


def markdown(report: dict[str, Any]) -> str:
    """The counts per model size and ScaLoRA's extra operations per adapted layer."""
    args = report["args"]
    lines = ["# Operations dispatched by one optimiser step: ScaLoRA against AdamW", "",
             f"Written by `benchmarks/step_ops.py` (`{report['command']}`). Tiny Llamas (hidden {args['hidden']}), "
             f"LoRA r = {args['r']} on every linear layer; operations that compute something (views and host reads "
             "of the optimiser's step counters excluded), a multi-tensor operation counted once.", "",
             "| blocks | adapted layers | AdamW step | ScaLoRA step | ScaLoRA's extra |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['blocks']} | {row['layers']} | {row['adamw']} | {row['scalora']} | {row['extra']} |"
              for row in report["rows"]]
    lines += ["", f"ScaLoRA's extra operations: **{report['extra_per_layer']:.1f} per adapted layer** plus "
              f"{report['extra_fixed']:.0f} per step (per shape group the stacked directions and Gram products, and "
              "one batched solve for all layers)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for blocks in sorted(args.blocks):
        adamw, scalora = (count(blocks, args.hidden, args.r, flag) for flag in (False, True))
        rows.append({"blocks": blocks, "layers": adamw["layers"], "adamw": adamw["launched"],
                     "scalora": scalora["launched"], "extra": scalora["launched"] - adamw["launched"],
                     "scalora_by_op": scalora["by_op"]})
    first, last = rows[0], rows[-1]
    per_layer = (last["extra"] - first["extra"]) / max(last["layers"] - first["layers"], 1)
    report = {"command": command_line(__file__, argv), "environment": environment(),
              "args": {**vars(args), "out": str(args.out)}, "rows": rows, "extra_per_layer": per_layer,
              "extra_fixed": first["extra"] - per_layer * first["layers"]}
    save_report(args.out, report, markdown)
    return report


if __name__ == "__main__":
    main()
