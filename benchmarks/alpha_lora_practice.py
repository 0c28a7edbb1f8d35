"""α-LoRA vs LoRA in practice: accuracy over seeds, and the α vectors the method learns, layer by layer.

α-LoRA (El Firdoussi et al., arXiv 2510.21345) adds a vector a (initialised to 1) that rescales the rows of every
frozen adapted weight, y = a ⊙ (W0 x + b0) + s·B A x, trained with its own Adam (lr 5e-3, betas (0.9, 0.99)) on a
held-out slice of the training data every T = 10 adapter steps. The paper reports small accuracy gains over LoRA
(RoBERTa-base, r = 8: MNLI 86.3 vs 85.7, RTE 77.6 vs 75.8) and learned vectors with mean ≈ 1 whose spread grows with
depth (value projection: std 0.15 in layer 0 to 0.32 in layer 11 on MNLI).

This script trains methods ``lora`` and ``alpha-lora`` with the same r, lora_alpha, learning rate, steps and seeds
(`scalora.train.train`, one `TrainConfig` per run) on

* ``minilm``: all-MiniLM-L6-v2 on the sarcasm headlines (accuracy on 500 held-out headlines), and
* ``smollm2``: SmolLM2-135M on Social IQa (3-way multiple choice scored by log-likelihood, accuracy on
  ``eval_limit`` questions),

plus a control, ``alpha-frozen`` (alpha-lora with α's learning rate at 1e-12: the same held-out split, data and batch
order as alpha-lora, but α stays 1), which separates the effect of learning α from that of holding data out. It
reports the final accuracy mean ± std per method (and the paired per-seed differences), and reads the learned α
vectors back from each saved adapter (``adapter/adapter_model.safetensors``, keys
``base_model.model.<module>.alpha_vector``) to plot their mean and spread (std over the vector's entries) against the
layer depth, per module type. Run ``python benchmarks/alpha_lora_practice.py --help``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # loaded from a test rather than run as a script
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

# "alpha-frozen" is the control: method alpha-lora with α's learning rate at 1e-12, so its α stays at 1 while
# everything else (the held-out split, the adapters' data and batch order, the extra held-out forward passes and the
# random stream they use) is exactly as in the alpha-lora run of the same seed. alpha-lora minus alpha-frozen is the
# effect of learning α; alpha-frozen minus lora is the effect of holding data out.
METHODS = ("lora", "alpha-lora", "alpha-frozen")
FROZEN_ALPHA_LR = 1e-12
OUT_JSON = "alpha_lora_practice.json"
OUT_FIG = "alpha_lora_practice.png"
OUT_MD = "alpha_lora_practice.md"
PREFIX = "base_model.model."
SUFFIX = ".alpha_vector"


@dataclass(frozen=True)
class Part(common.Part):
    """One model + task experiment of the study, at one learning rate."""

    lr: float
    r: int
    lora_alpha: float
    alpha_every: int
    alpha_lr: float
    alpha_holdout: int
    base_eval: bool  # also score the untrained model (adapters at zero) on each seed's eval set
    target_modules: str = "all-linear"


SIZES: dict[str, dict[str, Part]] = {
    "small": {
        "minilm": Part("minilm", "minilm", "sarcasm", None, steps=120, batch_size=16, max_length=48, train_size=2000,
                       eval_size=None, eval_limit=None, seeds=(0, 1, 2), lr=5e-4, r=8, lora_alpha=16.0, alpha_every=2,
                       alpha_lr=5e-3, alpha_holdout=256, base_eval=False),
        "smollm2": Part("smollm2", "smollm2-135m", "socialiqa", None, steps=40, batch_size=4, max_length=128,
                        train_size=None, eval_size=None, eval_limit=200, seeds=(0, 1), lr=5e-4, r=8, lora_alpha=16.0,
                        alpha_every=2, alpha_lr=5e-3, alpha_holdout=256, base_eval=True),
    },
    # about 1.1 h with --workers 2 on an idle 2-core machine (docs/results.md gives the arithmetic)
    "full": {
        "minilm": Part("minilm", "minilm", "sarcasm", None, steps=1000, batch_size=16, max_length=48,
                       train_size=16000, eval_size=2000, eval_limit=None, seeds=(0, 1, 2, 3, 4), lr=5e-4, r=8,
                       lora_alpha=16.0, alpha_every=10, alpha_lr=5e-3, alpha_holdout=1024, base_eval=False),
        "smollm2": Part("smollm2", "smollm2-135m", "socialiqa", None, steps=200, batch_size=4, max_length=128,
                        train_size=None, eval_size=None, eval_limit=None, seeds=(0, 1, 2), lr=5e-4, r=8,
                        lora_alpha=16.0, alpha_every=10, alpha_lr=5e-3, alpha_holdout=256, base_eval=True),
    },
}


# ----------------------------------------------------------------------------------------------------------
# Runs


def make_config(part: Part, method: str, seed: int, out: Path) -> Any:
    from scalora.train.config import TrainConfig

    frozen = method == "alpha-frozen"
    return TrainConfig(
        model=part.model, task=part.task, train_file=part.train_file, method="alpha-lora" if frozen else method,
        r=part.r,
        lora_alpha=part.lora_alpha, lr=part.lr, steps=part.steps, batch_size=part.batch_size,
        max_length=part.max_length, train_size=part.train_size, eval_size=part.eval_size, eval_limit=part.eval_limit,
        seed=seed, target_modules=part.target_modules, alpha_every=part.alpha_every,
        alpha_lr=FROZEN_ALPHA_LR if frozen else part.alpha_lr,
        alpha_holdout=part.alpha_holdout, schedule="linear", warmup_steps=0, max_grad_norm=1.0, output_dir=str(out),
        overwrite=True, progress=False, tensorboard=False, rank_layers=0,
    )


def module_depth_type(module: str) -> tuple[int | None, str]:
    """``bert.encoder.layer.3.attention.self.value`` -> (3, ``attention.self.value``); (None, name) without an
    index (e.g. BERT's pooler)."""
    parts = module.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return int(parts[i]), ".".join(parts[i + 1:])
    return None, module


def read_alpha_vectors(adapter_dir: str | Path) -> dict[str, list[float]]:
    """``{module: α vector}`` from a saved α-LoRA adapter folder."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        if key.endswith(SUFFIX):
            name = key[: -len(SUFFIX)]
            name = name[len(PREFIX):] if name.startswith(PREFIX) else name
            out[name] = value.double().flatten().tolist()
    return out


def alpha_stats(vectors: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Per module: depth, type, size, mean, std (population, over the vector's entries), min, max, mean |α − 1|."""
    rows = []
    for module, vec in sorted(vectors.items()):
        depth, kind = module_depth_type(module)
        rows.append({"module": module, "depth": depth, "type": kind, "n": len(vec), "mean": statistics.fmean(vec),
                     "std": statistics.pstdev(vec), "min": min(vec), "max": max(vec),
                     "mean_abs_dev_from_1": statistics.fmean(abs(v - 1.0) for v in vec)})
    return rows


def base_accuracy(part: Part, seed: int) -> dict[str, float]:
    """The untrained model's eval score on the eval set of `seed` (a LoRA model starts exactly there)."""
    from scalora.train.models import load_model
    from scalora.train.tasks import load_task

    task = load_task(part.task, train_file=part.train_file, train_size=part.train_size, eval_size=part.eval_size,
                     seed=seed)
    model, tokenizer = load_model(part.model, task.kind, num_labels=task.num_labels)
    t0 = time.perf_counter()
    res = task.evaluate(model, tokenizer, max_length=part.max_length, batch_size=32, limit=part.eval_limit)
    print(f"[{part.name}] base model seed={seed}: {task.metric} {res[task.metric]:.3f}", flush=True)
    return {**{k: float(v) for k, v in res.items()}, "seed": seed, "wall_s": time.perf_counter() - t0}


def one_run(part: Part, method: str, seed: int, work: Path, reuse: bool = False) -> dict[str, Any]:
    """One training run and its numbers (and its α vectors, for alpha-lora); with `reuse`, a finished run of the
    same computation in the work folder is read back instead."""
    out = work / part.name / f"{method}-s{seed}"
    t0 = time.perf_counter()
    res = common.run_config(make_config(part, method, seed, out), reuse=reuse)
    rows, s = res["metrics"], res["summary"]
    last_eval = next((row for row in reversed(rows) if any(k.startswith("eval/") for k in row)), {})
    record: dict[str, Any] = {
        "part": part.name, "method": method, "seed": seed, "output_dir": str(out), "metric": s["metric"],
        "eval": s["eval"],
        "eval_all": {k[len("eval/"):]: v for k, v in last_eval.items() if k.startswith("eval/")},
        "final_train_loss": common.tail_mean(rows, "loss", 10), "trainable_params": s["trainable_params"],
        "train_wall_s": s["wall_time_s"], "median_step_s": s["median_step_s"], "reused": res["reused"],
        "loss_curve": common.column(rows, "loss"),
    }
    if method in ("alpha-lora", "alpha-frozen"):
        vectors = read_alpha_vectors(out / "adapter")
        record["alpha_steps"] = part.steps // part.alpha_every
        record["alpha_heldout_loss"] = common.column(rows, "alpha/heldout_loss")
        if method == "alpha-lora":
            record["alpha_stats"] = alpha_stats(vectors)
        flat = [v for vec in vectors.values() for v in vec]
        record["alpha_overall"] = {"mean": statistics.fmean(flat), "std": statistics.pstdev(flat), "min": min(flat),
                                   "max": max(flat), "modules": len(vectors), "entries": len(flat)}
    record["wall_s"] = time.perf_counter() - t0
    extra = ""
    if "alpha_overall" in record:
        extra = f", α mean {record['alpha_overall']['mean']:.4f} std {record['alpha_overall']['std']:.4f}"
    print(f"[{part.name}] {method:10s} seed={seed}: {s['metric']} {s['eval']:.4f}, final loss "
          f"{record['final_train_loss']:.4f}{extra}, {record['wall_s']:.0f} s", flush=True)
    return record


# ----------------------------------------------------------------------------------------------------------
# Summaries and figures


def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def _pearson(x: list[float], y: list[float]) -> float | None:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def seed_agreement(alpha_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Do different seeds learn the same α? Pearson correlation of a module's α vectors between two seeds (mean over
    seed pairs), per module type, and the same for mismatched modules of equal size as a no-signal reference.
    Reads the adapters back from the runs' folders (None when fewer than two are there)."""
    vectors = [read_alpha_vectors(Path(x["output_dir"]) / "adapter") for x in alpha_runs
               if (Path(x["output_dir"]) / "adapter" / "adapter_model.safetensors").is_file()]
    if len(vectors) < 2:
        return None
    modules = sorted(vectors[0])
    same: dict[str, list[float]] = {}
    mismatched: list[float] = []
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            for k, module in enumerate(modules):
                c = _pearson(vectors[i][module], vectors[j][module])
                if c is not None:
                    same.setdefault(module_depth_type(module)[1], []).append(c)
                # reference: the next module with a vector of the same length, from the other seed
                other = next((m for m in modules[k + 1:] + modules[:k]
                              if len(vectors[j][m]) == len(vectors[i][module])), None)
                if other is not None:
                    c = _pearson(vectors[i][module], vectors[j][other])
                    if c is not None:
                        mismatched.append(c)
    return {"same_module_by_type": {k: statistics.fmean(v) for k, v in sorted(same.items())},
            "same_module_all": statistics.fmean(c for v in same.values() for c in v),
            "mismatched_modules_reference": statistics.fmean(mismatched) if mismatched else None,
            "seeds": len(vectors)}


def summarise(part: Part, runs: list[dict[str, Any]], base: list[dict[str, Any]]) -> dict[str, Any]:
    acc = {m: common.mean_std(x["eval"] for x in runs if x["method"] == m) for m in METHODS}
    by_seed = {m: {x["seed"]: x["eval"] for x in runs if x["method"] == m} for m in METHODS}

    def paired(a: str, b: str) -> dict[str, Any]:
        return common.mean_std(by_seed[a][sd] - by_seed[b][sd] for sd in part.seeds
                               if sd in by_seed[a] and sd in by_seed[b])

    loss = {m: common.mean_std(x["final_train_loss"] for x in runs if x["method"] == m) for m in METHODS}
    extra_metrics = sorted({k for x in runs for k in x["eval_all"] if k not in ("n", x["metric"])})
    other = {k: {m: common.mean_std(x["eval_all"][k] for x in runs if x["method"] == m and k in x["eval_all"])
                 for m in METHODS} for k in extra_metrics}
    # α by depth and module type, averaged over seeds
    alpha_runs = [x for x in runs if x["method"] == "alpha-lora"]
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    others: dict[str, list[dict[str, Any]]] = {}
    for x in alpha_runs:
        for row in x["alpha_stats"]:
            if row["depth"] is None:
                others.setdefault(row["type"], []).append(row)
            else:
                cells.setdefault((row["type"], row["depth"]), []).append(row)
    by_type: dict[str, Any] = {}
    for kind in sorted({k for k, _ in cells}):
        depths = sorted(d for k, d in cells if k == kind)
        entries = []
        for d in depths:
            rows = cells[(kind, d)]
            entries.append({"depth": d, "mean": statistics.fmean(r["mean"] for r in rows),
                            "std": statistics.fmean(r["std"] for r in rows),
                            "std_across_seeds_of_std": statistics.stdev([r["std"] for r in rows]) if len(rows) > 1
                            else None,
                            "min": min(r["min"] for r in rows), "max": max(r["max"] for r in rows)})
        by_type[kind] = {
            "by_depth": entries,
            "std_vs_depth_slope": _slope([float(e["depth"]) for e in entries], [e["std"] for e in entries]),
            "std_first_layer": entries[0]["std"], "std_last_layer": entries[-1]["std"],
            "mean_over_layers": statistics.fmean(e["mean"] for e in entries),
        }
    overall = [x["alpha_overall"] for x in alpha_runs]
    return {
        "accuracy": acc, "paired_difference_alpha_minus_lora": paired("alpha-lora", "lora"),
        "paired_difference_alpha_minus_frozen": paired("alpha-lora", "alpha-frozen"),
        "paired_difference_frozen_minus_lora": paired("alpha-frozen", "lora"), "final_train_loss": loss,
        "other_metrics": other,
        "base_model": common.mean_std(b[part_metric(runs)] for b in base) if base else None,
        "alpha_by_type": by_type,
        "alpha_not_in_a_layer": {k: {"mean": statistics.fmean(r["mean"] for r in v),
                                     "std": statistics.fmean(r["std"] for r in v)} for k, v in others.items()},
        "alpha_overall": {"mean": common.mean_std(o["mean"] for o in overall),
                          "std": common.mean_std(o["std"] for o in overall),
                          "min": min((o["min"] for o in overall), default=None),
                          "max": max((o["max"] for o in overall), default=None)},
        "alpha_steps": part.steps // part.alpha_every,
        "alpha_seed_agreement": seed_agreement(alpha_runs),
    }


def markdown(results: dict[str, Any]) -> str:
    """The study's tables (accuracy, paired differences, training loss, the learned α by module type) as Markdown."""
    label = {"lora": "LoRA", "alpha-lora": "α-LoRA", "alpha-frozen": "α-frozen (control)"}

    def cell(stats: dict[str, Any] | None, signed: bool = False) -> str:
        if not stats or stats["mean"] is None:
            return "—"
        fmt = "{:+.3f}" if signed else "{:.3f}"
        seeds = ", ".join(fmt.format(v) for v in stats["values"])
        spread = f" ± {stats['std']:.3f}" if stats["std"] is not None else ""
        return f"{fmt.format(stats['mean'])}{spread} ({seeds})"

    out = ["| part | " + " | ".join(label[m] for m in METHODS) + " | untrained |", "|" + "---|" * (len(METHODS) + 2)]
    for name, res in results.items():
        acc, part = res["summary"]["accuracy"], res["part"]
        out.append(f"| {name}, {part['task']}, {len(part['seeds'])} seeds, {part['steps']} steps | "
                   + " | ".join(cell(acc[m]) for m in METHODS) + f" | {cell(res['summary']['base_model'])} |")
    out += ["", "| part | α-LoRA − LoRA | α-LoRA − α-frozen (learning α) | α-frozen − LoRA (holding data out) |"
            " final train loss, " + " / ".join(label[m] for m in METHODS) + " |", "|---|---|---|---|---|"]
    for name, res in results.items():
        sm = res["summary"]
        losses = " / ".join(f"{sm['final_train_loss'][m]['mean']:.3f}" for m in METHODS
                            if sm["final_train_loss"][m]["mean"] is not None)
        out.append(f"| {name} | {cell(sm['paired_difference_alpha_minus_lora'], True)} | "
                   f"{cell(sm['paired_difference_alpha_minus_frozen'], True)} | "
                   f"{cell(sm['paired_difference_frozen_minus_lora'], True)} | {losses} |")
    out += ["", "| part | module | mean α | std, first layer | std, last layer | largest std (layer) | "
            "std-vs-depth slope | min / max entry | seed agreement (r) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        sm = res["summary"]
        agree = (sm["alpha_seed_agreement"] or {}).get("same_module_by_type", {})
        for kind, x in sm["alpha_by_type"].items():
            top = max(x["by_depth"], key=lambda e: e["std"])
            lo = min(e["min"] for e in x["by_depth"])
            hi = max(e["max"] for e in x["by_depth"])
            r = f"{agree[kind]:.2f}" if kind in agree else "—"
            out.append(f"| {name} | {kind} | {x['mean_over_layers']:.3f} | {x['std_first_layer']:.3f} | "
                       f"{x['std_last_layer']:.3f} | {top['std']:.3f} ({top['depth']}) | "
                       f"{x['std_vs_depth_slope']:+.4f} | {lo:.2f} / {hi:.2f} | {r} |")
        ref = (sm["alpha_seed_agreement"] or {}).get("mismatched_modules_reference")
        if ref is not None:
            out.append(f"| {name} | (mismatched modules, no-signal reference) | | | | | | | {ref:.2f} |")
    return "\n".join(out)


def part_metric(runs: list[dict[str, Any]]) -> str:
    return runs[0]["metric"] if runs else "accuracy"


def plot(results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.4 * len(names)), squeeze=False)
    colors = {"lora": "tab:blue", "alpha-lora": "tab:orange", "alpha-frozen": "tab:gray"}
    for i, name in enumerate(names):
        res = results[name]
        summ = res["summary"]
        ax_acc, ax_mean, ax_std = axes[i]
        for j, m in enumerate(METHODS):
            vals = [x["eval"] for x in res["runs"] if x["method"] == m]
            ax_acc.scatter([j] * len(vals), vals, color=colors[m], alpha=0.6)
            st = summ["accuracy"][m]
            ax_acc.errorbar([j + 0.15], [st["mean"]], yerr=[st["std"] or 0.0], fmt="s", color=colors[m], capsize=4)
        if summ["base_model"]:
            ax_acc.axhline(summ["base_model"]["mean"], color="gray", ls=":", label="untrained model")
            ax_acc.legend(fontsize=8)
        ax_acc.set_xticks(range(len(METHODS)), METHODS)
        ax_acc.set_xlim(-0.5, len(METHODS) - 0.5)
        ax_acc.set_ylabel(f"eval {res['runs'][0]['metric']}")
        ax_acc.set_title(f"{name}: accuracy per seed (dots), mean ± std (squares)")
        cmap = plt.get_cmap("tab10")
        for k, (kind, info) in enumerate(summ["alpha_by_type"].items()):
            d = [e["depth"] for e in info["by_depth"]]
            ax_mean.plot(d, [e["mean"] for e in info["by_depth"]], marker=".", color=cmap(k % 10), label=kind)
            ax_std.plot(d, [e["std"] for e in info["by_depth"]], marker=".", color=cmap(k % 10), label=kind)
        ax_mean.axhline(1.0, color="gray", ls=":", lw=1)
        ax_mean.set_xlabel("layer depth")
        ax_mean.set_ylabel("mean of α over the vector")
        ax_mean.set_title(f"{name}: learned α, mean by depth ({summ['alpha_steps']} α steps)")
        ax_mean.legend(fontsize=7)
        ax_std.set_xlabel("layer depth")
        ax_std.set_ylabel("std of α over the vector")
        ax_std.set_title(f"{name}: learned α, spread by depth (mean over seeds)")
        ax_std.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="preset sizes (see SIZES in the script)")
    p.add_argument("--parts", nargs="+", choices=("minilm", "smollm2"), default=["minilm", "smollm2"],
                   help="which experiments to run")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds for every part (default: the size's)")
    p.add_argument("--steps", type=int, help="optimiser steps for every part")
    p.add_argument("--batch-size", type=int, help="batch size for every part")
    p.add_argument("--max-length", type=int, help="token limit for every part")
    p.add_argument("--train-size", type=int, help="training examples for every part")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N eval examples")
    p.add_argument("--lr", type=float, help="adapters' learning rate (default 5e-4)")
    p.add_argument("--r", type=int, help="LoRA rank (default 8)")
    p.add_argument("--alpha-every", type=int, help="one α step every N adapter steps (paper: 10)")
    p.add_argument("--alpha-lr", type=float, help="α's Adam learning rate (paper: 5e-3)")
    p.add_argument("--alpha-holdout", type=int, help="training examples held out for the α steps")
    p.add_argument("--no-base-eval", action="store_true", help="skip scoring the untrained model")
    p.add_argument("--minilm-model", default=None, help="classification model (alias, folder) instead of minilm")
    p.add_argument("--minilm-train-file", default=None, help="text+label JSONL/CSV instead of the sarcasm task")
    p.add_argument("--smollm2-model", default=None, help="causal LM (alias, folder) instead of smollm2-135m")
    p.add_argument("--smollm2-train-file", default=None,
                   help="prompt+completion JSONL instead of socialiqa (scored by generation, not multiple choice)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1 is fastest on a busy machine)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (separate processes)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where JSON and PNG go")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the run folders go (default: a temporary folder, deleted at the end)")
    p.add_argument("--reuse", action="store_true",
                   help="read back finished runs of the same computation from --work-dir instead of training again")
    return p.parse_args(argv)


def resolve_parts(args: argparse.Namespace) -> list[Part]:
    extra = {"base_eval": False} if args.no_base_eval else {}
    fields = ("seeds", "steps", "batch_size", "max_length", "train_size", "eval_limit", "lr", "r",
              "alpha_every", "alpha_lr", "alpha_holdout")
    return [common.override_part(SIZES[args.size][name], args, name, fields, **extra) for name in args.parts]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.init_worker(args.threads)
    started = time.perf_counter()
    env = common.environment()
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="alpha-lora-practice-")
        work = Path(tmp)
    results: dict[str, Any] = {}
    try:
        parts = resolve_parts(args)
        # the slowest part first, alpha-lora (an extra α step every few steps) before lora, so a pool ends together
        jobs = [(part, method, seed, work, args.reuse) for part in reversed(parts) for seed in part.seeds
                for method in reversed(METHODS)]
        base_jobs = [(part, seed) for part in reversed(parts) if part.base_eval for seed in part.seeds]
        n_train = len(jobs)
        outputs = common.map_jobs(_dispatch, [("run", *j) for j in jobs] + [("base", *j) for j in base_jobs],
                                  workers=args.workers, threads=args.threads)
        records, bases = outputs[:n_train], outputs[n_train:]
        for part in parts:
            runs = sorted((x for x in records if x["part"] == part.name), key=lambda x: (x["method"], x["seed"]))
            base = [b for b, (p, _) in zip(bases, base_jobs, strict=True) if p.name == part.name]
            results[part.name] = {"part": asdict(part), "summary": summarise(part, runs, base), "base_model": base,
                                  "runs": runs, "run_wall_s_total": sum(x["wall_s"] for x in runs)}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(results, args.out_dir / OUT_FIG)
    data = {
        "study": "alpha-LoRA vs LoRA: accuracy over seeds and the learned alpha vectors by layer depth",
        "command": common.command_line(__file__, sys.argv[1:] if argv is None else argv),
        "size": args.size, "workers": args.workers, "environment": env, "figures": [str(args.out_dir / OUT_FIG)],
        "settings": {"methods": list(METHODS), "adapter_optimizer": "AdamW (betas 0.9, 0.999; weight decay 0), "
                     "linear decay, no warm-up, max_grad_norm 1.0", "alpha_optimizer": "Adam (betas 0.9, 0.99)",
                     "target_modules": "all-linear", "alpha_std": "population std over a vector's entries",
                     "holdout": "alpha-lora trains its adapters on the training set minus the last alpha_holdout "
                                "examples, which feed the α steps; lora trains on the whole training set",
                     "alpha-frozen": f"control: alpha-lora with alpha_lr {FROZEN_ALPHA_LR:g} (α stays 1), same split, "
                                     "batches and random stream as alpha-lora"},
        "results": results,
        "runtime_s": time.perf_counter() - started,
    }
    common.save_json(args.out_dir / OUT_JSON, data)
    (args.out_dir / OUT_MD).write_text(markdown(results) + "\n")
    print(f"wrote {args.out_dir / OUT_JSON}, {args.out_dir / OUT_MD} and {args.out_dir / OUT_FIG} in "
          f"{data['runtime_s']:.0f} s", flush=True)
    return data


def _dispatch(kind: str, *job: Any) -> dict[str, Any]:
    return one_run(*job) if kind == "run" else base_accuracy(*job)


if __name__ == "__main__":
    main()

