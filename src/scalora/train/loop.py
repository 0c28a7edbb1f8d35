"""The training loop: one run of one method on one task, with logs, evaluation, checkpoints and a result.

Everything that decides the computation (data order, initialisation, dropout) comes from the seed and the step
number, and the random generators are saved in each checkpoint, so a resumed run ends with the same weights as
one that was never interrupted.
"""

from __future__ import annotations

import importlib.util
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
from dataclasses import dataclass
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
from scalora.rank import effective_rank, effective_weight, export_lora, snapshot_base_weights
from scalora.train import checkpoint, rundir
from scalora.train.config import TrainConfig
from scalora.train.methods import Setup, adapt, build, tracked_layers
from scalora.train.models import load_model
from scalora.train.order import BatchOrder
from scalora.train.registry import METHODS
from scalora.train.rundir import METRICS, SUMMARY, RunFolder
from scalora.train.runlock import RunLock
from scalora.train.tasks import Task, load_task

_LOWER_LR = "lower --lr (or --scalora-c for ScaLoRA) and start over with --overwrite."


class TrainingError(ScaloraError):
    """Training cannot go on (e.g. the loss became NaN)."""


class RunFolderError(ScaloraError, OSError):
    """The run folder cannot be created, locked or written (a full disk, a read-only folder)."""


@dataclass
class RunResult:
    output_dir: Path
    summary: dict[str, Any]


def _weight_oi(model: nn.Module, name: str, fan_in_fan_out: bool) -> torch.Tensor:
    module = model.get_submodule(name)
    if hasattr(module, "lora_A"):
        return effective_weight(module)
    weight = module.weight.detach().double()
    return weight.t() if fan_in_fan_out else weight


class RankTracker:
    """Effective rank of the accumulated update W − W_pretrained on a few layers, for any method."""

    def __init__(self, model: nn.Module, layers: list[tuple[str, bool]]) -> None:
        self.layers = layers
        self.start = {name: _weight_oi(model, name, fi).clone() for name, fi in layers}

    def measure(self, model: nn.Module) -> dict[str, float]:
        if not self.layers:
            return {}
        infos = [effective_rank(_weight_oi(model, name, fi) - self.start[name]) for name, fi in self.layers]
        return {"rank/mean": statistics.fmean(i.rank for i in infos),
                "rank/max": float(max(i.rank for i in infos)),
                "rank/entropy_mean": statistics.fmean(i.entropy_rank for i in infos)}


class MetricsLog:
    """metrics.jsonl (one JSON object per line) in the run's current folder, plus TensorBoard when installed.

    On resume the rows up to the checkpoint's step are kept; a last line that a crash left half written is dropped
    and reported through `log`.
    """

    def __init__(self, run: RunFolder, keep_until: int | None, tensorboard: bool,
                 log: Callable[[str], None]) -> None:
        self.run = run
        self.rows = [] if keep_until is None else [
            r for r in _read_rows(run.current / METRICS, log) if r.get("step", 0) <= keep_until]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in self.rows)))
        self.writer = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.current / "tensorboard"))

    @property
    def path(self) -> Path:
        return self.run.current / METRICS

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _read_rows(path: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The rows of a metrics file; a torn last line is dropped (and reported), a bad line before it is an error."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").split("\n"), start=1) if line.strip()]
    rows = []
    for n, line in lines:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif n == lines[-1][0]:
            log(f"{path}: dropped line {n}, which a crash left half written")
        else:
            raise checkpoint.CheckpointError(f"{path} line {n} is not a JSON object; the file is corrupt: delete "
                                             f"that line (or the file) and resume again.")
    return rows


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


def _train(cfg: TrainConfig, out: Path, log: Callable[[str], None]) -> RunResult:
    """`train` inside the locked folder."""
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
    train_examples, held = method.split(cfg, task.train)
    tracker = RankTracker(model, tracked_layers(cfg, model))
    adapt(cfg, model)
    _check_model_fits(cfg, model)
    pretrained = snapshot_base_weights(model) if cfg.export_rank is not None else None
    collate = task.collate(tokenizer, cfg.max_length)
    setup = build(cfg, model, held=held, collate=collate)
    frozen_changes = method.changes_base  # checkpoints then carry every weight
    start, elapsed = 0, 0.0
    if cfg.resume:
        start, elapsed = _resume(cfg, out, model, setup, frozen_changes)
        log(f"resumed from step {start}")
    trainable, total = trainable_parameters(model)
    log(f"{task.summary()}")
    log(f"{cfg.method}: trainable params {trainable:,d} of {total:,d} ({100 * trainable / total:.3f}%)")

    run = RunFolder.start(out, replace=not cfg.resume and bool(rundir.outputs(out)),
                          step=start if cfg.resume else None)
    with _reported(run):
        metrics = MetricsLog(run, keep_until=start if cfg.resume else None, tensorboard=cfg.tensorboard, log=log)
        order = BatchOrder(len(train_examples), cfg.batch_size, cfg.seed)
        trainable_params = [p for p in model.parameters() if p.requires_grad]
        step_times: list[float] = []
        last_eval: dict[str, float] = {}

        def save_checkpoint(step: int) -> None:
            state = {"optimizer": setup.optimizer.state_dict(), "scheduler": setup.scheduler.state_dict(),
                     "rng": checkpoint.rng_state(), "elapsed": elapsed}
            if setup.hook.key is not None:
                state[setup.hook.key] = setup.hook.state_dict()
            tensors = checkpoint.mutable_state(model, frozen_changes)
            bad = first_nonfinite(tensors.items())
            if bad is not None:  # keep the last good checkpoint rather than one that cannot be resumed
                raise TrainingError(f"{bad} became NaN or infinite by step {step}; {_LOWER_LR}")
            checkpoint.save(run.current, cfg, step, tensors, state)
            run.step = step
            if step < cfg.steps:  # the last step's checkpoint replaces an earlier run only with the results
                run.promote()

        model.train()
        bar = tqdm(total=cfg.steps, initial=start, disable=not cfg.progress, desc=cfg.method, dynamic_ncols=True)
        try:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                ks = range((step - 1) * cfg.grad_accum, step * cfg.grad_accum)
                batches = [collate([train_examples[i] for i in order(k)]) for k in ks]
                loss = train_step(model, batches)
                grad_norm = float("nan")
                if cfg.max_grad_norm is not None:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable_params, cfg.max_grad_norm))
                    if not math.isfinite(grad_norm):  # clipping would turn the weights into NaN
                        raise TrainingError(f"the gradient became NaN or infinite at step {step}; {_LOWER_LR}")
                lr = setup.scheduler.get_last_lr()[0]
                setup.optimizer.step()
                setup.scheduler.step()
                setup.optimizer.zero_grad(set_to_none=True)
                row: dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                       **setup.hook.after_step(step)}
                dt = time.perf_counter() - t0
                elapsed += dt
                step_times.append(dt)
                row["step_time"] = dt
                row["examples_per_s"] = cfg.batch_size * cfg.grad_accum / dt
                row.update(setup.hook.stats(step))
                if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                    last_eval = _evaluate(cfg, task, model, tokenizer)
                    row.update(last_eval)
                    row.update(tracker.measure(model))
                    model.train()
                if step % cfg.log_every == 0 or len(row) > 6:
                    metrics.write(row)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{row['examples_per_s']:.1f}")
                bar.update(1)
                if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                    save_checkpoint(step)
        finally:
            bar.close()
            metrics.close()

        if start == cfg.steps:  # nothing left to run: evaluate the resumed weights for the report
            last_eval = _evaluate(cfg, task, model, tokenizer)
        rank = tracker.measure(model)
        results = _save_result(cfg, run, model, tokenizer, pretrained)
        losses = [r["loss"] for r in metrics.rows if "loss" in r]
        timed = step_times[2:] if len(step_times) > 4 else step_times
        summary = {
            "method": cfg.method, "model": cfg.model, "task": task.name, "steps": cfg.steps, "seed": cfg.seed,
            "metric": task.metric, "eval": last_eval.get(f"eval/{task.metric}", math.nan),
            "label_names": task.label_names, "data": task.data,
            "final_train_loss": statistics.fmean(losses[-10:]) if losses else math.nan,
            "wall_time_s": elapsed, "median_step_s": statistics.median(timed) if timed else math.nan,
            "peak_rss_mib": _peak_rss_mib(),
            "trainable_params": trainable, "total_params": total, **rank, "saved": results, "config": cfg.to_dict(),
        }
        text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(run.current / SUMMARY, lambda tmp: Path(tmp).write_text(text))
        run.promote()
        log(f"{cfg.method}: {task.metric} {summary['eval']:.4f}, final train loss {summary['final_train_loss']:.4f}, "
            f"{elapsed:.1f} s; results in {out}")
        return RunResult(out, summary)


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


def _resume(cfg: TrainConfig, out: Path, model: nn.Module, setup: Setup, frozen_changes: bool) -> tuple[int, float]:
    """Load the checkpoint into the model, optimiser, schedules and random generators: (step, elapsed seconds)."""
    ckpt = checkpoint.load(out, cfg)
    state = model.state_dict()
    unexpected = set(ckpt.model) - set(state)
    if unexpected:
        raise checkpoint.CheckpointError(f"the checkpoint has weights this model lacks: {sorted(unexpected)[0]!r}.")
    missing = set(checkpoint.mutable_state(model, frozen_changes)) - set(ckpt.model)
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
