"""Where rank decides: a planted teacher that LoRA r = 4 cannot reach and full fine-tuning can; and a real model.

Problem (the "teacher" arm, `scalora.train.planted`): a "pre-trained" MLP 64 → 256 → 256 → 64 is trained towards
a teacher, the same network with every weight moved by a full-rank Gaussian perturbation, on fresh inputs each step;
the loss is the held-out one relative to the start. An adapter of rank r can move each weight by rank r only: LoRA
r = 4 stops at its rank floor while full fine-tuning goes on. **Gate:** full fine-tuning must end ≤ 0.1× LoRA r = 4's
loss, or the arm cannot decide anything (checked and reported).

The "facts" arm (``--size facts``, `benchmarks/facts.py`): MiniLM (its first two layers) memorises 256 new random
name → class facts through a frozen random head; the loss is over the whole table. Same methods, gate and report;
full fine-tuning trains exactly the matrices the adapters adapt, on a grid of its own.

Methods: full fine-tuning; LoRA r = 4, 16, 64; ReLoRA r = 4 (merge and restart every `reset_every` steps); and at
r = 4 ScaLoRA and ScaLoRA-I (interval 10) at their defaults (the optimiser-aware rule, ``c="lora-step"``), with the
first-order c (``c="first-order"``, the previous default) and with the paper's rule (c = 1). All use AdamW (no
weight decay); the learning rate is constant on the teacher (its held-out loss on fresh inputs is smooth) and decays
on a cosine on the facts (`scalora.train.planted.lr_schedule`; ReLoRA re-warms after each restart), where at a
constant rate the last steps of memorisation oscillate. Each method's learning rate is tuned
on the tuning seeds over a grid wide enough that the best point is interior (checked and reported), then the held-out
seeds are run at that learning rate. Reported per method: final loss (mean ± std over held-out seeds, and each seed's
ratio to tuned LoRA r = 4 on the same seed), the steps and seconds each run needs to reach tuned LoRA r = 4's final
loss, and the effective rank of the accumulated update W − W_pretrained of the middle layer over training. An
ablation sweeps ρ (``factor_norm``, the factor size behind the default ``c="lora-step"``) at ScaLoRA's tuned learning
rate. ``--fixed-lr`` skips the tuning and runs every method at one learning rate (ScaLoRA's defaults at LoRA's
tuned learning rate: the setting a new user meets).

Run ``python benchmarks/rank_decides.py --help``; ``--size small`` takes minutes, ``--size full`` and
``--size facts`` about 40 minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from scalora.optim import ScaLoRA  # noqa: E402
from scalora.relora import ReLoRA  # noqa: E402
from scalora.train.planted import PlantedMethod, train_planted  # noqa: E402
from scalora.wrapper import OptimizerWrapper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Method:
    """One method of the study: adapter rank (0 = full fine-tuning) and how its optimiser is wrapped."""

    name: str
    label: str
    r: int
    wrapper: type[OptimizerWrapper] | None = None  # ScaLoRA, ReLoRA, or None for plain AdamW
    options: tuple[tuple[str, object], ...] = ()  # ScaLoRA's keyword arguments


METHODS = (
    Method("full", "full fine-tuning", 0),
    Method("lora-r4", "LoRA r=4", 4),
    Method("lora-r16", "LoRA r=16", 16),
    Method("lora-r64", "LoRA r=64", 64),
    Method("relora", "ReLoRA r=4", 4, ReLoRA),
    Method("scalora", "ScaLoRA r=4 (defaults: c='lora-step')", 4, ScaLoRA),
    Method("scalora-i", "ScaLoRA-I r=4 (defaults, I=10)", 4, ScaLoRA, (("interval", 10),)),
    Method("scalora-first-order", "ScaLoRA r=4 (c='first-order', τ=0.3)", 4, ScaLoRA, (("c", "first-order"),)),
    Method("scalora-first-order-i", "ScaLoRA-I r=4 (c='first-order', I=10)", 4, ScaLoRA,
           (("c", "first-order"), ("interval", 10))),
    Method("scalora-paper", "ScaLoRA r=4 (paper rule, c=1)", 4, ScaLoRA, (("rule", "paper"),)),
    Method("scalora-paper-i", "ScaLoRA-I r=4 (paper rule, c=1, I=10)", 4, ScaLoRA,
           (("rule", "paper"), ("interval", 10))),
)
BY_NAME = {m.name: m for m in METHODS}
REFERENCE = "lora-r4"


@dataclass(frozen=True)
class Size:
    arm: str  # "teacher" (scalora.train.planted) or "facts" (benchmarks/facts.py: MiniLM memorising new facts)
    steps: int
    eval_every: int
    lrs: tuple[float, ...]
    tune_seeds: tuple[int, ...]
    report_seeds: tuple[int, ...]
    factor_norms: tuple[float, ...]  # the ablation of ScaLoRA's factor_norm ρ
    reset_every: int
    full_lrs: tuple[float, ...] | None = None  # full fine-tuning's own grid, if not `lrs`
    schedule: str = "constant"  # the learning-rate schedule (`scalora.train.planted.lr_schedule`)


SIZES = {
    "small": Size("teacher", steps=600, eval_every=50, lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), tune_seeds=(0,),
                  report_seeds=(2, 3), factor_norms=(0.15, 0.3, 0.577), reset_every=50),
    "micro": Size("teacher", steps=20, eval_every=10, lrs=(1e-3, 3e-3, 1e-2), tune_seeds=(0,), report_seeds=(1,),
                  factor_norms=(0.3,), reset_every=10),  # seconds, for the smoke test
    "full": Size("teacher", steps=2000, eval_every=100, lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
                 tune_seeds=(0, 1), report_seeds=(2, 3, 4, 5, 6), factor_norms=(0.1, 0.2, 0.3, 0.577, 1.0),
                 reset_every=200),
    "facts": Size("facts", steps=400, eval_every=50, lrs=(2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3), tune_seeds=(0, 1),
                  report_seeds=(2, 3, 4, 5, 6), factor_norms=(0.3, 0.577, 1.0), reset_every=100,
                  full_lrs=(3e-5, 1e-4, 3e-4, 1e-3), schedule="cosine"),
    "facts-micro": Size("facts", steps=4, eval_every=2, lrs=(1e-3, 2e-3), tune_seeds=(0,), report_seeds=(1,),
                        factor_norms=(0.3,), reset_every=2, full_lrs=(3e-4,), schedule="cosine"),  # smoke test
}
ARMS = {  # what each arm's figures say
    "teacher": ("planted teacher: loss", "held-out loss / initial", "middle layer (256 × 256)"),
    "facts": ("MiniLM memorising new facts: loss", "loss over the table", "a query projection (384 × 384)"),
}


def grid(size: Size, method: str) -> tuple[float, ...]:
    """The learning rates `method` is tuned over."""
    return size.full_lrs if method == "full" and size.full_lrs else size.lrs


# ----------------------------------------------------------------------------------------------------------------------
# one run


def train(method_name: str, lr: float, seed: int, size_name: str, factor_norm: float | None = None,
          warmup: int = 0) -> dict[str, object]:
    """One run of the size's arm (`warmup` steps of linear warm-up before its schedule): its curve and final loss
    (inf if it diverged)."""
    common.set_threads(1)
    size, method = SIZES[size_name], BY_NAME[method_name]
    options = dict(method.options)
    if method.wrapper is ReLoRA:
        options["reset_every"] = size.reset_every
    if factor_norm is not None:
        options["factor_norm"] = factor_norm
    if size.arm == "teacher":
        trainer = train_planted
    else:
        from facts import train_facts as trainer
    curve = trainer(PlantedMethod(method.r, method.wrapper, options), lr, seed, size.steps, size.eval_every,
                    size.schedule, warmup)
    return {"method": method_name, "lr": lr, "seed": seed, "factor_norm": factor_norm, "final": curve[-1]["loss"],
            "curve": curve}


# ----------------------------------------------------------------------------------------------------------------------
# the study


def first_reach(curve: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first evaluation at or below `target` (steps and training seconds), None if never."""
    for row in curve:
        if row["loss"] <= target:
            return row
    return None


def tune(runs: list[dict], methods: list[str], size: Size) -> dict[str, dict]:
    """Each method's best learning rate on the tuning seeds (mean final loss), and whether it is interior."""
    out = {}
    for name in methods:
        lrs = grid(size, name)
        means = {lr: statistics.fmean(r["final"] for r in runs if r["method"] == name and r["lr"] == lr)
                 for lr in lrs}
        best = min(means, key=lambda lr: means[lr])
        out[name] = {"best_lr": best, "interior": lrs[0] < best < lrs[-1], "grid": means}
    return out


def summarise(report: list[dict], tuned: dict[str, dict]) -> dict[str, dict]:
    ref = {r["seed"]: r for r in report if r["method"] == REFERENCE}
    table = {}
    for name, info in tuned.items():
        runs = sorted((r for r in report if r["method"] == name), key=lambda r: r["seed"])
        reach = [first_reach(r["curve"], ref[r["seed"]]["final"]) for r in runs]
        ref_steps = [ref[r["seed"]]["curve"][-1]["step"] for r in runs]
        ref_seconds = [ref[r["seed"]]["curve"][-1]["time_s"] for r in runs]
        table[name] = {
            "label": BY_NAME[name].label, "lr": info["best_lr"], "lr_interior": info["interior"],
            "final": common.mean_std(r["final"] for r in runs),
            "final_median": statistics.median(r["final"] for r in runs),
            "ratio_to_lora_r4": [ref[r["seed"]]["final"] / r["final"] for r in runs],
            "steps_to_lora_r4": [x["step"] if x else None for x in reach],
            "step_fraction_of_lora_r4": [x["step"] / s if x else None for x, s in zip(reach, ref_steps, strict=True)],
            "seconds_to_lora_r4": [x["time_s"] if x else None for x in reach],
            "time_fraction_of_lora_r4": [x["time_s"] / t if x else None
                                         for x, t in zip(reach, ref_seconds, strict=True)],
            "final_rank": [r["curve"][-1]["rank"] for r in runs],
        }
    return table


def markdown(result: dict) -> str:
    rows = ["| method | lr (tuned) | final loss (held-out seeds; median) | × below tuned LoRA r=4 (per seed) | "
            "steps (time) to LoRA r=4's final loss | rank of update (tracked layer) |", "|---|---|---|---|---|---|"]
    for row in result["table"].values():
        ratios = ", ".join(f"{x:.1f}" for x in row["ratio_to_lora_r4"])
        fr = ", ".join("–" if x is None else f"{x:.2f} ({t:.2f})"
                       for x, t in zip(row["step_fraction_of_lora_r4"], row["time_fraction_of_lora_r4"], strict=True))
        ranks = ", ".join(str(x) for x in row["final_rank"])
        lr = f"{row['lr']:g}" + {True: "", False: " (edge)", None: " (fixed)"}[row["lr_interior"]]
        rows.append(f"| {row['label']} | {lr} | {common.fmt_mean_std(row['final'], 4)}; {row['final_median']:.4f} | "
                    f"{ratios} | {fr} × LoRA's | {ranks} |")
    gate = result["gate"]
    rows.append("")
    if gate is None:
        rows.append("Gate: not checked here (full fine-tuning was not among the methods).")
    else:
        rows.append(f"Gate: full fine-tuning ends at {gate['full']:.4f}, LoRA r=4 at {gate['lora_r4']:.4f} "
                    f"(ratio {gate['ratio']:.4f}; needs ≤ 0.1): {'passed' if gate['passed'] else 'FAILED'}.")
    grids = {name: info["grid"] for name, info in result["tuning"].items() if info["grid"]}
    if grids:
        lrs = sorted({float(lr) for grid_ in grids.values() for lr in grid_})
        rows += ["", "Tuning (mean final loss over the tuning seeds; – not on that method's grid):", "",
                 "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for name, grid_ in grids.items():
            by_lr = {float(lr): loss for lr, loss in grid_.items()}
            cells = ("–" if lr not in by_lr else f"{by_lr[lr]:.4f}" for lr in lrs)
            rows.append(f"| {BY_NAME[name].label} | " + " | ".join(cells) + " |")
    if result.get("factor_norm"):
        rows.append("")
        rows.append("| ρ (factor_norm of c=\"lora-step\") | final loss (held-out seeds) |")
        rows.append("|---|---|")
        for rho, stats in result["factor_norm"].items():
            rows.append(f"| {rho} | {common.fmt_mean_std(stats, 4)} |")
    return "\n".join(rows) + "\n"


def plot(result: dict, report: list[dict], path: Path) -> None:
    title, ylabel, layer = ARMS[result["size"]["arm"]]
    plt = common.pyplot()
    fig, (ax_loss, ax_rank) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in result["table"]:
        runs = [r for r in report if r["method"] == name]
        steps = [row["step"] for row in runs[0]["curve"]]
        n = min(len(r["curve"]) for r in runs)
        loss = [statistics.geometric_mean(max(r["curve"][i]["loss"], 1e-12) for r in runs) for i in range(n)]
        rank = [statistics.fmean(r["curve"][i]["rank"] for r in runs) for i in range(n)]
        ax_loss.plot(steps[:n], loss, label=BY_NAME[name].label)
        ax_rank.plot(steps[:n], rank, label=BY_NAME[name].label)
    ax_loss.set(yscale="log", xlabel="step", ylabel=f"{ylabel} (geometric mean over seeds)", title=title)
    ax_rank.set(xlabel="step", ylabel="effective rank of W − W_pretrained", title=layer)
    ax_loss.legend(fontsize=7)
    common.save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--methods", default=",".join(m.name for m in METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for rank_decides.{json,md,png}")
    parser.add_argument("--fixed-lr", type=float, default=None,
                        help="no tuning: every method at this learning rate, on the report seeds")
    parser.add_argument("--warmup", type=int, default=0,
                        help="steps of linear learning-rate warm-up of every run (cosine schedules only: facts)")
    parser.add_argument("--stem", default=None, help="file name stem of the results (default from --size)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(BY_NAME))
    if unknown or REFERENCE not in methods:
        parser.error(f"unknown methods {unknown}" if unknown else f"--methods must include {REFERENCE}")

    if args.fixed_lr is None:
        jobs = [(m, lr, seed, args.size, None, args.warmup) for m in methods for lr in grid(size, m)
                for seed in size.tune_seeds]
        tuned = tune(common.map_jobs(train, jobs, workers=args.jobs), methods, size)
    else:
        tuned = {m: {"best_lr": args.fixed_lr, "interior": None, "grid": {}} for m in methods}
    jobs = [(m, tuned[m]["best_lr"], seed, args.size, None, args.warmup) for m in methods for seed in size.report_seeds]
    report = common.map_jobs(train, jobs, workers=args.jobs)
    rho_runs = []
    if "scalora" in methods:
        jobs = [("scalora", tuned["scalora"]["best_lr"], seed, args.size, rho, args.warmup)
                for rho in size.factor_norms for seed in size.report_seeds]
        rho_runs = common.map_jobs(train, jobs, workers=args.jobs)
    table = summarise(report, tuned)
    gate = None
    if "full" in table:
        gate = {"full": table["full"]["final"]["mean"], "lora_r4": table[REFERENCE]["final"]["mean"]}
        gate["ratio"] = gate["full"] / gate["lora_r4"]
        gate["passed"] = gate["ratio"] <= 0.1
    result = {
        "command": common.command_line(__file__, argv), "size": asdict(size), "warmup": args.warmup,
        "environment": common.environment(),
        "gate": gate, "tuning": tuned, "table": table,
        "factor_norm": {str(rho): common.mean_std(r["final"] for r in rho_runs if r["factor_norm"] == rho)
                        for rho in size.factor_norms} if rho_runs else {},
        "runs": [{k: v for k, v in r.items()} for r in report],
    }
    stem = args.stem or ("rank_decides" if args.size == "full" else f"rank_decides_{args.size}")
    common.save_json(args.out / f"{stem}.json", result)
    (args.out / f"{stem}.md").write_text(markdown(result))
    plot(result, report, args.out / f"{stem}.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
