"""The first part of ``scalora demo``: a task where rank decides, so a new user sees what ScaLoRA's accumulation buys.

Full fine-tuning, LoRA r = 4 and ScaLoRA r = 4 (its defaults) on the planted teacher of `scalora.train.planted`,
each at the learning rate the benchmark (benchmarks/rank_decides.py) found best for it; about 15 s on 2 cores.
"""

from __future__ import annotations

import json
from pathlib import Path

from scalora.optim import ScaLoRA
from scalora.train.planted import PlantedMethod, train_planted

#: (label, method, learning rate): ScaLoRA at LoRA's learning rate (its default c makes the step as large as LoRA's)
RUNS = (
    ("full fine-tuning", PlantedMethod(0), 1e-3),
    ("LoRA r=4", PlantedMethod(4), 3e-3),
    ("ScaLoRA r=4", PlantedMethod(4, ScaLoRA), 3e-3),
)


def rank_demo(output_dir: Path, steps: int = 600, seed: int = 0) -> str:
    """Train the three runs, write ``rank_decides.json`` and ``rank_decides.png`` into `output_dir`, and return a
    small table: final held-out loss (1 = where training started) and the rank of the middle layer's update."""
    curves = {label: train_planted(method, lr, seed, steps, eval_every=max(1, steps // 12))
              for label, method, lr in RUNS}
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "rank_decides.json").write_text(json.dumps(curves, indent=1) + "\n")
    _plot(curves, output_dir / "rank_decides.png")
    width = max(len(label) for label in curves)
    lines = [f"{'method':<{width}}  held-out loss  rank of the update (256 × 256 layer)"]
    for label, curve in curves.items():
        lines.append(f"{label:<{width}}  {curve[-1]['loss']:13.4f}  {curve[-1]['rank']:>4}")
    return "\n".join(lines)


def _plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rank) = plt.subplots(1, 2, figsize=(10, 4))
    for label, curve in curves.items():
        steps = [row["step"] for row in curve]
        ax_loss.plot(steps, [row["loss"] for row in curve], label=label)
        ax_rank.plot(steps, [row["rank"] for row in curve], label=label)
    ax_loss.set(yscale="log", xlabel="step", ylabel="held-out loss / initial", title="a task where rank decides")
    ax_rank.set(xlabel="step", ylabel="effective rank of W − W_pretrained", title="the update of one 256 × 256 layer")
    ax_loss.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
