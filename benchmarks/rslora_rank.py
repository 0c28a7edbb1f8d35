"""rsLoRA rank-stability study: does the training loss keep improving with the rank r under s = α/√r but not s = α/r?

rsLoRA (Kalajdzievski, arXiv 2312.03732) argues that with the LoRA scale s = α/r the adapters' learning slows as r
grows (their gradients shrink like 1/√r), so higher ranks bring no gain, and that s = α/√r keeps the activations
and gradients Θ(1) in r, so the loss keeps improving with the rank. This script trains both scalings (methods
``lora`` and ``rslora``) with the SAME lora_alpha, learning rate, steps, data order and initialisation at a grid of
ranks, on

* ``minilm``: all-MiniLM-L6-v2 on the sarcasm headlines (sequence classification, cross-entropy), and
* ``smollm2``: SmolLM2-135M, causal-LM loss on GSM-style worked solutions (task ``gsm``),

always targeting every linear layer ("all-linear"), so the largest rank is the smallest dimension of a targeted layer
(384 for MiniLM; 192 for SmolLM2, whose k/v projections are 576 -> 3 KV heads x 64). It reports

* the final training loss (mean of the last k logged steps) against the rank, per scaling;
* the adapters' gradient norm against the rank (mean over the first steps: 1..10, or 1..8 for SmolLM2 at the small
  size; the two scalings see the same batches). The loop logs ``grad_norm``, the norm of
  ALL trainable parameters; for MiniLM that includes the fully trained classification head, so the adapters-only
  norm is measured by a probe: the first steps of the same run replayed with the library's own pieces
  (load_task, load_model, adapt, build, BatchOrder, train_step) and the per-parameter gradients read before
  clipping; the probe's losses are checked to equal the logged ones. SmolLM2 has no trainable head, so there the
  loop's ``grad_norm`` (taken before clipping) already is the adapters-only norm;
* a small learning-rate sweep at one high rank, to see whether the verdict is about the scale or about the lr.

Every run is `scalora.train.train` with a `TrainConfig`. Run ``python benchmarks/rslora_rank.py --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # loaded from a test rather than run as a script
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

from scalora.train.results import running_mean  # noqa: E402

METHODS = ("lora", "rslora")
SCALE_LABEL = {"lora": "s = α/r (lora)", "rslora": "s = α/√r (rslora)"}
OUT_JSON = "rslora_rank.json"
OUT_FIG = "rslora_rank.png"
OUT_SWEEP_FIG = "rslora_lr_sweep.png"
OUT_MD = "rslora_rank.md"


@dataclass(frozen=True)
class Part(common.Part):
    """One model + task experiment of the study, over several ranks."""

    ranks: tuple[int, ...]
    include_max_rank: bool  # add the largest rank the targeted layers allow
    lr: float
    lora_alpha: float
    last_k: int  # final loss = mean of the last k logged losses
    grad_steps: int  # gradient norm = mean over steps 1..grad_steps
    probe: bool  # adapters-only gradient norm from the probe (else the loop's grad_norm, which then is adapters-only)
    sweep_rank: int | None  # learning-rate sweep at this rank (clamped to the largest allowed), first seed
    sweep_lrs: tuple[float, ...]
    target_modules: str = "all-linear"


# Learning-rate sweeps use the factors 1/√r and √r around the base lr at the sweep rank: under Adam the first steps
# change the output by about s·r·lr, so s = α/√r at lr behaves like s = α/r at lr·√r (see the docs' discussion).
SIZES: dict[str, dict[str, Part]] = {
    "small": {
        "minilm": Part("minilm", "minilm", "sarcasm", None, ranks=(4, 16, 64, 256), include_max_rank=True, steps=120,
                       batch_size=16, max_length=48, train_size=2000, eval_size=None, eval_limit=None, seeds=(0, 1),
                       lr=5e-4, lora_alpha=16.0, last_k=20, grad_steps=10, probe=True, sweep_rank=64,
                       sweep_lrs=(6.25e-5, 2e-3, 4e-3)),
        "smollm2": Part("smollm2", "smollm2-135m", "gsm", None, ranks=(4, 16, 64), include_max_rank=True, steps=16,
                        batch_size=2, max_length=128, train_size=100, eval_size=1, eval_limit=1, seeds=(0, 1),
                        lr=5e-4, lora_alpha=16.0, last_k=6, grad_steps=8, probe=False, sweep_rank=64,
                        sweep_lrs=(6.25e-5, 4e-3)),
    },
    # about 2 h with --workers 2 on an idle 2-core machine (docs/results.md gives the arithmetic)
    "full": {
        "minilm": Part("minilm", "minilm", "sarcasm", None, ranks=(4, 8, 16, 32, 64, 128, 256), include_max_rank=True,
                       steps=400, batch_size=16, max_length=48, train_size=6400, eval_size=None, eval_limit=None,
                       seeds=(0, 1, 2), lr=5e-4, lora_alpha=16.0, last_k=40, grad_steps=10, probe=True,
                       sweep_rank=256, sweep_lrs=(3.125e-5, 1.25e-4, 2e-3, 8e-3)),
        "smollm2": Part("smollm2", "smollm2-135m", "gsm", None, ranks=(4, 16, 64), include_max_rank=True, steps=48,
                        batch_size=4, max_length=192, train_size=192, eval_size=1, eval_limit=1, seeds=(0, 1),
                        lr=5e-4, lora_alpha=16.0, last_k=12, grad_steps=8, probe=False, sweep_rank=64,
                        sweep_lrs=(6.25e-5, 4e-3)),
    },
}


# ----------------------------------------------------------------------------------------------------------
# Runs


def max_rank(model: str, task_kind: str, num_labels: int | None, target_modules: str) -> tuple[int, dict[str, int]]:
    """The largest r every targeted layer allows (min over layers of min(in, out)) and that bound per layer type."""
    from scalora.config import LoraConfig
    from scalora.model import plan_lora
    from scalora.train.models import load_model

    net, _ = load_model(model, task_kind, num_labels=num_labels)
    plan = plan_lora(net, LoraConfig(r=1, target_modules=target_modules))
    by_type: dict[str, int] = {}
    for item in plan:
        kind = _module_type(item.name)
        by_type[kind] = min(by_type.get(kind, 10**9), min(item.in_features, item.out_features))
    return min(by_type.values()), by_type


def _module_type(name: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``attention.self.query`` (the part after the layer index)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1:])
    return name


def make_config(part: Part, method: str, r: int, lr: float, seed: int, out: Path) -> Any:
    from scalora.train.config import TrainConfig

    return TrainConfig(
        model=part.model, task=part.task, train_file=part.train_file, method=method, r=r, lora_alpha=part.lora_alpha,
        lr=lr, steps=part.steps, batch_size=part.batch_size, max_length=part.max_length, train_size=part.train_size,
        eval_size=part.eval_size, eval_limit=part.eval_limit, seed=seed, target_modules=part.target_modules,
        schedule="linear", warmup_steps=0, max_grad_norm=1.0, output_dir=str(out), overwrite=True, progress=False,
        tensorboard=False,
    )


def adapter_grad_probe(cfg: Any, steps: int) -> dict[str, list[float]]:
    """Replay the first `steps` optimiser steps of `cfg` exactly as `train` does, and return per step the loss and
    the gradient norms (before clipping) of all adapters, of the A and B factors alone, and of the other trainable
    weights (the classification head)."""
    import torch

    from scalora.model import lora_layers
    from scalora.train.loop import train_step
    from scalora.train.methods import adapt, build
    from scalora.train.models import load_model
    from scalora.train.order import BatchOrder
    from scalora.train.tasks import load_task

    if cfg.method not in METHODS:
        raise ValueError(f"the probe replays lora/rslora runs only, not {cfg.method!r}")
    torch.manual_seed(cfg.seed)  # the same random stream as train(): seed, load, adapt, build, then the steps
    random.seed(cfg.seed)
    task = load_task(cfg.task, train_file=cfg.train_file, eval_file=cfg.eval_file, train_size=cfg.train_size,
                     eval_size=cfg.eval_size, seed=cfg.seed)
    model, tokenizer = load_model(cfg.model, task.kind, num_labels=task.num_labels)
    adapt(cfg, model)
    setup = build(cfg, model)
    a_params = [layer.lora_A for _, layer in lora_layers(model)]
    b_params = [layer.lora_B for _, layer in lora_layers(model)]
    adapter_ids = {id(p) for p in a_params + b_params}
    trainable = [p for p in model.parameters() if p.requires_grad]
    others = [p for p in trainable if id(p) not in adapter_ids]
    collate = task.collate(tokenizer, cfg.max_length)
    order = BatchOrder(len(task.train), cfg.batch_size, cfg.seed)

    def norm(params: list[torch.Tensor]) -> float:
        sq = sum(float(p.grad.detach().double().pow(2).sum()) for p in params if p.grad is not None)
        return math.sqrt(sq)

    out: dict[str, list[float]] = {"loss": [], "adapters": [], "A": [], "B": [], "other": [], "all": []}
    model.train()
    for step in range(1, steps + 1):
        ks = range((step - 1) * cfg.grad_accum, step * cfg.grad_accum)
        loss = train_step(model, [collate([task.train[i] for i in order(k)]) for k in ks])
        out["loss"].append(loss)
        out["A"].append(norm(a_params))
        out["B"].append(norm(b_params))
        out["adapters"].append(math.hypot(out["A"][-1], out["B"][-1]))
        out["other"].append(norm(others))
        out["all"].append(float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)))
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
    return out


def one_run(part: Part, method: str, r: int, lr: float, seed: int, work: Path, reuse: bool = False) -> dict[str, Any]:
    """One training run (plus the gradient probe where needed) and its numbers; with `reuse`, a finished run (and
    probe) of the same computation in the work folder is read back instead."""
    out = work / part.name / f"{method}-r{r}-lr{lr:g}-s{seed}"
    cfg = make_config(part, method, r, lr, seed, out)
    t0 = time.perf_counter()
    res = common.run_config(cfg, reuse=reuse)
    rows = res["metrics"]
    s = res["summary"]
    losses = common.column(rows, "loss")
    grad_loop = common.column(rows, "grad_norm", first=1, last=part.grad_steps)
    record: dict[str, Any] = {
        "part": part.name, "method": method, "r": r, "lr": lr, "seed": seed,
        "scale_s": part.lora_alpha / (r if method == "lora" else math.sqrt(r)),
        "final_loss": common.tail_mean(rows, "loss", part.last_k),
        "first_loss": losses[0] if losses else None,
        "eval_metric": s["metric"], "eval": s["eval"],
        "grad_norm_loop_mean": statistics.fmean(grad_loop) if grad_loop else None,
        "trainable_params": s["trainable_params"], "rank_mean": s.get("rank/mean"),
        "entropy_rank_mean": s.get("rank/entropy_mean"),
        "train_wall_s": s["wall_time_s"], "median_step_s": s["median_step_s"], "reused": res["reused"],
        "loss_curve": losses, "grad_norm_curve": common.column(rows, "grad_norm"),
    }
    if part.probe:
        probe_file = out / "probe.json"
        key = {"fingerprint": cfg.fingerprint(), "steps": part.grad_steps}
        cached = json.loads(probe_file.read_text()) if reuse and probe_file.is_file() else {}
        if cached.get("key") == key:
            probe = cached["probe"]
        else:
            probe = adapter_grad_probe(cfg, part.grad_steps)
            common.save_json(probe_file, {"key": key, "probe": probe})
        logged = losses[: part.grad_steps]
        record["probe"] = probe
        record["probe_max_loss_diff"] = max(abs(a - b) for a, b in zip(probe["loss"], logged, strict=True))
        record["adapter_grad_norm"] = statistics.fmean(probe["adapters"])
        record["adapter_grad_norm_A"] = statistics.fmean(probe["A"])
        record["adapter_grad_norm_B"] = statistics.fmean(probe["B"])
        record["adapter_grad_norm_source"] = f"probe replay of steps 1-{part.grad_steps} (adapters only)"
    else:
        record["adapter_grad_norm"] = record["grad_norm_loop_mean"]
        record["adapter_grad_norm_source"] = (f"loop grad_norm, steps 1-{part.grad_steps} (the adapters are the only "
                                              "trainable weights)")
    record["wall_s"] = time.perf_counter() - t0
    print(f"[{part.name}] {method:6s} r={r:<4d} lr={lr:<8g} seed={seed}: final loss {record['final_loss']:.4f}, "
        f"{s['metric']} {s['eval']:.3f}, adapter grad norm {record['adapter_grad_norm']:.4g}, "
        f"{record['wall_s']:.0f} s", flush=True)
    return record


# ----------------------------------------------------------------------------------------------------------
# Summaries and figures


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def summarise(part: Part, ranks: list[int], runs: list[dict[str, Any]]) -> dict[str, Any]:
    main = [r for r in runs if r["lr"] == part.lr]
    table: dict[str, Any] = {}
    for method in METHODS:
        rows = []
        for r in ranks:
            sel = [x for x in main if x["method"] == method and x["r"] == r]
            rows.append({"r": r, "scale_s": sel[0]["scale_s"] if sel else None,
                         "final_loss": common.mean_std(x["final_loss"] for x in sel),
                         "eval": common.mean_std(x["eval"] for x in sel),
                         "adapter_grad_norm": common.mean_std(x["adapter_grad_norm"] for x in sel),
                         "entropy_rank": common.mean_std(x["entropy_rank_mean"] for x in sel
                                                         if x["entropy_rank_mean"] is not None)})
        losses = [row["final_loss"]["mean"] for row in rows]
        grads = [row["adapter_grad_norm"]["mean"] for row in rows]
        best = min(range(len(rows)), key=lambda i: losses[i]) if rows else None
        table[method] = {
            "rows": rows,
            "best_rank": rows[best]["r"] if best is not None else None,
            "loss_monotone_in_rank": all(b <= a for a, b in zip(losses, losses[1:], strict=False)),
            "loss_change_smallest_to_largest_rank": losses[-1] - losses[0] if rows else None,
            "grad_norm_loglog_slope": loglog_slope([float(r) for r in ranks], grads),
        }
    sweep: dict[str, Any] = {}
    for method in METHODS:
        pts = sorted({(x["r"], x["lr"]) for x in runs if x["method"] == method and x["r"] == part.sweep_rank})
        if len(pts) > 1:
            sweep[method] = [{"lr": lr, "final_loss": common.mean_std(
                x["final_loss"] for x in runs if x["method"] == method and x["r"] == r and x["lr"] == lr
                and x["seed"] == part.seeds[0]), "eval": common.mean_std(
                x["eval"] for x in runs if x["method"] == method and x["r"] == r and x["lr"] == lr
                and x["seed"] == part.seeds[0])} for r, lr in pts]
    # s = α/√r at lr against s = α/r at lr·√r (and the reverse), where the sweep has both
    pairs = []
    if part.sweep_rank is not None:
        r = part.sweep_rank
        at = {(x["method"], x["lr"]): x for x in runs if x["r"] == r and x["seed"] == part.seeds[0]}
        for (method, lr), x in sorted(at.items()):
            if method != "rslora":
                continue
            twin = next((y for (m, lr2), y in at.items() if m == "lora" and math.isclose(lr2, lr * math.sqrt(r),
                                                                                          rel_tol=1e-6)), None)
            if twin is not None:
                pairs.append({"r": r, "rslora_lr": lr, "lora_lr": twin["lr"], "rslora_final_loss": x["final_loss"],
                              "lora_final_loss": twin["final_loss"], "rslora_eval": x["eval"],
                              "lora_eval": twin["eval"]})
    return {"by_method": table, "lr_sweep": sweep, "lr_sqrt_r_pairs": pairs}


def plot(results: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()
    parts = list(results)
    fig, axes = plt.subplots(len(parts), 3, figsize=(15, 4.2 * len(parts)), squeeze=False)
    colors = {"lora": "tab:blue", "rslora": "tab:red"}
    for i, name in enumerate(parts):
        res = results[name]
        ranks = res["ranks"]
        summ = res["summary"]["by_method"]
        ax_loss, ax_grad, ax_curve = axes[i]
        for method in METHODS:
            rows = summ[method]["rows"]
            mean = [row["final_loss"]["mean"] for row in rows]
            std = [row["final_loss"]["std"] or 0.0 for row in rows]
            ax_loss.errorbar(ranks, mean, yerr=std, marker="o", capsize=3, color=colors[method],
                             label=SCALE_LABEL[method])
            g = [row["adapter_grad_norm"]["mean"] for row in rows]
            slope = summ[method]["grad_norm_loglog_slope"]
            ax_grad.plot(ranks, g, marker="o", color=colors[method],
                         label=f"{SCALE_LABEL[method]}, slope {slope:+.2f}" if slope is not None else method)
        ax_loss.set_xscale("log", base=2)
        ax_loss.set_xlabel("rank r")
        ax_loss.set_ylabel(f"final train loss (mean of last {res['part']['last_k']} steps)")
        ax_loss.set_title(f"{name}: final training loss vs rank (lr {res['part']['lr']:g})")
        ax_loss.legend()
        ax_grad.set_xscale("log", base=2)
        ax_grad.set_yscale("log")
        ax_grad.set_xlabel("rank r")
        ax_grad.set_ylabel(f"adapter gradient norm (mean, steps 1-{res['part']['grad_steps']})")
        ax_grad.set_title(f"{name}: adapters' gradient norm vs rank")
        ax_grad.legend()
        cmap = plt.get_cmap("viridis")
        seed0 = res["part"]["seeds"][0]
        for j, r in enumerate(ranks):
            for method, style in (("lora", "-"), ("rslora", "--")):
                run = next((x for x in res["runs"] if x["method"] == method and x["r"] == r
                            and x["lr"] == res["part"]["lr"] and x["seed"] == seed0), None)
                if run is None:
                    continue
                curve = running_mean(run["loss_curve"], max(1, res["part"]["last_k"] // 2))
                ax_curve.plot(range(1, len(curve) + 1), curve, style, color=cmap(j / max(1, len(ranks) - 1)),
                              label=f"r={r}" if method == "lora" else None)
        ax_curve.set_xlabel("step")
        ax_curve.set_ylabel("train loss (running mean)")
        ax_curve.set_title(f"{name}: loss curves, seed {seed0} (solid α/r, dashed α/√r)")
        ax_curve.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def markdown(results: dict[str, Any]) -> str:
    """The study's tables (loss, accuracy, gradient norm, effective rank per rank; the lr sweep) as Markdown."""
    out = []
    for name, res in results.items():
        part, by = res["part"], res["summary"]["by_method"]
        with_eval = part["eval_limit"] is None or part["eval_limit"] > 1  # one gsm problem is no score
        head = ["r", "s (α/r)", "final loss, α/r", "s (α/√r)", "final loss, α/√r"]
        head += ["eval, α/r", "eval, α/√r"] if with_eval else []
        head += ["grad, α/r", "grad, α/√r", "ratio", "eff. rank, α/r", "eff. rank, α/√r"]
        out += [f"**{name}** ({part['model']}, {part['task'] or part['train_file']}, lr {part['lr']:g}, "
                f"seeds {', '.join(map(str, part['seeds']))})", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for a, b in zip(by["lora"]["rows"], by["rslora"]["rows"], strict=True):
            ga, gb = a["adapter_grad_norm"]["mean"], b["adapter_grad_norm"]["mean"]
            cells = [str(a["r"]), f"{a['scale_s']:.3g}", common.fmt_mean_std(a["final_loss"], 3),
                     f"{b['scale_s']:.3g}", common.fmt_mean_std(b["final_loss"], 3)]
            cells += [common.fmt_mean_std(a["eval"], 3), common.fmt_mean_std(b["eval"], 3)] if with_eval else []
            cells += [f"{ga:.3g}", f"{gb:.3g}", f"{gb / ga:.1f}", common.fmt_mean_std(a["entropy_rank"], 1),
                      common.fmt_mean_std(b["entropy_rank"], 1)]
            out.append("| " + " | ".join(cells) + " |")
        slopes = ", ".join(f"{SCALE_LABEL[m]} {by[m]['grad_norm_loglog_slope']:+.2f}" for m in METHODS)
        out += ["", f"Log-log slope of the adapters' gradient norm against r: {slopes}.", ""]
        sweep = res["summary"]["lr_sweep"]
        if sweep:
            lrs = sorted({pt["lr"] for pts in sweep.values() for pt in pts})
            out += [f"Learning-rate sweep at r = {res['sweep_rank']}, seed {part['seeds'][0]} (final loss"
                    + (", eval in brackets)" if with_eval else ")"), "", "| lr | α/r | α/√r |", "|---|---|---|"]
            for lr in lrs:
                cells = []
                for method in METHODS:
                    pt = next((x for x in sweep.get(method, []) if x["lr"] == lr), None)
                    cell = "—" if pt is None else f"{pt['final_loss']['mean']:.3f}"
                    if pt is not None and with_eval:
                        cell += f" ({pt['eval']['mean']:.3f})"
                    cells.append(cell)
                out.append(f"| {lr:g} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def plot_sweep(results: dict[str, Any], path: Path) -> bool:
    parts = [name for name in results if results[name]["summary"]["lr_sweep"]]
    if not parts:
        return False
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    colors = {"lora": "tab:blue", "rslora": "tab:red"}
    for ax, name in zip(axes[0], parts, strict=True):
        res = results[name]
        for method, pts in res["summary"]["lr_sweep"].items():
            ax.plot([p["lr"] for p in pts], [p["final_loss"]["mean"] for p in pts], marker="o", color=colors[method],
                    label=SCALE_LABEL[method])
        small = res["summary"]["by_method"]
        r0 = res["ranks"][0]
        for method in METHODS:
            ax.axhline(small[method]["rows"][0]["final_loss"]["mean"], color=colors[method], ls=":", lw=1,
                       label=f"{method}, r={r0}, lr {res['part']['lr']:g}")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final train loss")
        ax.set_title(f"{name}: lr sweep at r={res['sweep_rank']} (seed {res['part']['seeds'][0]})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)
    return True


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="preset sizes (see SIZES in the script)")
    p.add_argument("--parts", nargs="+", choices=("minilm", "smollm2"), default=["minilm", "smollm2"],
                   help="which experiments to run")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: the size's)")
    p.add_argument("--ranks", type=int, nargs="+", help="ranks for every part (default: the size's)")
    p.add_argument("--no-max-rank", action="store_true", help="do not add the largest rank the layers allow")
    p.add_argument("--steps", type=int, help="optimiser steps for every part")
    p.add_argument("--batch-size", type=int, help="batch size for every part")
    p.add_argument("--max-length", type=int, help="token limit for every part")
    p.add_argument("--train-size", type=int, help="training examples for every part")
    p.add_argument("--lr", type=float, help="learning rate for every part (default 5e-4)")
    p.add_argument("--lora-alpha", type=float, help="lora_alpha for every part (default 16)")
    p.add_argument("--last-k", type=int, help="final loss = mean over the last k steps")
    p.add_argument("--grad-steps", type=int, help="gradient norm = mean over steps 1..N")
    p.add_argument("--sweep-rank", type=int, help="rank of the learning-rate sweep")
    p.add_argument("--sweep-lrs", type=float, nargs="*", help="extra learning rates of the sweep (none: no sweep)")
    p.add_argument("--minilm-model", default=None, help="classification model (alias, folder) instead of minilm")
    p.add_argument("--minilm-train-file", default=None, help="text+label JSONL/CSV instead of the sarcasm task")
    p.add_argument("--smollm2-model", default=None, help="causal LM (alias, folder) instead of smollm2-135m")
    p.add_argument("--smollm2-train-file", default=None, help="prompt+completion JSONL instead of the gsm task")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (1 is fastest on a busy machine)")
    p.add_argument("--workers", type=int, default=1, help="runs in parallel (separate processes)")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"), help="where JSON and PNG go")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the run folders go (default: a temporary folder, deleted at the end)")
    p.add_argument("--reuse", action="store_true",
                   help="read back finished runs of the same computation from --work-dir instead of training again")
    p.add_argument("--tag", default="", help="suffix of the output files (rslora_rank_<tag>.json ...)")
    return p.parse_args(argv)


def resolve_parts(args: argparse.Namespace) -> list[Part]:
    extra = {"include_max_rank": False} if args.no_max_rank else {}
    fields = ("seeds", "ranks", "steps", "batch_size", "max_length", "train_size", "lr", "lora_alpha",
              "last_k", "grad_steps", "sweep_rank", "sweep_lrs")
    return [common.override_part(SIZES[args.size][name], args, name, fields, **extra) for name in args.parts]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    common.init_worker(args.threads)
    started = time.perf_counter()
    env = common.environment()  # the load average when the study starts
    tmp = None
    work = args.work_dir
    if work is None:
        tmp = tempfile.mkdtemp(prefix="rslora-rank-")
        work = Path(tmp)
    results: dict[str, Any] = {}
    try:
        plans = []
        for part in resolve_parts(args):
            from scalora.train.tasks import load_task

            probe_task = load_task(part.task, train_file=part.train_file, train_size=min(part.train_size or 64, 64),
                                   eval_size=part.eval_size, seed=0)
            limit, by_type = max_rank(part.model, probe_task.kind, probe_task.num_labels, part.target_modules)
            ranks = sorted({r for r in part.ranks if r <= limit} | ({limit} if part.include_max_rank else set()))
            sweep_rank = min(part.sweep_rank, limit) if part.sweep_rank is not None and part.sweep_lrs else None
            print(f"[{part.name}] ranks {ranks} (largest allowed {limit}; per layer type {by_type})", flush=True)
            specs = {(method, r, part.lr, seed) for seed in part.seeds for r in ranks for method in METHODS}
            if sweep_rank is not None:
                specs |= {(method, sweep_rank, lr, part.seeds[0]) for lr in (part.lr, *part.sweep_lrs)
                          for method in METHODS}
            plans.append((part, ranks, limit, by_type, sweep_rank, sorted(specs, key=lambda x: (-x[1], x))))
        # the slowest runs (large models, large ranks) first, so that a pool of workers ends together
        jobs = [(part, *spec, work, args.reuse) for part, *_, specs in reversed(plans) for spec in specs]
        records = common.map_jobs(one_run, jobs, workers=args.workers, threads=args.threads)
        for part, ranks, limit, by_type, sweep_rank, _ in plans:
            runs = sorted((x for x in records if x["part"] == part.name),
                          key=lambda x: (x["lr"] != part.lr, x["lr"], x["seed"], x["r"], x["method"]))
            results[part.name] = {
                "part": asdict(part), "ranks": ranks, "max_rank": limit, "max_rank_by_layer_type": by_type,
                "sweep_rank": sweep_rank, "summary": summarise(replace(part, sweep_rank=sweep_rank), ranks, runs),
                "runs": runs, "run_wall_s_total": sum(x["wall_s"] for x in runs),
            }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
    out_json, out_fig, out_sweep, out_md = (args.out_dir / name.replace(".", f"{suffix}.", 1)
                                            for name in (OUT_JSON, OUT_FIG, OUT_SWEEP_FIG, OUT_MD))
    out_md.write_text(markdown(results) + "\n")
    plot(results, out_fig)
    figures = [str(out_fig)]
    if plot_sweep(results, out_sweep):
        figures.append(str(out_sweep))
    data = {
        "study": "rsLoRA rank stability: final training loss and adapter gradient norm vs rank, s = α/r vs α/√r",
        "command": common.command_line(__file__, sys.argv[1:] if argv is None else argv),
        "size": args.size, "workers": args.workers, "environment": env, "figures": figures,
        "settings": {"methods": list(METHODS), "scales": {"lora": "lora_alpha / r", "rslora": "lora_alpha / sqrt(r)"},
                     "schedule": "linear decay, no warm-up", "optimizer": "AdamW (weight decay 0)",
                     "max_grad_norm": 1.0, "target_modules": "all-linear"},
        "results": results,
        "runtime_s": time.perf_counter() - started,
    }
    common.save_json(out_json, data)
    print(f"wrote {out_json}, {out_md} and {', '.join(figures)} in {data['runtime_s']:.0f} s", flush=True)
    return data


if __name__ == "__main__":
    main()
