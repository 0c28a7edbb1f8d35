"""ScaLoRA study: accuracy, speed to a target loss, rank of the update, ablations and cost, next to six baselines.

Question: at the same rank (r = 8), step budget and seeds, does ScaLoRA (and ScaLoRA-I) reach better scores than
LoRA, rsLoRA, α-LoRA and ReLoRA, get closer to full fine-tuning, reach LoRA's final training loss in fewer steps and
less time, and accumulate an update of far higher rank than r? And which of its parts matter (column vs scalar
scaling, moment transfer, rescaling interval I, the constant c)?

Every run is one `scalora.train.loop.train(TrainConfig)` in its own child process (this script with the hidden
``--worker`` flag; ``--jobs 0`` runs them in this process instead, for tests). A run writes
``<work-dir>/<size>/<task>/<variant>/seed<k>/summary.json`` when it finishes; runs whose summary exists (with the
same configuration) are skipped, so an interrupted study is resumed by running the same command again, and the
results are always assembled from the finished runs on disk.

Tasks (``--size small``; ``--size full`` runs 4× longer on sarcasm, 3× on socialiqa, 1.5× on gsm, with larger
evaluation sets and a third sarcasm seed, see SIZES):

* ``sarcasm``: all-MiniLM-L6-v2 + 2-class head, 150 steps, batch 16, max_length 48, 2 000 train / 500 eval
  examples, evaluated every 50 steps, seeds 0 and 1;
* ``socialiqa``: SmolLM2-135M, 40 steps, batch 4, max_length 128, accuracy on 100 eval questions, seeds 0 and 1;
* ``gsm``: SmolLM2-135M, 40 steps, batch 4, max_length 256, exact match on 20 problems (160 new tokens) and the
  held-out loss of their reference solutions, seeds 0 and 1.

Learning rates: 5e-4 (MiniLM) / 2e-4 (SmolLM2) for the adapter methods, 5e-5 / 2e-5 for full fine-tuning;
linear decay, no warm-up, AdamW, gradient clipping at 1, r = 8, lora_alpha = 16, every linear layer adapted.

Time-to-target: the target is LoRA's final training loss (the mean of its last ``--window`` logged losses, the same
quantity as ``summary.json``'s ``final_train_loss``), per seed. A method "reaches" it at the first step where the
trailing mean of its last ``--window`` losses is at or below the target; its time is the sum of its step times
(training only: evaluation is not counted) up to that step. Both are reported as ratios to LoRA's own
steps/time to the same target.

Ablations (on ``--ablation-task``, sarcasm by default): column vs scalar scaling, moment transfer on/off,
interval I in {1, 10, 100} (I = 1 is ``scalora``, I = 10 is ``scalora-i``), and c in ``--c-grid``. ``--controls``
adds LoRA at 2× and 4× its learning rate and ScaLoRA at c = 0.1 without moment transfer.

``--cost`` measures step time and peak memory of every method on MiniLM instead: each method runs in its own child
process (peak RSS is per process), methods are interleaved in rounds with the order rotated each round, and each
ratio to LoRA is computed within a round; the median over rounds is reported.

Outputs (``--out-dir``, default benchmarks/results): scalora_study.json, scalora_study_curves.png,
scalora_study_rank.png, scalora_study_ablations.png; with ``--cost`` scalora_study_cost.json and
scalora_study_cost.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # loaded from a test rather than run as a script
    sys.path.insert(0, str(_HERE))

import common  # noqa: E402

from scalora.train import results as run_results  # noqa: E402
from scalora.train.registry import METHODS as REGISTRY  # noqa: E402
from scalora.train.results import mean_std  # noqa: E402

METHODS = tuple(REGISTRY)
CORE_METHODS = ("full", "lora", "scalora")
TASKS = ("sarcasm", "socialiqa", "gsm")
DEFAULT_OUT = Path("benchmarks/results")
DEFAULT_WORK = Path("runs/scalora_study")
LABELS = {m.name: m.label for m in REGISTRY.values()}
COLORS = {m.name: m.color for m in REGISTRY.values()}


@dataclass(frozen=True)
class TaskSize:
    """How one task is run at one size."""

    model: str
    steps: int
    batch_size: int
    max_length: int
    seeds: tuple[int, ...]
    lr_adapter: float
    lr_full: float
    eval_every: int
    train_size: int | None = None
    eval_size: int | None = None
    eval_limit: int | None = None
    max_new_tokens: int | None = None
    alpha_holdout: int = 256


MINILM, SMOLLM2 = "minilm", "smollm2-135m"
SIZES: dict[str, dict[str, TaskSize]] = {
    "small": {
        "sarcasm": TaskSize(MINILM, 150, 16, 48, (0, 1), 5e-4, 5e-5, 50, train_size=2000, eval_size=500),
        "socialiqa": TaskSize(SMOLLM2, 40, 4, 128, (0, 1), 2e-4, 2e-5, 20, eval_limit=100),
        "gsm": TaskSize(SMOLLM2, 40, 4, 256, (0, 1), 2e-4, 2e-5, 0, eval_limit=20, max_new_tokens=160),
    },
    # the larger budget, about 2.5 h with --jobs 2 on an idle 2-core machine (docs/results.md gives the arithmetic)
    "full": {
        "sarcasm": TaskSize(MINILM, 600, 16, 48, (0, 1, 2), 5e-4, 5e-5, 200, train_size=9600, eval_size=2000),
        "socialiqa": TaskSize(SMOLLM2, 120, 4, 128, (0, 1), 2e-4, 2e-5, 60, eval_limit=300),
        "gsm": TaskSize(SMOLLM2, 60, 4, 256, (0, 1), 2e-4, 2e-5, 0, train_size=1000, eval_limit=50,
                        max_new_tokens=160),
    },
    # seconds, for tests with a tiny local model (--model, --train-file)
    "micro": {
        "sarcasm": TaskSize(MINILM, 8, 4, 32, (0,), 5e-3, 5e-4, 4, eval_size=16, alpha_holdout=8),
        "socialiqa": TaskSize(SMOLLM2, 8, 2, 64, (0,), 2e-3, 2e-4, 4, eval_limit=8, alpha_holdout=8),
        "gsm": TaskSize(SMOLLM2, 8, 2, 64, (0,), 2e-3, 2e-4, 0, eval_limit=4, max_new_tokens=8, alpha_holdout=8),
    },
}
WINDOW = 10

# Ablation variants: name → (TrainConfig overrides, which group(s) and value they stand for).
# The main `scalora` run is the default (optimiser-aware rule, c = "auto", column scaling, moments transferred, I = 1);
# `scalora-i` is I = 10. The c sweep is the paper's rule, whose only knob c is.
ABLATIONS: dict[str, dict[str, Any]] = {
    "scalora-scalar": {"method": "scalora", "scalora_mode": "scalar"},
    "scalora-no-moments": {"method": "scalora", "scalora_transfer_moments": False},
    "scalora-I100": {"method": "scalora", "scalora_interval": 100},
}
DEFAULT_C_GRID = (0.1, 1.0, 10.0)


def c_variant(c: float) -> str:
    """The variant of the paper's rule at this c."""
    return f"scalora-paper-c{c:g}"


def lr_variant(method: str, mult: float) -> str:
    """The variant name of `method` at `mult` × its task's learning rate."""
    return method if mult == 1.0 else f"{method}-lr{mult:g}x"


def lr_variants(methods: Sequence[str], mults: Sequence[float]) -> dict[str, dict[str, Any]]:
    return {lr_variant(m, k): {"method": m, "_lr_mult": float(k)} for m in methods for k in mults if k != 1.0}


# Controls (with --controls): is a gain of ScaLoRA more than a larger effective step? LoRA at 2× and 4× its
# learning rate, and the moment-transfer ablation where the scales are far from 1 (c = 0.1).
CONTROLS: dict[str, dict[str, Any]] = {
    **lr_variants(["lora"], [2.0, 4.0]),
    "scalora-paper-c0.1-no-moments": {"method": "scalora", "scalora_rule": "paper", "scalora_c": 0.1,
                                      "scalora_transfer_moments": False},
}


def ablation_groups(c_grid: Sequence[float], controls: bool = False) -> dict[str, list[tuple[str, str]]]:
    """group → [(setting label, variant whose runs hold it)]."""
    groups = {
        "scaling": [("column", "scalora"), ("scalar", "scalora-scalar")],
        "moment transfer": [("on", "scalora"), ("off", "scalora-no-moments")],
        "interval I": [("1", "scalora"), ("10", "scalora-i"), ("100", "scalora-I100")],
        "c (paper rule)": [(f"{c:g}", c_variant(c)) for c in sorted(c_grid)],
    }
    if controls:
        groups["moment transfer, paper rule, c = 0.1"] = [("on", c_variant(0.1)),
                                                          ("off", "scalora-paper-c0.1-no-moments")]
        groups["LoRA lr (control)"] = [("1×", "lora"), ("2×", "lora-lr2x"), ("4×", "lora-lr4x")]
    return groups


def ablation_variants(c_grid: Sequence[float], controls: bool = False, methods: Sequence[str] = (),
                      lr_grid: Sequence[float] = ()) -> dict[str, dict[str, Any]]:
    """The ablation task's extra variants: ABLATIONS, the c grid, the controls, and every method in `methods` at
    each learning-rate multiplier of `lr_grid`."""
    variants = dict(ABLATIONS)
    for c in (*c_grid, *((0.1,) if controls else ())):
        variants[c_variant(c)] = {"method": "scalora", "scalora_rule": "paper", "scalora_c": float(c)}
    if controls:
        variants.update(CONTROLS)
    variants.update(lr_variants(methods, lr_grid))
    return variants


# ----------------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    variant: str
    seed: int
    cfg: dict[str, Any]
    folder: Path
    summary: dict[str, Any] | None = None
    error: str | None = None
    curves: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.task}/{self.variant}/seed{self.seed}"


def make_config(task: str, size: TaskSize, variant: str, overrides: dict[str, Any], seed: int, folder: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    from scalora.train.config import TrainConfig

    method = overrides.get("method", variant)
    cfg = {
        "model": args.model or size.model, "task": None if args.train_file else task, "method": method,
        "train_file": str(args.train_file) if args.train_file else None,
        "train_size": size.train_size, "eval_size": size.eval_size, "max_length": size.max_length,
        "r": 8, "lora_alpha": 16.0, "lr": size.lr_full if method == "full" else size.lr_adapter,
        "batch_size": size.batch_size, "steps": args.steps or size.steps, "seed": seed,
        "eval_every": size.eval_every, "eval_limit": size.eval_limit, "alpha_holdout": size.alpha_holdout,
        "max_new_tokens": size.max_new_tokens,
        "output_dir": str(folder), "progress": False, "tensorboard": False, "overwrite": True,
    }
    cfg["lr"] *= overrides.get("_lr_mult", 1.0)
    cfg.update({k: v for k, v in overrides.items() if k not in ("method", "_lr_mult")})
    return TrainConfig.from_dict(cfg).to_dict()  # validated, with every default filled in


def finished_summary(run: Run) -> dict[str, Any] | None:
    """The run's summary when it finished with the same configuration (else None: it must be (re)run)."""
    from scalora.train.config import TrainConfig

    return run_results.finished_summary(run.folder, TrainConfig.from_dict(run.cfg))


def run_in_process(cfg: dict[str, Any], threads: int | None) -> dict[str, Any]:
    import torch

    from scalora.train.config import TrainConfig
    from scalora.train.loop import train

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    folder = Path(cfg["output_dir"])
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with (folder / "log.txt").open("a") as logf:
            result = train(TrainConfig.from_dict(cfg), log=lambda s: print(s, file=logf, flush=True))
    finally:
        torch.set_num_threads(before)
    return result.summary


def worker_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    run_in_process(spec["cfg"], spec["threads"])
    return 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claimed(folder: Path) -> Iterator[bool]:
    """Claim a run folder for this process (False when a live process of another invocation holds it)."""
    lock = folder / "running.pid"
    with contextlib.suppress(FileNotFoundError, ValueError):
        if _pid_alive(int(lock.read_text().strip() or 0)):
            yield False
            return
        lock.unlink()
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        yield False
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield True
    finally:
        lock.unlink(missing_ok=True)


def execute(run: Run, args: argparse.Namespace) -> Run:
    """Run one training run (child process unless --jobs 0) and read its summary; skip it when another
    invocation of the study has finished it or is running it."""
    run.folder.mkdir(parents=True, exist_ok=True)
    with claimed(run.folder) as mine:
        if not mine:
            print(f"{run.key}: running in another process, skipped", flush=True)
            return run
        run.summary = finished_summary(run)
        if run.summary is None:
            _execute(run, args)
    return run


def _execute(run: Run, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    try:
        if args.jobs == 0:
            run.summary = run_in_process(run.cfg, args.threads)
        else:
            spec = run.folder / "spec.json"
            spec.write_text(json.dumps({"cfg": run.cfg, "threads": args.threads}, indent=1))
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       TOKENIZERS_PARALLELISM="false")
            with (run.folder / "stdout.txt").open("w") as out:
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)],
                                      stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
            if proc.returncode != 0:
                tail = (run.folder / "stdout.txt").read_text().strip().splitlines()[-3:]
                raise RuntimeError(f"exit {proc.returncode}: {' | '.join(tail)}")
            run.summary = json.loads((run.folder / "summary.json").read_text())
    except Exception as e:  # one failed run (e.g. divergence) must not stop the study
        run.error = f"{type(e).__name__}: {e}"
    s = run.summary
    status = run.error or f"{s['metric']} {s['eval']:.4f}, loss {s['final_train_loss']:.4f}"
    print(f"[{time.strftime('%H:%M:%S')}] {run.key}: {status} ({time.perf_counter() - t0:.0f} s)", flush=True)


def plan_runs(args: argparse.Namespace) -> list[Run]:
    sizes = SIZES[args.size]
    runs: list[Run] = []
    work = args.work_dir / args.size
    c_grid = args.c_grid
    for task in args.tasks:
        size = sizes[task]
        seeds = args.seeds if args.seeds is not None else list(size.seeds)
        variants: dict[str, dict[str, Any]] = {m: {"method": m} for m in args.methods}
        if task == args.ablation_task and args.ablations:
            abl_seeds = args.ablation_seeds if args.ablation_seeds is not None else seeds
            for name, overrides in ablation_variants(c_grid, args.controls, args.methods, args.lr_grid).items():
                variants.setdefault(name, {**overrides, "_seeds": abl_seeds})
            # the references of the ablations, of time-to-target and of the learning-rate grid
            for base in ("scalora", "scalora-i", "lora", *(args.methods if args.lr_grid else ())):
                variants.setdefault(base, {"method": base, "_seeds": abl_seeds})
        for variant, spec in variants.items():
            overrides = {k: v for k, v in spec.items() if k != "_seeds"}
            for seed in spec.get("_seeds", seeds):
                folder = work / task / variant / f"seed{seed}"
                cfg = make_config(task, size, variant, overrides, seed, folder, args)
                runs.append(Run(task, variant, seed, cfg, folder))
    return runs


def run_all(runs: list[Run], args: argparse.Namespace) -> None:
    todo = []
    for run in runs:
        run.summary = finished_summary(run)
        if run.summary is None:
            todo.append(run)
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run", flush=True)
    if args.dry_run or not todo:
        return
    # longest first (SmolLM2 tasks, then full fine-tuning), so parallel jobs finish together
    order = {"gsm": 0, "socialiqa": 1}
    todo.sort(key=lambda r: (order.get(r.task, 2), r.variant != "full", r.seed))
    if args.jobs <= 1:
        for run in todo:
            execute(run, args)
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: execute(r, args), todo))


# ----------------------------------------------------------------------------------------------------
# Reading results
# ----------------------------------------------------------------------------------------------------


def curves_of(rows: list[dict[str, Any]], metric: str) -> dict[str, list[float]]:
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if f"eval/{metric}" in r]
    rank_rows = [r for r in rows if "rank/mean" in r]
    scal = [r for r in rows if "scalora/column" in r]
    out = {
        "step": [r["step"] for r in train_rows],
        "loss": [r["loss"] for r in train_rows],
        "step_time": [r["step_time"] for r in train_rows],
        "eval_step": [r["step"] for r in eval_rows],
        "eval": [r[f"eval/{metric}"] for r in eval_rows],
        "eval_loss": [r["eval/loss"] for r in eval_rows if "eval/loss" in r],  # generation tasks: held-out loss
        "rank_step": [0] + [r["step"] for r in rank_rows],
        "rank": [0.0] + [r["rank/mean"] for r in rank_rows],
        "rank_max": [0.0] + [r["rank/max"] for r in rank_rows],
        "entropy_rank": [0.0] + [r["rank/entropy_mean"] for r in rank_rows],
    }
    if scal:
        out["scalora"] = {k: statistics.fmean(r[f"scalora/{k}"] for r in scal)
                          for k in ("column", "scalar", "identity", "alpha_mean", "beta_mean")}
    return out


def running_mean(values: Sequence[float], window: int) -> list[float | None]:
    """Trailing mean over the last `window` values (None until `window` values exist)."""
    out: list[float | None] = []
    for i in range(len(values)):
        out.append(statistics.fmean(values[i + 1 - window: i + 1]) if i + 1 >= window else None)
    return out


def time_to_target(steps: Sequence[int], losses: Sequence[float], step_times: Sequence[float], target: float,
                   window: int) -> dict[str, float] | None:
    """First step where the trailing `window`-mean of the loss is ≤ `target`, and the training time up to it
    (sum of step times); None if it never gets there."""
    if not len(steps) == len(losses) == len(step_times):
        raise ValueError("steps, losses and step_times must have the same length")
    tol = 1e-12 * max(1.0, abs(target))
    for i, value in enumerate(running_mean(losses, window)):
        if value is not None and value <= target + tol:
            return {"step": int(steps[i]), "time_s": float(sum(step_times[: i + 1]))}
    return None


def final_loss(losses: Sequence[float], window: int) -> float:
    return statistics.fmean(losses[-window:])


def fmt_ms(mean: float, std: float, n: int, scale: float = 100.0, digits: int = 1) -> str:
    if not math.isfinite(mean):
        return "—"
    if n > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def assemble(runs: list[Run], args: argparse.Namespace) -> dict[str, Any]:
    """Everything the report needs, from the finished runs."""
    window = args.window
    done = [r for r in runs if r.summary is not None]
    for run in done:
        rows = run_results.read_metrics(run.folder)
        run.curves = curves_of(rows, run.summary["metric"])
    by: dict[tuple[str, str], list[Run]] = {}
    for run in done:
        by.setdefault((run.task, run.variant), []).append(run)
    tasks = [t for t in args.tasks if any(k[0] == t for k in by)]

    # per-variant summaries
    results: dict[str, dict[str, Any]] = {}
    for (task, variant), rs in sorted(by.items()):
        rs.sort(key=lambda r: r.seed)
        evals = [r.summary["eval"] for r in rs]
        losses = [final_loss(r.curves["loss"], window) for r in rs]
        m, s = mean_std(evals)
        lm, ls = mean_std(losses)
        held_out = [r.curves["eval_loss"][-1] for r in rs if r.curves["eval_loss"]]
        hm, hs = mean_std(held_out)
        entry = {
            "method": rs[0].cfg["method"], "metric": rs[0].summary["metric"], "seeds": [r.seed for r in rs],
            "eval": evals, "eval_mean": m, "eval_std": s, "final_train_loss": losses, "loss_mean": lm,
            "loss_std": ls, "eval_loss": held_out, "eval_loss_mean": hm, "eval_loss_std": hs,
            "rank_mean": mean_std([r.summary.get("rank/mean", math.nan) for r in rs])[0],
            "entropy_rank_mean": mean_std([r.summary.get("rank/entropy_mean", math.nan) for r in rs])[0],
            "rank_max": max((r.summary.get("rank/max", math.nan) for r in rs), default=math.nan),
            "median_step_s": mean_std([statistics.median(r.curves["step_time"][2:] or r.curves["step_time"])
                                       for r in rs])[0],
            "mean_step_s": mean_std([statistics.fmean(r.curves["step_time"][2:] or r.curves["step_time"])
                                     for r in rs])[0],
            "wall_time_s": [r.summary["wall_time_s"] for r in rs],
            "peak_rss_mib": [r.summary["peak_rss_mib"] for r in rs],
            "lr": rs[0].cfg["lr"], "steps": rs[0].cfg["steps"],
            "settings": {k: rs[0].cfg[k] for k in ("scalora_c", "scalora_interval", "scalora_mode",
                                                   "scalora_transfer_moments")},
        }
        scal = [r.curves["scalora"] for r in rs if "scalora" in r.curves]
        if scal:
            entry["scaling_kinds"] = {k: statistics.fmean(x[k] for x in scal) for k in scal[0]}
        results.setdefault(task, {})[variant] = entry
    # held-out loss minus LoRA's on the same seed (the same eval examples): the seeds' eval sets differ
    for entries in results.values():
        lora = entries.get("lora", {})
        ref = dict(zip(lora["seeds"], lora["eval_loss"], strict=True)) if lora.get("eval_loss") else {}
        for entry in entries.values():
            held = zip(entry["seeds"], entry["eval_loss"], strict=True) if entry["eval_loss"] else ()
            gaps = [v - ref[sd] for sd, v in held if sd in ref]
            entry["eval_loss_gap_mean"], entry["eval_loss_gap_std"] = mean_std(gaps)
            entry["eval_loss_gap_n"] = len(gaps)

    # time-to-target, per task and seed, against LoRA of the same seed
    ttt: dict[str, dict[str, Any]] = {}
    for task in tasks:
        lora = {r.seed: r for r in by.get((task, "lora"), [])}
        if not lora:
            continue
        per_variant: dict[str, Any] = {}
        for (t, variant), rs in by.items():
            if t != task:
                continue
            seeds = []
            for r in rs:
                ref = lora.get(r.seed)
                if ref is None:
                    continue
                c_ref = ref.curves
                target = final_loss(c_ref["loss"], window)
                own = time_to_target(c_ref["step"], c_ref["loss"], c_ref["step_time"], target, window)
                c = r.curves
                hit = time_to_target(c["step"], c["loss"], c["step_time"], target, window)
                seeds.append({
                    "seed": r.seed, "target": target, "lora_step": own["step"] if own else None,
                    "lora_time_s": own["time_s"] if own else None,
                    "step": hit["step"] if hit else None, "time_s": hit["time_s"] if hit else None,
                    "step_ratio": hit["step"] / own["step"] if hit and own else None,
                    "time_ratio": hit["time_s"] / own["time_s"] if hit and own else None,
                })
                # paired (same batches, same seed): mean loss difference to LoRA over the second half of training
                half = len(c_ref["loss"]) // 2
                seeds[-1]["loss_gap_2nd_half"] = statistics.fmean(
                    a - b for a, b in zip(c["loss"][half:], c_ref["loss"][half:], strict=False))
            reached = [x for x in seeds if x["step"] is not None]
            gm, gs = mean_std([x["loss_gap_2nd_half"] for x in seeds])
            sm, ss = mean_std([x["step_ratio"] for x in reached])
            tm, ts = mean_std([x["time_ratio"] for x in reached])
            per_variant[variant] = {"seeds": seeds, "reached": len(reached), "of": len(seeds),
                                    "step_ratio_mean": sm, "step_ratio_std": ss,
                                    "time_ratio_mean": tm, "time_ratio_std": ts,
                                    "loss_gap_mean": gm, "loss_gap_std": gs}
        ttt[task] = per_variant

    # the results table: main methods × tasks, and the average over tasks a method has all of
    main_methods = [m for m in METHODS if any(m in results.get(t, {}) for t in tasks)]
    table_rows = []
    for m in main_methods:
        cells = {t: results.get(t, {}).get(m) for t in tasks}
        avg = statistics.fmean(c["eval_mean"] for c in cells.values()) if all(cells.values()) else None
        table_rows.append({"method": m, "cells": {t: (c["eval_mean"], c["eval_std"], len(c["eval"])) if c else None
                                                  for t, c in cells.items()}, "average": avg})

    groups = {}
    task = args.ablation_task
    if task in results:
        for group, members in ablation_groups(args.c_grid, args.controls).items():
            present = [(label, v) for label, v in members if (task, v) in by]
            if len(present) < 2:
                continue
            # paired comparison: only the seeds every member of the group has
            common = sorted(set.intersection(*({r.seed for r in by[(task, v)]} for _, v in present)))
            rows = []
            for label, variant in present:
                rs = [r for r in by[(task, variant)] if r.seed in common]
                tt = {x["seed"]: x for x in ttt.get(task, {}).get(variant, {}).get("seeds", [])}
                ratios = [tt[r.seed]["step_ratio"] for r in rs if r.seed in tt]
                reached = [x for x in ratios if x is not None]
                kinds = [r.curves["scalora"] for r in rs if "scalora" in r.curves]
                em, es = mean_std([r.summary["eval"] for r in rs])
                lm, ls = mean_std([final_loss(r.curves["loss"], window) for r in rs])
                rows.append({"setting": label, "variant": variant, "seeds": common, "n": len(rs),
                             "eval_mean": em, "eval_std": es, "loss_mean": lm, "loss_std": ls,
                             "rank_mean": mean_std([r.summary.get("rank/mean", math.nan) for r in rs])[0],
                             "entropy_rank_mean": mean_std([r.summary.get("rank/entropy_mean", math.nan)
                                                            for r in rs])[0],
                             "lr": rs[0].cfg["lr"],
                             "step_ratio": statistics.fmean(reached) if reached else None,
                             "reached": f"{len(reached)}/{len(ratios)}",
                             "scaling_kinds": {k: statistics.fmean(x[k] for x in kinds) for k in kinds[0]}
                             if kinds else None})
            groups[group] = rows

    # every method at each learning-rate multiplier (the ablation task, paired seeds)
    lr_grid: dict[str, Any] = {}
    for m in args.methods if args.lr_grid and task in results else ():
        present = [(k, lr_variant(m, k)) for k in sorted({1.0, *args.lr_grid}) if (task, lr_variant(m, k)) in by]
        if len(present) < 2:
            continue
        common = sorted(set.intersection(*({r.seed for r in by[(task, v)]} for _, v in present)))
        rows = []
        for k, variant in present:
            rs = [r for r in by[(task, variant)] if r.seed in common]
            em, es = mean_std([r.summary["eval"] for r in rs])
            lm, ls = mean_std([final_loss(r.curves["loss"], window) for r in rs])
            rows.append({"mult": k, "variant": variant, "lr": rs[0].cfg["lr"], "seeds": common, "n": len(rs),
                         "eval_mean": em, "eval_std": es, "loss_mean": lm, "loss_std": ls})
        lr_grid[m] = {"rows": rows, "best_mult_by_eval": max(rows, key=lambda r: r["eval_mean"])["mult"],
                      "best_mult_by_loss": min(rows, key=lambda r: r["loss_mean"])["mult"]}

    return {"results": results, "time_to_target": ttt, "table": table_rows, "ablations": groups, "tasks": tasks,
            "lr_grid": lr_grid,
            "curves": {r.key: r.curves for r in done},
            "failed": {r.key: r.error for r in runs if r.error}}


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------


def markdown_tables(report: dict[str, Any], args: argparse.Namespace) -> dict[str, str]:
    tasks = report["tasks"]
    results = report["results"]
    tables: dict[str, str] = {}
    metric = {t: next(iter(results[t].values()))["metric"] for t in tasks}
    # second average: over the tasks every method of the table has (some methods skip the slow tasks)
    common = [t for t in tasks if all(row["cells"][t] for row in report["table"])]
    head = "| method | " + " | ".join(f"{t} ({metric[t]}, %)" for t in tasks) + " | avg (all tasks) |"
    if common and common != tasks:
        head += f" avg ({', '.join(common)}) |"
    lines = [head, "|" + "---|" * (len(tasks) + 2 + (common != tasks and bool(common)))]
    for row in report["table"]:
        cells = [fmt_ms(*c) if c else "—" for c in row["cells"].values()]
        avg = f"{100 * row['average']:.1f}" if row["average"] is not None else "—"
        line = f"| {LABELS.get(row['method'], row['method'])} | " + " | ".join(cells) + f" | {avg} |"
        if common and common != tasks:
            line += f" {100 * statistics.fmean(row['cells'][t][0] for t in common):.1f} |"
        lines.append(line)
    tables["results"] = "\n".join(lines)

    # held-out loss where the task reports one (generation tasks, whose exact match is coarse at this budget)
    held = [t for t in tasks if any(e["eval_loss"] for e in results[t].values())]
    lines = ["| method | " + " | ".join([f"{t} final train loss" for t in tasks] + [
        f"{t} {name}" for t in held for name in ("held-out loss", "held-out − LoRA's (paired)")]) + " |",
        "|" + "---|" * (len(tasks) + 2 * len(held) + 1)]
    for row in report["table"]:
        cells = []
        for t in tasks:
            e = results[t].get(row["method"])
            cells.append(fmt_ms(e["loss_mean"], e["loss_std"], len(e["eval"]), 1.0, 4) if e else "—")
        for t in held:
            e = results[t].get(row["method"])
            cells.append(fmt_ms(e["eval_loss_mean"], e["eval_loss_std"], len(e["eval_loss"]), 1.0, 4)
                         if e and e["eval_loss"] else "—")
            cells.append(fmt_ms(e["eval_loss_gap_mean"], e["eval_loss_gap_std"], e["eval_loss_gap_n"], 1.0, 4)
                         if e and e["eval_loss_gap_n"] else "—")
        lines.append(f"| {LABELS.get(row['method'], row['method'])} | " + " | ".join(cells) + " |")
    tables["loss"] = "\n".join(lines)

    lines = ["| method | " + " | ".join(f"{t} rank (entropy rank)" for t in tasks) + " |",
             "|" + "---|" * (len(tasks) + 1)]
    for row in report["table"]:
        cells = []
        for t in tasks:
            e = results[t].get(row["method"])
            cells.append(f"{e['rank_mean']:.1f} ({e['entropy_rank_mean']:.1f})" if e else "—")
        lines.append(f"| {LABELS.get(row['method'], row['method'])} | " + " | ".join(cells) + " |")
    tables["rank"] = "\n".join(lines)

    # cost ratios measured side by side on MiniLM (--cost), when present: steps ratio × step-time ratio estimates
    # the time ratio free of the machine's changing load (MiniLM tasks only)
    cost_file = args.out_dir / "scalora_study_cost.json"
    cost = json.loads(cost_file.read_text())["summary"] if cost_file.exists() else {}
    lines = ["| task | method | reached | steps to target | × LoRA (steps) | time to target (s) | × LoRA (time) | "
             "× LoRA (steps × interleaved step-time ratio) | loss − LoRA's, 2nd half (paired) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in tasks:
        for m in METHODS:
            x = report["time_to_target"].get(t, {}).get(m)
            if x is None:
                continue
            hits = [s for s in x["seeds"] if s["step"] is not None]
            gap = f"{x['loss_gap_mean']:+.4f}" + (f" ± {x['loss_gap_std']:.4f}" if x["of"] > 1 else "")
            if not hits:
                lines.append(f"| {t} | {LABELS[m]} | 0/{x['of']} | not reached | not reached | not reached | "
                             f"not reached | not reached | {gap} |")
                continue
            steps = statistics.fmean(s["step"] for s in hits)
            secs = statistics.fmean(s["time_s"] for s in hits)
            n = x["reached"]
            est = "—"
            if m in cost and SIZES[args.size][t].model == MINILM and not args.model:
                est = f"{x['step_ratio_mean'] * cost[m]['ratio_to_lora']['mean_ms']:.2f}"
            lines.append(f"| {t} | {LABELS[m]} | {n}/{x['of']} | {steps:.0f} | "
                         f"{fmt_ms(x['step_ratio_mean'], x['step_ratio_std'], n, 1.0, 2)} | {secs:.0f} | "
                         f"{fmt_ms(x['time_ratio_mean'], x['time_ratio_std'], n, 1.0, 2)} | {est} | {gap} |")
    tables["time_to_target"] = "\n".join(lines)

    if report["ablations"]:
        t = args.ablation_task
        lines = [f"| ablation | setting | seeds | lr | {t} {metric.get(t, '')} (%) | final train loss | "
                 "rank (entropy) | steps to LoRA's loss (× LoRA) | layers column / scalar / identity |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for group, rows in report["ablations"].items():
            for r in rows:
                kinds = r["scaling_kinds"]
                kinds_s = (f"{kinds['column']:.2f} / {kinds['scalar']:.2f} / {kinds['identity']:.2f}"
                           if kinds else "—")
                ratio = f"{r['step_ratio']:.2f} ({r['reached']})" if r["step_ratio"] is not None else \
                    f"not reached ({r['reached']})"
                seeds = ",".join(str(x) for x in r["seeds"])
                lines.append(f"| {group} | {r['setting']} | {seeds} | {r['lr']:g} | "
                             f"{fmt_ms(r['eval_mean'], r['eval_std'], r['n'])} | "
                             f"{fmt_ms(r['loss_mean'], r['loss_std'], r['n'], 1.0, 4)} | "
                             f"{r['rank_mean']:.1f} ({r['entropy_rank_mean']:.1f}) | {ratio} | {kinds_s} |")
        tables["ablations"] = "\n".join(lines)

    if report["lr_grid"]:
        t = args.ablation_task
        mults = sorted({row["mult"] for x in report["lr_grid"].values() for row in x["rows"]})
        lines = ["| method | " + " | ".join(f"lr × {k:g}" for k in mults)
                 + " | best lr (by eval) | best lr (by train loss) |", "|" + "---|" * (len(mults) + 3)]
        for m, x in report["lr_grid"].items():
            at = {row["mult"]: row for row in x["rows"]}
            cells = [f"{fmt_ms(at[k]['eval_mean'], at[k]['eval_std'], at[k]['n'])} ({at[k]['loss_mean']:.3f})"
                     if k in at else "—" for k in mults]
            best = {key: next(r for r in x["rows"] if r["mult"] == x[key]) for key in
                    ("best_mult_by_eval", "best_mult_by_loss")}
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " | "
                         + " | ".join(f"{b['lr']:g} → {100 * b['eval_mean']:.1f} %" for b in best.values()) + " |")
        tables["lr_grid"] = (f"{t}: eval {metric.get(t, '')} (%) mean ± std over seeds "
                             f"{', '.join(map(str, next(iter(report['lr_grid'].values()))['rows'][0]['seeds']))}, "
                             "final training loss in brackets\n\n" + "\n".join(lines))
    return tables


# ----------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def _variant_curves(report: dict[str, Any], task: str, variant: str,
                    seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
    keys = [f"{task}/{variant}/seed{s}" for s in seeds] if seeds is not None else None
    return [c for key, c in report["curves"].items()
            if (key in keys if keys is not None else key.startswith(f"{task}/{variant}/seed"))]


def plot_curves(report: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    plt = common.pyplot()

    tasks = report["tasks"]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        ax_l, ax_e = axes[i]
        for m in METHODS:
            cs = _variant_curves(report, task, m)
            if not cs:
                continue
            n_seeds = len(cs)
            loss = running_mean(_mean_curve([c["loss"] for c in cs]), min(args.window, len(cs[0]["loss"])))
            steps = cs[0]["step"][: len(loss)]
            ax_l.plot([s for s, v in zip(steps, loss, strict=True) if v is not None],
                      [v for v in loss if v is not None], color=COLORS[m], label=LABELS[m])
            ev = _mean_curve([c["eval"] for c in cs])
            ax_e.plot(cs[0]["eval_step"][: len(ev)], [100 * v for v in ev], marker="o", color=COLORS[m],
                      label=LABELS[m])
        metric = next(iter(report["results"][task].values()))["metric"]
        seeds = len(next(iter(report["results"][task].values()))["seeds"])
        ax_l.set_title(f"{task}: training loss (trailing mean of {args.window} steps, mean of {n_seeds} seed(s))",
                       fontsize=9)
        ax_l.set_xlabel("step")
        ax_e.set_title(f"{task}: eval {metric} (%), mean of {seeds} seed(s)", fontsize=9)
        ax_e.set_xlabel("step")
        ax_l.grid(alpha=0.3)
        ax_e.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_rank(report: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    plt = common.pyplot()
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    tasks = report["tasks"]
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.6 * len(tasks), 7), squeeze=False)
    for j, task in enumerate(tasks):
        for row, (key, title) in enumerate((("rank", "numerical rank (σ > 1e-3 σ_max)"),
                                            ("entropy_rank", "entropy effective rank"))):
            ax = axes[row][j]
            for m in METHODS:
                cs = _variant_curves(report, task, m)
                if not cs:
                    continue
                ys = _mean_curve([c[key] for c in cs])
                pts = [(x, y) for x, y in zip(cs[0]["rank_step"], ys, strict=False) if y > 0]  # log axis
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=COLORS[m], label=LABELS[m])
            ax.axhline(8, color="grey", ls=":", lw=1)
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_title(f"{task}: {title}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Rank of W − W_pretrained (mean of ≤ 12 layers; dotted: r = 8; α-LoRA's includes its rescaled "
                 "base diag(a)·W0 − W0)", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


def plot_lr_grid(report: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Eval metric and final training loss of every method against its learning-rate multiplier."""
    plt = common.pyplot()

    task = args.ablation_task
    metric = next(iter(report["results"][task].values()))["metric"]
    fig, (ax_e, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    for m, x in report["lr_grid"].items():
        ks = [r["mult"] for r in x["rows"]]
        ax_e.errorbar(ks, [100 * r["eval_mean"] for r in x["rows"]], yerr=[100 * r["eval_std"] for r in x["rows"]],
                      marker="o", capsize=3, color=COLORS.get(m), label=LABELS.get(m, m))
        ax_l.errorbar(ks, [r["loss_mean"] for r in x["rows"]], yerr=[r["loss_std"] for r in x["rows"]],
                      marker="o", capsize=3, color=COLORS.get(m), label=LABELS.get(m, m))
    for ax, title in ((ax_e, f"eval {metric} (%)"), (ax_l, "final training loss")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate × the task's default for the method")
        ax.set_title(f"{task}: {title}", fontsize=9)
        ax.grid(alpha=0.3)
    ax_e.legend(fontsize=7)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=120)


def plot_ablations(report: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    plt = common.pyplot()

    groups = report["ablations"]
    task = args.ablation_task
    ncols = min(3, len(groups))
    nblocks = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(2 * nblocks, ncols, figsize=(4.8 * ncols, 6.6 * nblocks), squeeze=False)
    for j in range(len(groups), nblocks * ncols):
        axes[2 * (j // ncols)][j % ncols].set_visible(False)
        axes[2 * (j // ncols) + 1][j % ncols].set_visible(False)
    for j, (group, rows) in enumerate(groups.items()):
        lora = _variant_curves(report, task, "lora", rows[0]["seeds"])
        ax_l, ax_b = axes[2 * (j // ncols)][j % ncols], axes[2 * (j // ncols) + 1][j % ncols]
        for k, r in enumerate(rows):
            cs = _variant_curves(report, task, r["variant"], r["seeds"])
            loss = running_mean(_mean_curve([c["loss"] for c in cs]), min(args.window, len(cs[0]["loss"])))
            steps = cs[0]["step"][: len(loss)]
            ax_l.plot([s for s, v in zip(steps, loss, strict=True) if v is not None],
                      [v for v in loss if v is not None], color=f"C{k}", label=f"{group} = {r['setting']}")
        if lora:
            loss = running_mean(_mean_curve([c["loss"] for c in lora]), min(args.window, len(lora[0]["loss"])))
            ax_l.plot([s for s, v in zip(lora[0]["step"], loss, strict=False) if v is not None],
                      [v for v in loss if v is not None], color="grey", ls="--", label="LoRA")
        ax_l.set_title(f"{task}: training loss, ablation of {group}", fontsize=9)
        ax_l.set_xlabel("step")
        ax_l.legend(fontsize=7)
        ax_l.grid(alpha=0.3)
        xs = range(len(rows))
        ax_b.bar(xs, [100 * r["eval_mean"] for r in rows], yerr=[100 * r["eval_std"] for r in rows],
                 color=[f"C{k}" for k in xs], capsize=3)
        ref = report["results"].get(task, {}).get("lora")
        pairs = zip(ref["seeds"], ref["eval"], strict=True) if ref else []
        ref_evals = [v for sd, v in pairs if sd in rows[0]["seeds"]]
        if ref_evals:
            ax_b.axhline(100 * statistics.fmean(ref_evals), color="grey", ls="--", label="LoRA")
            ax_b.legend(fontsize=7)
        ax_b.set_xticks(list(xs), [r["setting"] for r in rows])
        lo = min(100 * r["eval_mean"] for r in rows)
        ax_b.set_ylim(max(0, lo - 10), None)
        metric = next(iter(report["results"][task].values()))["metric"]
        ax_b.set_title(f"{task}: final eval {metric} (%)", fontsize=9)
        ax_b.set_xlabel(group)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# Cost: step time and peak memory, interleaved, one child process per measurement
# ----------------------------------------------------------------------------------------------------


def _status_kib(name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cost_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train `spec["steps"]` steps of one method with the training loop's pieces; time each step."""
    import gc

    import torch

    from scalora.train import loop
    from scalora.train.config import TrainConfig
    from scalora.train.methods import adapt, build
    from scalora.train.models import load_model
    from scalora.train.order import BatchOrder
    from scalora.train.tasks import load_task

    torch.set_num_threads(spec["threads"])
    cfg = TrainConfig.from_dict(spec["cfg"])
    torch.manual_seed(cfg.seed)
    task = load_task(cfg.task, train_file=cfg.train_file, train_size=cfg.train_size, eval_size=cfg.eval_size,
                     seed=cfg.seed)
    model, tokenizer = load_model(cfg.model, task.kind, num_labels=task.num_labels)
    train_examples, held = REGISTRY[cfg.method].split(cfg, task.train)
    adapt(cfg, model)
    collate = task.collate(tokenizer, cfg.max_length)
    setup = build(cfg, model, held=held, collate=collate)
    order = BatchOrder(len(train_examples), cfg.batch_size, cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [collate([train_examples[i] for i in order(k)]) for k in range(cfg.steps)]
    model.train()
    gc.collect()
    rss_before = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    times = []
    gc.disable()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        loop.train_step(model, [batches[step - 1]])
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        setup.optimizer.step()
        setup.scheduler.step()
        setup.optimizer.zero_grad(set_to_none=True)
        setup.hook.after_step(step)
        times.append(time.perf_counter() - t0)
    gc.enable()
    peak = _status_kib("VmHWM")
    return {"step_s": times, "rss_before_mib": (rss_before or 0) / 1024, "peak_rss_mib": (peak or 0) / 1024,
            "peak_reset": reset, "trainable": sum(p.numel() for p in params)}


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    methods = list(args.methods)
    if "lora" not in methods:
        methods.insert(0, "lora")
    size = SIZES["small"]["sarcasm"]
    work = args.work_dir / "cost"
    work.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, Any]] = []
    for rnd in range(args.cost_rounds):
        k = rnd % len(methods)
        order = methods[k:] + methods[:k]
        measured: dict[str, Any] = {}
        for m in order:
            cfg = make_config("sarcasm", size, m, {"method": m}, 0, work / m, args)
            cfg.update(steps=args.cost_warmup + args.cost_steps, batch_size=args.cost_batch,
                       max_length=args.cost_seq, rank_layers=0, eval_size=32)
            spec = work / f"{m}.json"
            out = work / f"{m}.out.json"
            spec.write_text(json.dumps({"cfg": cfg, "threads": args.threads, "out": str(out)}))
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--cost-worker", str(spec)],
                                  capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"cost worker {m} failed: {proc.stderr.strip().splitlines()[-3:]}")
            res = json.loads(out.read_text())
            timed = res["step_s"][args.cost_warmup:]
            measured[m] = {"median_ms": 1000 * statistics.median(timed), "mean_ms": 1000 * statistics.fmean(timed),
                           "peak_rss_mib": res["peak_rss_mib"], "rss_before_mib": res["rss_before_mib"],
                           "peak_reset": res["peak_reset"], "trainable": res["trainable"]}
            print(f"[{time.strftime('%H:%M:%S')}] cost round {rnd + 1}: {m} median {measured[m]['median_ms']:.0f} "
                  f"ms, mean {measured[m]['mean_ms']:.0f} ms, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
        rounds.append({"order": order, "methods": measured})
    summary = {}
    for m in methods:
        per = [r["methods"][m] for r in rounds]
        ratio = {key: statistics.median(r["methods"][m][key] / r["methods"]["lora"][key] for r in rounds)
                 for key in ("median_ms", "mean_ms", "peak_rss_mib")}
        summary[m] = {"median_ms": statistics.median(x["median_ms"] for x in per),
                      "mean_ms": statistics.median(x["mean_ms"] for x in per),
                      "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in per),
                      "train_rss_growth_mib": statistics.median(x["peak_rss_mib"] - x["rss_before_mib"] for x in per),
                      "trainable": per[0]["trainable"], "ratio_to_lora": ratio}
    lines = ["| method | trainable params | median step (ms) | mean step (ms) | × LoRA (median) | × LoRA (mean) | "
             "peak RSS (MiB) | × LoRA (peak RSS) | RSS growth in training (MiB) |", "|" + "---|" * 9]
    for m in methods:
        s = summary[m]
        r = s["ratio_to_lora"]
        lines.append(f"| {LABELS.get(m, m)} | {s['trainable']:,d} | {s['median_ms']:.0f} | {s['mean_ms']:.0f} | "
                     f"{r['median_ms']:.2f} | {r['mean_ms']:.2f} | {s['peak_rss_mib']:.0f} | "
                     f"{r['peak_rss_mib']:.3f} | {s['train_rss_growth_mib']:.0f} |")
    return {"settings": {"model": args.model or size.model, "batch": args.cost_batch, "seq": args.cost_seq,
                         "steps": args.cost_steps, "warmup": args.cost_warmup, "rounds": args.cost_rounds,
                         "threads": args.threads},
            "rounds": rounds, "summary": summary, "table": "\n".join(lines)}


def plot_cost(cost: dict[str, Any], path: Path) -> None:
    plt = common.pyplot()

    methods = list(cost["summary"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "mean_ms", "step time × LoRA (mean over steps, median over rounds)"),
                           (axes[1], "peak_rss_mib", "peak RSS × LoRA")):
        vals = [cost["summary"][m]["ratio_to_lora"][key] for m in methods]
        ax.bar(range(len(methods)), vals, color=[COLORS.get(m, "grey") for m in methods])
        ax.axhline(1.0, color="grey", ls="--")
        ax.set_xticks(range(len(methods)), [LABELS.get(m, m) for m in methods], rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _csv(choices: Sequence[str]):
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = sorted(set(items) - set(choices))
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("--tasks", type=_csv(TASKS), default=list(TASKS), help="comma-separated")
    p.add_argument("--methods", type=_csv(METHODS), default=list(METHODS), help="comma-separated")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated seeds for every task (default: the size's seeds per task)")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True,
                   help="run the ScaLoRA ablations on --ablation-task")
    p.add_argument("--ablation-task", choices=TASKS, default="sarcasm")
    p.add_argument("--ablation-seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="seeds of the ablation runs (default: the task's seeds)")
    p.add_argument("--controls", action="store_true",
                   help="also run LoRA at 2x/4x lr and ScaLoRA c=0.1 without moment transfer (ablation task)")
    p.add_argument("--c-grid", type=float, nargs="+", default=list(DEFAULT_C_GRID), help="ScaLoRA c values")
    p.add_argument("--lr-grid", type=float, nargs="+", default=[],
                   help="on the ablation task, also run every method at these multiples of its learning rate "
                        "(e.g. 0.5 2 4) and report each method at its best")
    p.add_argument("--window", type=int, default=WINDOW, help="running-mean window of the loss for time-to-target")
    p.add_argument("--steps", type=int, default=None, help="override every task's step count")
    p.add_argument("--model", default=None, help="override the model of every task (a local folder, for tests)")
    p.add_argument("--train-file", type=Path, default=None,
                   help="override the data of every task (JSONL/CSV, text+label or prompt+completion)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at once, each in its own process (0: one at a time in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="where runs write (resumable)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT, help="where the JSON and figures go")
    p.add_argument("--dry-run", action="store_true", help="list what would run, run nothing, and report")
    p.add_argument("--no-run", action="store_true", help="only assemble the report from finished runs")
    p.add_argument("--cost", action="store_true", help="measure step time and peak RSS (interleaved) instead")
    p.add_argument("--cost-rounds", type=int, default=3)
    p.add_argument("--cost-steps", type=int, default=20, help="timed steps per cost measurement")
    p.add_argument("--cost-warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--cost-batch", type=int, default=16)
    p.add_argument("--cost-seq", type=int, default=48)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cost-worker", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        worker_main(args.worker)
        return {}
    if args.cost_worker is not None:
        spec = json.loads(args.cost_worker.read_text())
        Path(spec["out"]).write_text(json.dumps(cost_worker(spec)))
        return {}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.cost:
        cost = run_cost(args)
        cost.update(command=common.command_line(__file__, argv),
                    environment=common.environment(), runtime_s=time.perf_counter() - t0)
        (args.out_dir / "scalora_study_cost.json").write_text(json.dumps(cost, indent=1) + "\n")
        plot_cost(cost, args.out_dir / "scalora_study_cost.png")
        print(cost["table"])
        return cost

    runs = plan_runs(args)
    if not args.no_run:
        run_all(runs, args)
    else:
        for run in runs:
            run.summary = finished_summary(run)
    report = assemble(runs, args)
    tables = markdown_tables(report, args) if report["tasks"] else {}
    sizes = {t: vars(SIZES[args.size][t]) for t in args.tasks}
    out = {
        "question": "ScaLoRA vs LoRA-family baselines and full fine-tuning at r = 8: scores, time to LoRA's final "
                    "training loss, rank of the accumulated update, ablations",
        "size": args.size, "sizes": {t: {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}
                                     for t, s in sizes.items()},
        "command": common.command_line(__file__, argv),
        "overrides": {"model": args.model, "train_file": str(args.train_file) if args.train_file else None,
                      "steps": args.steps},
        "window": args.window, "c_grid": args.c_grid, "ablation_task": args.ablation_task,
        "threads": args.threads, "jobs": args.jobs,
        "results": report["results"], "table": report["table"], "time_to_target": report["time_to_target"],
        "ablations": report["ablations"], "lr_grid": report["lr_grid"], "failed": report["failed"], "tables": tables,
        "runs": {k: c for k, c in report["curves"].items()},
        "run_wall_s": {r.key: round(r.summary["wall_time_s"], 2) for r in runs if r.summary},
        "environment": common.environment(), "runtime_s": time.perf_counter() - t0,
    }
    (args.out_dir / "scalora_study.json").write_text(json.dumps(out, indent=1, default=str) + "\n")
    if report["tasks"]:
        plot_curves(report, args, args.out_dir / "scalora_study_curves.png")
        plot_rank(report, args, args.out_dir / "scalora_study_rank.png")
        if report["ablations"]:
            plot_ablations(report, args, args.out_dir / "scalora_study_ablations.png")
        if report["lr_grid"]:
            plot_lr_grid(report, args, args.out_dir / "scalora_study_lr_grid.png")
    for name, text in tables.items():
        print(f"\n## {name}\n{text}")
    if report["failed"]:
        print("\nfailed runs:", json.dumps(report["failed"], indent=1))
    return out


if __name__ == "__main__":
    main()
