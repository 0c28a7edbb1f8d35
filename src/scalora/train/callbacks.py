"""``transformers.Trainer`` (and TRL's ``SFTTrainer``) with scalora: checkpoints of adapted models, ScaLoRA's
statistics in the logs, and α-LoRA's schedule.

`prepare_trainer` lets the Trainer write checkpoints of an adapted model, which ``save_pretrained`` otherwise
refuses (`scalora.save_guard`: their files would not load as the trained model), and builds the optimiser over a
model the trainer made itself (``SFTTrainer(peft_config=...)``).

ScaLoRA needs no callback to train: pass it as the Trainer's optimiser, ``optimizers=(ScaLoRA(model, AdamW(...)),
scheduler)``, and the Trainer steps it once per optimiser step (after gradient accumulation and clipping), so it
rescales exactly on the real steps. `ScaloraCallback` only reports what it did. α-LoRA's vectors learn on
held-out batches on a schedule of their own, for which the Trainer has no place: `AlphaLoRACallback` runs it.

Trainer appends each log to ``state.log_history`` and hands it to the reporting integrations (TensorBoard, W&B...)
before it calls the callbacks added with ``callbacks=[...]``. Both callbacks therefore also write their values into
the ``log_history`` entry of that step; to have them in the integrations too, put the callback first with
``callback.attach(trainer)`` instead of ``callbacks=[...]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments, default_data_collator

from scalora.alpha_lora import AlphaScheduler
from scalora.errors import ConfigError
from scalora.factors import lora_factors
from scalora.optim import ScaLoRA
from scalora.rank import effective_rank, rank_summary
from scalora.save_guard import checkpoint_saves
from scalora.train.order import BatchOrder
from scalora.wrapper import OptimizerWrapper

__all__ = ["AlphaLoRACallback", "ScaloraCallback", "find_scalora", "prepare_trainer"]

ALPHA_STATE = "alpha_scheduler.pt"


def find_scalora(optimizer: Any) -> ScaLoRA | None:
    """The `ScaLoRA` inside `optimizer`: wrappers such as accelerate's ``AcceleratedOptimizer`` (which Trainer puts
    around the optimiser it is given) keep the wrapped one as ``.optimizer``. None if there is none."""
    found = _find_wrapper(optimizer)
    return found if isinstance(found, ScaLoRA) else None


def _find_wrapper(optimizer: Any) -> OptimizerWrapper | None:
    """The scalora `OptimizerWrapper` (ScaLoRA, ReLoRA) inside `optimizer`, following ``.optimizer``; or None."""
    seen: set[int] = set()
    while optimizer is not None and id(optimizer) not in seen:
        if isinstance(optimizer, OptimizerWrapper):
            return optimizer
        seen.add(id(optimizer))
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def prepare_trainer(trainer: Any, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None) -> Any:
    """Ready a ``transformers.Trainer`` (or a subclass: TRL's ``SFTTrainer``) to train an adapted model; returns it.

    * ``make_optimizer(model)``, if given, builds the trainer's optimiser over ``trainer.model`` as it is now. With
      ``SFTTrainer(peft_config=...)`` that PEFT model exists only once the trainer is built::

          trainer = SFTTrainer(model=model, args=args, train_dataset=data, peft_config=peft.LoraConfig(...))
          prepare_trainer(trainer, lambda m: ScaLoRA(m, torch.optim.AdamW(m.parameters(), lr=2e-4)))

      The learning-rate schedule of ``args`` then drives it.
    * The Trainer's checkpoints are written although ``save_pretrained`` refuses adapted models: the Trainer reads
      them back into the same adapted model (``trainer.train(resume_from_checkpoint=True)``). ScaLoRA's and ReLoRA's
      changes to a PEFT model's base weights, which PEFT's adapter files lack, travel in ``optimizer.pt``.
    * ``trainer.save_model()`` called by you (or by ``push_to_hub``) stays refused where the files would not be the
      trained model; the error says what to call (``merge_and_unload().save_pretrained``, ``scalora.merge``,
      ``export_lora``).
    * ``load_best_model_at_end`` is refused for a PEFT model under ScaLoRA or ReLoRA: the Trainer would load the
      best checkpoint's adapter onto the last step's base weights.
    """
    if make_optimizer is not None:
        if trainer.optimizer is not None:
            raise ConfigError("the Trainer already has an optimiser (optimizers=...); give it either that or "
                              "make_optimizer, not both.")
        trainer.optimizer = make_optimizer(trainer.model)
    wrapper = _find_wrapper(trainer.optimizer)
    if (trainer.args.load_best_model_at_end and wrapper is not None
            and any(not layer.base_in_state_dict for _, layer in wrapper.layers)):
        raise ConfigError(f"load_best_model_at_end cannot restore the base weights {type(wrapper).__name__} changed "
                          f"(a PEFT checkpoint holds the adapter only); turn it off and keep the last model.")
    model, save_model = trainer.model, trainer.save_model

    def save_model_or_checkpoint(output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not _internal_call or output_dir is None:  # yours, or push_to_hub's of the final model: guarded
            return save_model(output_dir, _internal_call=_internal_call)
        with checkpoint_saves(model):  # the Trainer's checkpoint (it always names the folder)
            return save_model(output_dir, _internal_call=True)

    trainer.save_model = save_model_or_checkpoint
    return trainer


def _is_training_log(logs: dict[str, Any] | None) -> bool:
    """The per-step training logs (not the evaluation ones, nor the run summary at the end)."""
    return logs is not None and "loss" in logs and "train_runtime" not in logs


def _add_to_log(state: TrainerState, logs: dict[str, Any], values: dict[str, float]) -> None:
    logs.update(values)  # seen by the callbacks after this one (and the integrations, if attached first)
    last = state.log_history[-1] if state.log_history else None
    if isinstance(last, dict) and last.get("step") == state.global_step:  # Trainer stored a copy before on_log
        last.update(values)


class _Attachable(TrainerCallback):
    def attach(self, trainer: Any) -> Any:
        """Register this callback ahead of every other, so that the reporting integrations log its values too;
        returns the trainer."""
        trainer.callback_handler.callbacks.insert(0, self)
        return trainer


class ScaloraCallback(_Attachable):
    """Logs what ScaLoRA's last scaling step did (``scalora/column``, ``scalora/alpha_mean``, ... from
    `ScaLoRA.last_stats`) with each training log, and optionally the effective rank of the accumulated update.

    Args:
        optimizer: the `ScaLoRA` (or anything wrapping it); by default it is found inside the Trainer's optimiser.
        base_weights: ``scalora.rank.snapshot_base_weights(model)`` taken before training (possibly only some of
            its layers, to keep the cost down): with `rank_every`, the rank of W − W_pretrained of those layers is
            measured every `rank_every` optimiser steps and logged as ``rank/mean``, ``rank/max`` and
            ``rank/entropy_mean`` (plus ``rank/step``) with the next training log.
        rank_every: measure the rank every this many steps (0: never).
        rtol: singular values above ``rtol · σ_max`` count towards the rank.

    ::

        model = apply_lora(model, LoraConfig(r=8))
        base = snapshot_base_weights(model)
        optimizer = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=5e-4))
        trainer = prepare_trainer(Trainer(model, args, train_dataset=data, optimizers=(optimizer, None),
                                          callbacks=[ScaloraCallback(base_weights=base, rank_every=50)]))
    """

    def __init__(self, optimizer: Any = None, *, base_weights: dict[str, torch.Tensor] | None = None,
                 rank_every: int = 0, rtol: float = 1e-3) -> None:
        if isinstance(rank_every, bool) or not isinstance(rank_every, int) or rank_every < 0:
            raise ConfigError(f"rank_every must be a whole number ≥ 0, got {rank_every!r}.")
        if rank_every and not base_weights:
            raise ConfigError("rank_every needs base_weights: take scalora.rank.snapshot_base_weights(model) "
                              "before training.")
        self.scalora = find_scalora(optimizer)
        if optimizer is not None and self.scalora is None:
            raise ConfigError(f"no ScaLoRA optimiser inside {type(optimizer).__name__}.")
        self.base_weights = base_weights
        self.rank_every = rank_every
        self.rtol = rtol
        self._rank: dict[str, float] = {}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if self.scalora is None:
            self.scalora = find_scalora(optimizer)
        if self.scalora is None and not self.rank_every:
            raise ConfigError("ScaloraCallback found no ScaLoRA optimiser: pass optimizers=(ScaLoRA(model, "
                              "torch.optim.AdamW(...)), scheduler) to the Trainer.")

    def measure_rank(self, model: nn.Module) -> dict[str, float]:
        """Effective rank of the accumulated update of the layers in `base_weights`."""
        layers = dict(lora_factors(model))
        infos = []
        for name, base in (self.base_weights or {}).items():
            if name not in layers:
                raise ConfigError(f"base_weights has layer {name!r}, which the model's LoRA layers lack.")
            weight = layers[name].effective_weight()
            infos.append(effective_rank(weight - base.to(weight.device, torch.float64), self.rtol))
        return rank_summary(infos)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.rank_every and model is not None and state.global_step % self.rank_every == 0:
            self._rank = {**self.measure_rank(model), "rank/step": float(state.global_step)}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not _is_training_log(logs):
            return
        values: dict[str, float] = {}
        if self.scalora is not None and self.scalora.last_stats.step > 0:  # 0: no scaling step yet (ScaLoRA-I)
            values.update(self.scalora.last_stats.as_dict())
        values.update(self._rank)
        self._rank = {}
        _add_to_log(state, logs, values)


class AlphaLoRACallback(_Attachable):
    """α-LoRA's schedule under ``transformers.Trainer``: after every `scheduler.every`-th optimiser step, one step
    of the α vectors' own optimiser on the next batch of `held_out` (data kept out of the training set).

    The Trainer's optimiser must step the adapters only, never the α vectors: build it over
    ``scalora.alpha_lora.adapter_parameters(model)`` (the callback refuses an optimiser that holds α vectors)::

        model = apply_lora(model, LoraConfig(r=8, target_modules=["query", "value"], alpha_vector=True))
        alpha = AlphaScheduler(model, lr=5e-3, every=10)
        optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-4, betas=(0.9, 0.99))
        trainer = Trainer(model, args, train_dataset=train, data_collator=collate, optimizers=(optimizer, None),
                          callbacks=[AlphaLoRACallback(alpha, held_out, collate, batch_size=64)])
        prepare_trainer(trainer)

    Args:
        scheduler: the `AlphaScheduler` of the model (its `every` is the schedule).
        held_out: examples indexable by position (a list, a ``datasets.Dataset``); batches must produce a loss
            (carry labels).
        collate_fn: turns a list of examples into the model's keyword arguments (default:
            ``transformers.default_data_collator``).
        batch_size: held-out examples per α step (at most ``len(held_out)``).
        seed: order of the held-out batches (seeded per-epoch permutations, so a resumed run draws the same ones).

    The α optimiser's state is written as ``alpha_scheduler.pt`` into each Trainer checkpoint (checkpoints of an
    adapted model need `prepare_trainer`) and read back when the Trainer resumes from a checkpoint of
    ``args.output_dir`` (from elsewhere: call `load_checkpoint` before training). Logs ``alpha/heldout_loss`` (after
    an α step), ``alpha/mean`` and ``alpha/std``.
    """

    def __init__(self, scheduler: AlphaScheduler, held_out: Sequence[Any],
                 collate_fn: Callable[[list[Any]], dict[str, Any]] | None = None, *, batch_size: int = 64,
                 seed: int = 0) -> None:
        if not isinstance(scheduler, AlphaScheduler):
            raise ConfigError(f"scheduler must be an AlphaScheduler, got {type(scheduler).__name__}.")
        if len(held_out) == 0:
            raise ConfigError("held_out is empty: α-LoRA's vectors learn on held-out training examples.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.scheduler = scheduler
        self.held_out = held_out
        self.collate_fn = collate_fn or default_data_collator
        self._order = BatchOrder(len(held_out), min(batch_size, len(held_out)), seed)
        self.last_loss: float | None = None

    def batch_indices(self, k: int) -> list[int]:
        """Positions in `held_out` of the k-th α batch (from 0)."""
        return self._order(k)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(v) in stepped for v in self.scheduler.vectors):
                raise ConfigError("the Trainer's optimiser steps the α vectors: build it over "
                                  "scalora.alpha_lora.adapter_parameters(model).")
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and (folder / ALPHA_STATE).is_file():  # the Trainer resumed from this checkpoint
            self.load_checkpoint(folder)

    def load_checkpoint(self, folder: str | Path) -> None:
        """Restore the α optimiser's state from a Trainer checkpoint folder written with this callback."""
        self.scheduler.load_state_dict(torch.load(Path(folder) / ALPHA_STATE, weights_only=True))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        step = state.global_step
        if model is None or step % self.scheduler.every != 0:
            return
        batch = self.collate_fn([self.held_out[i] for i in self.batch_indices(step // self.scheduler.every - 1)])
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

        def held_out_loss() -> torch.Tensor:
            output = model(**batch)
            loss = output["loss"] if isinstance(output, dict) else getattr(output, "loss", None)
            if loss is None:
                raise ConfigError("the held-out batch gave no loss: its examples need labels.")
            return loss

        self.last_loss = self.scheduler.step(step, held_out_loss)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not _is_training_log(logs):
            return
        with torch.no_grad():
            alpha = torch.cat([v.detach().flatten().double().cpu() for v in self.scheduler.vectors])
        values = {"alpha/mean": float(alpha.mean()), "alpha/std": float(alpha.std(unbiased=False))}
        if self.last_loss is not None:
            values["alpha/heldout_loss"] = self.last_loss
            self.last_loss = None
        _add_to_log(state, logs, values)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            torch.save(self.scheduler.state_dict(), folder / ALPHA_STATE)
