"""The training loop: one run of one method on one task, with logs, evaluation, checkpoints and a result.

Everything that decides the computation (data order, initialisation, dropout) comes from the seed and the step
number, and the random generators are saved in each checkpoint, so a resumed run ends with the same weights as
one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from tqdm.auto import tqdm

from scalora.errors import ConfigError, ScaloraError
from scalora.finite import first_nonfinite
from scalora.model import lora_layers, merge, trainable_parameters
from scalora.peft_format import atomic_write, save_adapter
from scalora.rank import export_lora, snapshot_base_weights
from scalora.train import checkpoint, rundir
from scalora.train.config import TrainConfig
from scalora.train.hooks import Collate
from scalora.train.methods import Setup, adapt, build, tracked_layers
from scalora.train.metrics_log import MetricsLog
from scalora.train.models import load_model
from scalora.train.order import BatchOrder
from scalora.train.rank_tracker import RankTracker
from scalora.train.registry import METHODS
from scalora.train.rundir import METRICS, SUMMARY, RunFolder
from scalora.train.runlock import RunLock
from scalora.train.tasks import Task, load_task

__all__ = ["METRICS", "SUMMARY", "RunFolderError", "RunResult", "TrainingError", "check_max_length", "train",
           "train_step"]

_LOWER_LR = "lower --lr (or --scalora-c for ScaLoRA) and start over with --overwrite."


class TrainingError(ScaloraError):
    """Training cannot go on (e.g. the loss became NaN)."""


class RunFolderError(ScaloraError, OSError):
    """The run folder cannot be created, locked or written (a full disk, a read-only folder)."""


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any]


def _check_output(cfg: TrainConfig, out: Path) -> None:
    """Refuse to start over a run that exists unless asked to resume or overwrite it (nothing is touched)."""
    if checkpoint.find(out) is not None and not (cfg.resume or cfg.overwrite):
        raise ScaloraError(f"{out} already holds a run; pass --resume to continue it, --overwrite to start "
                           f"over, or choose another --output-dir.")


def _save_result(cfg: TrainConfig, run: RunFolder, model: nn.Module, tokenizer: Any,
                 pretrained: dict[str, torch.Tensor] | None) -> dict[str, str]:
    """The method's result (`Method.result`: adapter, or merged model), plus the rank-k export, written into the
    run's current folder; returns where each will be once the run is in its final folder."""
    saved: dict[str, str] = {}
    if pretrained is not None and cfg.export_rank is not None:
        name = f"adapter-rank{cfg.export_rank}"
        report = export_lora(model, pretrained, cfg.export_rank, run.current / name, base_model_name_or_path=cfg.model)
        saved["export"] = str(run.final / name)
        saved["export_max_residual"] = f"{report.max_residual:.4g}"
    if METHODS[cfg.method].result == "adapter":
        save_adapter(model, run.current / "adapter")
        saved["adapter"] = str(run.final / "adapter")
        return saved
    plain = merge(model) if any(True for _ in lora_layers(model)) else model
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=run.current))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checkpoint.replace_dir(tmp, run.current / "model")
        saved["model"] = str(run.final / "model")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return saved


def _evaluate(cfg: TrainConfig, task: Task, model: nn.Module, tokenizer: Any) -> dict[str, float]:
    with torch.random.fork_rng():  # evaluation must not move the training's random stream
        result = task.evaluate(model, tokenizer, max_length=cfg.max_length, batch_size=cfg.eval_batch_size,
                               limit=cfg.eval_limit)
    return {f"eval/{k}": float(v) for k, v in result.items()}


def _peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def train_step(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Forward and backward over the micro-batches of one optimiser step; returns the mean loss."""
    total = 0.0
    for batch in batches:
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise TrainingError(f"the loss became NaN or infinite; {_LOWER_LR}")
        (loss / len(batches)).backward()
        total += float(loss.detach())
    return total / len(batches)


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print) -> RunResult:
    """Run `cfg` to its last step (resuming its checkpoint with ``cfg.resume``) and write its results.

    The output folder is locked for the whole run (`RunLock`); an earlier run in it is replaced only once this
    one has finished, or with ``save_every`` once its first checkpoint is durable (`rundir`). Problems of the folder
    (full disk, no permission) are a `RunFolderError` that says what was kept.
    """
    out = Path(cfg.output_dir)
    rundir.check_location(out, {"--model": cfg.model, "--train-file": cfg.train_file, "--eval-file": cfg.eval_file})
    lock = RunLock(out)
    try:
        lock.acquire()
    except OSError as exc:
        raise RunFolderError(f"cannot use {out} as the run folder ({checkpoint.reason(exc)}); choose a folder "
                             f"you can write to with --output-dir.") from exc
    try:
        if lock.previous_owner is not None:
            log(f"{out}: taking over from process {lock.previous_owner}, which ended without finishing")
        rundir.recover(out)
        return _train(cfg, out, log)
    finally:
        lock.release()


def _check_model_fits(cfg: TrainConfig, model: nn.Module) -> None:
    """Options that only the loaded model can check: the sequence length and the export rank."""
    check_max_length(cfg.max_length, model)
    if cfg.export_rank is not None:
        limit = min((min(layer.in_features, layer.out_features) for _, layer in lora_layers(model)), default=0)
        if cfg.export_rank > limit:
            raise ConfigError(f"--export-rank {cfg.export_rank} exceeds the rank of the smallest adapted weight "
                              f"({limit}); use --export-rank {limit} or less.")


def check_max_length(max_length: int, model: nn.Module) -> None:
    """A `ConfigError` if sequences of `max_length` tokens are longer than the model's position embeddings allow."""
    config = getattr(model, "config", None)
    limit = next((v for v in (getattr(config, n, None) for n in ("max_position_embeddings", "n_positions"))
                  if isinstance(v, int)), None)
    if limit is not None and max_length > limit:
        raise ConfigError(f"--max-length {max_length} is longer than the model allows ({limit} positions); use "
                          f"--max-length {limit} or less.")


@dataclass
class _Training:
    """What a run steps, evaluates and saves (`_set_up`), and its clock."""

    cfg: TrainConfig
    task: Task
    model: nn.Module
    tokenizer: Any
    examples: list[dict[str, Any]]  # what it trains on (a method may hold some out)
    collate: Collate
    setup: Setup
    tracker: RankTracker
    pretrained: dict[str, torch.Tensor] | None  # the base weights, for --export-rank
    params: list[nn.Parameter]  # the weights the gradient clipping sees
    order: BatchOrder
    elapsed: float = 0.0
    step_times: list[float] = field(default_factory=list)
    last_eval: dict[str, float] = field(default_factory=dict)


def _train(cfg: TrainConfig, out: Path, log: Callable[[str], None]) -> RunResult:
    """`train` inside the locked folder: set up, resume, step (saving checkpoints), finish."""
    t = _set_up(cfg, out)
    start = 0
    if cfg.resume:
        start, t.elapsed = _resume(cfg, out, t.model, t.setup)
        log(f"resumed from step {start}")
    trainable, total = trainable_parameters(t.model)
    log(f"{t.task.summary()}")
    log(f"{cfg.method}: trainable params {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)")

    run = RunFolder.start(out, replace=not cfg.resume and bool(rundir.outputs(out)),
                          step=start if cfg.resume else None)
    with _reported(run):
        metrics = MetricsLog(run, keep_until=start if cfg.resume else None, tensorboard=cfg.tensorboard, log=log)
        t.model.train()
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc=cfg.method, dynamic_ncols=True)
        try:
            for step in range(start + 1, cfg.steps + 1):
                row = _step(t, step)
                if step % cfg.log_every == 0 or len(row) > 6:
                    metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", ex_s=f"{row['examples_per_s']:.1f}")
                bar.update(1)
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    _save_checkpoint(t, run, step)
        finally:
            bar.close()
            metrics.close()
        if start == cfg.steps:  # nothing left to run: evaluate the resumed weights for the report
            t.last_eval = _evaluate(cfg, t.task, t.model, t.tokenizer)
        summary = _finish(t, run, metrics.rows, {"trainable_params": trainable, "total_params": total})
    log(f"{cfg.method}: {t.task.metric} {summary['eval']:.4f}, final train loss {summary['final_train_loss']:.4f}, "
        f"{t.elapsed:.1f} s; results in {out}")
    return RunResult(out, summary)


def _set_up(cfg: TrainConfig, out: Path) -> _Training:
    """Check the options, then seed, load the task and model, adapt it and build the method's optimiser (in the
    order that fixes the random stream)."""
    method = METHODS[cfg.method]
    if cfg.export_rank is not None and not method.adapters:
        raise ConfigError("--export-rank needs an adapter method (it compresses the update of the adapted layers).")
    _check_output(cfg, out)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    task = load_task(cfg.task, train_file=cfg.train_file, eval_file=cfg.eval_file, train_size=cfg.train_size,
                     eval_size=cfg.eval_size, seed=cfg.seed, max_new_tokens=cfg.max_new_tokens)
    model, tokenizer = load_model(cfg.model, task.kind, num_labels=task.num_labels)
    if task.kind == "classification" and task.label_names:  # so the saved model names its predictions
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    examples, held = method.split(cfg, task.train)
    tracker = RankTracker(model, tracked_layers(cfg, model))
    adapt(cfg, model)
    _check_model_fits(cfg, model)
    pretrained = snapshot_base_weights(model) if cfg.export_rank is not None else None
    collate = task.collate(tokenizer, cfg.max_length)
    setup = build(cfg, model, held=held, collate=collate)
    return _Training(cfg, task, model, tokenizer, examples, collate, setup, tracker, pretrained,
                     [p for p in model.parameters() if p.requires_grad],
                     BatchOrder(len(examples), cfg.batch_size, cfg.seed))


def _step(t: _Training, step: int) -> dict[str, Any]:
    """Optimiser step `step` (from 1): its micro-batches, clipping, the method's hook and, when due, an evaluation;
    returns its metrics row."""
    cfg, setup = t.cfg, t.setup
    t0 = time.perf_counter()
    ks = range((step - 1) * cfg.grad_accum, step * cfg.grad_accum)
    loss = train_step(t.model, [t.collate([t.examples[i] for i in t.order(k)]) for k in ks])
    grad_norm = float("nan")
    if cfg.max_grad_norm is not None:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, cfg.max_grad_norm))
        if not math.isfinite(grad_norm):  # clipping would turn the weights into NaN
            raise TrainingError(f"the gradient became NaN or infinite at step {step}; {_LOWER_LR}")
    lr = setup.scheduler.get_last_lr()[0]
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    row: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                           **setup.hook.after_step(step)}
    dt = time.perf_counter() - t0
    t.elapsed += dt
    t.step_times.append(dt)
    row["step_time"] = dt
    row["examples_per_s"] = cfg.batch_size * cfg.grad_accum / dt
    row.update(setup.hook.stats(step))
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
        t.last_eval = _evaluate(cfg, t.task, t.model, t.tokenizer)
        row.update(t.last_eval)
        row.update(t.tracker.measure(t.model))
        t.model.train()
    return row


def _save_checkpoint(t: _Training, run: RunFolder, step: int) -> None:
    """The weights that changed and the training state, after step `step`; durable once the run is promoted."""
    setup = t.setup
    state = {"optimizer": setup.optimizer.state_dict(), "scheduler": setup.scheduler.state_dict(),
             "rng": checkpoint.rng_state(), "elapsed": t.elapsed}
    if setup.hook.key is not None:
        state[setup.hook.key] = setup.hook.state_dict()
    tensors = checkpoint.mutable_state(t.model, METHODS[t.cfg.method].changes_base)
    bad = first_nonfinite(tensors.items())
    if bad is not None:  # keep the last good checkpoint rather than one that cannot be resumed
        raise TrainingError(f"{bad} became NaN or infinite by step {step}; {_LOWER_LR}")
    checkpoint.save(run.current, t.cfg, step, tensors, state)
    run.step = step
    if step < t.cfg.steps:  # the last step's checkpoint replaces an earlier run only with the results
        run.promote()


def _finish(t: _Training, run: RunFolder, rows: list[dict[str, Any]], sizes: dict[str, int]) -> dict[str, Any]:
    """Save the result and write summary.json; the run then takes its final folder. Returns the summary."""
    cfg, task = t.cfg, t.task
    rank = t.tracker.measure(t.model)
    results = _save_result(cfg, run, t.model, t.tokenizer, t.pretrained)
    losses = [r["loss"] for r in rows if "loss" in r]
    timed = t.step_times[2:] if len(t.step_times) > 4 else t.step_times
    summary = {
        "method": cfg.method, "model": cfg.model, "task": task.name, "steps": cfg.steps, "seed": cfg.seed,
        "metric": task.metric, "eval": t.last_eval.get(f"eval/{task.metric}", math.nan),
        "label_names": task.label_names, "data": task.data,
        "final_train_loss": statistics.fmean(losses[-10:]) if losses else math.nan,
        "wall_time_s": t.elapsed, "median_step_s": statistics.median(timed) if timed else math.nan,
        "peak_rss_mib": _peak_rss_mib(), **sizes, **rank, "saved": results, "config": cfg.to_dict(),
    }
    text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(run.current / SUMMARY, lambda tmp: Path(tmp).write_text(text))
    run.promote()
    return summary


@contextmanager
def _reported(run: RunFolder) -> Iterator[None]:
    """A staged run that fails is discarded; a `TrainingError` or an I/O error ends with what is kept and what to
    do (`RunFolder.kept`)."""
    try:
        yield
    except BaseException as exc:
        run.discard()
        if isinstance(exc, TrainingError):
            raise TrainingError(f"{exc} {run.kept()}") from None
        if isinstance(exc, (OSError, SafetensorError)):
            raise RunFolderError(f"writing the run in {run.final} failed ({checkpoint.reason(exc)}); free some "
                                 f"space (or fix the folder's permissions) and run the command again. "
                                 f"{run.kept()}") from exc
        raise


def _resume(cfg: TrainConfig, out: Path, model: nn.Module, setup: Setup) -> tuple[int, float]:
    """Load the checkpoint into the model, optimiser, schedules and random generators: (step, elapsed seconds)."""
    ckpt = checkpoint.load(out, cfg)
    state = model.state_dict()
    unexpected = set(ckpt.model) - set(state)
    if unexpected:
        raise checkpoint.CheckpointError(f"the checkpoint has weights this model lacks: {sorted(unexpected)[0]!r}.")
    missing = set(checkpoint.mutable_state(model, METHODS[cfg.method].changes_base)) - set(ckpt.model)
    if missing:
        raise checkpoint.CheckpointError(f"the checkpoint lacks weights this run trains: {sorted(missing)[0]!r} "
                                         f"({len(missing)} in all); it cannot be resumed exactly.")
    wrong = next((k for k, t in ckpt.model.items() if t.shape != state[k].shape), None)
    if wrong is not None:
        raise checkpoint.CheckpointError(f"the checkpoint's {wrong!r} has shape {tuple(ckpt.model[wrong].shape)}, the "
                                         f"model's {tuple(state[wrong].shape)}; it belongs to another model: start "
                                         f"over with --overwrite.")
    try:
        model.load_state_dict(ckpt.model, strict=False)
        setup.optimizer.load_state_dict(ckpt.state["optimizer"])
        setup.scheduler.load_state_dict(ckpt.state["scheduler"])
        if setup.hook.key is not None:
            setup.hook.load_state_dict(ckpt.state[setup.hook.key])
        checkpoint.set_rng_state(ckpt.state["rng"])
        elapsed = float(ckpt.state.get("elapsed", 0.0))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise checkpoint.CheckpointError(f"the training state of the checkpoint in {out} does not fit this run "
                                         f"({type(exc).__name__}: {checkpoint.reason(exc)}); start over with "
                                         f"--overwrite.") from None
    return ckpt.step, elapsed
