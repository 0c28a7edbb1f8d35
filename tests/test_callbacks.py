"""ScaLoRA and α-LoRA under ``transformers.Trainer``: the optimiser wrapper inside accelerate's, the callbacks'
logs, gradient accumulation, and α-LoRA's schedule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from scalora import LoraConfig, apply_lora, lora_layers
from scalora.alpha_lora import AlphaScheduler, adapter_parameters, alpha_parameters
from scalora.errors import ConfigError
from scalora.optim import ScaLoRA
from scalora.rank import snapshot_base_weights, update_ranks
from scalora.train.callbacks import ALPHA_STATE, AlphaLoRACallback, ScaloraCallback, find_scalora, prepare_trainer
from scalora.train.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

R = 2
WORDS = ("good nice great", "bad awful poor", "fine happy fun", "sad dull weak")


def examples(tokenizer: Any, n: int, offset: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(offset, offset + n):
        enc = tokenizer(f"{WORDS[i % 4]} {i}", padding="max_length", max_length=16, truncation=True)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": i % 2})
    return out


def lora_model(alpha_vector: bool = False) -> tuple[torch.nn.Module, Any]:
    model, tokenizer = tiny_model("bert", num_labels=2, hidden=32, layers=2)
    config = LoraConfig(r=R, lora_alpha=4, target_modules="all-linear", modules_to_save=["classifier"],
                        alpha_vector=alpha_vector)
    apply_lora(model, config)
    model.train()
    return model, tokenizer


def arguments(tmp_path: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                    disable_tqdm=True, seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer_for(model: torch.nn.Module, tokenizer: Any, args: TrainingArguments, optimizers: tuple,
                callbacks: list[TrainerCallback]) -> Trainer:
    return Trainer(model=model, args=args, train_dataset=examples(tokenizer, 32), data_collator=default_data_collator,
                   optimizers=optimizers, callbacks=callbacks)


def training_logs(trainer: Trainer) -> list[dict[str, Any]]:
    return [row for row in trainer.state.log_history if "loss" in row and "train_runtime" not in row]


def count_calls(obj: Any, name: str) -> list[int]:
    """Wrap the bound method `name` of `obj` so that each call appends to the returned list."""
    calls: list[int] = []
    original = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    setattr(obj, name, wrapper)
    return calls


# ---------------------------------------------------------------------------------------------------------
# ScaLoRA.


def test_scalora_under_trainer_with_a_scheduler(tmp_path: Path) -> None:
    model, tokenizer = lora_model()
    base = snapshot_base_weights(model)
    optimizer = ScaLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / 6)
    callback = ScaloraCallback(base_weights=base, rank_every=3)
    trainer = trainer_for(model, tokenizer, arguments(tmp_path), (optimizer, scheduler), [callback])
    trainer.train()

    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"  # the wrapper the callback looks through
    assert find_scalora(trainer.optimizer) is optimizer and callback.scalora is optimizer
    assert optimizer.num_steps == trainer.state.global_step == 6
    logs = training_logs(trainer)
    assert [row["step"] for row in logs] == [1, 2, 3, 4, 5, 6]
    for row in logs:
        assert row["scalora/step"] == row["step"] and row["scalora/layers"] > 0
        assert {"scalora/column", "scalora/scalar", "scalora/identity", "scalora/alpha_mean"} <= set(row)
    assert [row["rank/step"] for row in logs if "rank/step" in row] == [3, 6]
    # the weights changed as ScaLoRA changes them: the base moved, and the update left rank r
    assert any(not torch.equal(layer.base_layer.weight, base[name]) for name, layer in lora_layers(model))
    ranks = update_ranks(model, base)
    assert max(info.rank for info in ranks.values()) > R
    assert logs[-1]["rank/max"] == max(info.rank for info in ranks.values())
    assert scheduler.last_epoch == 6 and optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_scalora_scales_only_on_real_optimiser_steps_with_grad_accumulation(tmp_path: Path) -> None:
    model, tokenizer = lora_model()
    optimizer = ScaLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    rescales = count_calls(optimizer, "rescale")
    inner_steps = count_calls(optimizer.optimizer, "step")
    trainer = trainer_for(model, tokenizer, arguments(tmp_path, gradient_accumulation_steps=2), (optimizer, None),
                          [ScaloraCallback()])
    trainer.train()
    assert trainer.state.global_step == 6
    assert optimizer.num_steps == 6 and len(rescales) == 6 and len(inner_steps) == 6
    assert [row["scalora/step"] for row in training_logs(trainer)] == [1, 2, 3, 4, 5, 6]


def test_scalora_callback_attach_and_errors(tmp_path: Path) -> None:
    model, tokenizer = lora_model()
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(ConfigError, match="no ScaLoRA optimiser inside AdamW"):
        ScaloraCallback(plain)
    with pytest.raises(ConfigError, match="rank_every needs base_weights"):
        ScaloraCallback(rank_every=2)
    trainer = trainer_for(model, tokenizer, arguments(tmp_path, max_steps=1), (plain, None), [])
    callback = ScaloraCallback()
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks[0] is callback
    with pytest.raises(ConfigError, match="found no ScaLoRA optimiser"):
        trainer.train()


# ---------------------------------------------------------------------------------------------------------
# α-LoRA.


class AlphaRecorder(TrainerCallback):
    """The α vectors after every optimiser step (runs after AlphaLoRACallback)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.history: list[torch.Tensor] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.history.append(self.snapshot())

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.history.append(self.snapshot())

    def snapshot(self) -> torch.Tensor:
        return torch.cat([v.detach().clone() for v in alpha_parameters(self.model)])


def test_alpha_lora_callback_steps_alpha_every_t_steps(tmp_path: Path) -> None:
    model, tokenizer = lora_model(alpha_vector=True)
    scheduler = AlphaScheduler(model, lr=5e-2, every=2)
    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    held_out = examples(tokenizer, 12, offset=100)
    callback = AlphaLoRACallback(scheduler, held_out, batch_size=8)
    recorder = AlphaRecorder(model)
    factors_before = [layer.lora_A.detach().clone() for _, layer in lora_layers(model)]
    trainer = trainer_for(model, tokenizer, arguments(tmp_path), (optimizer, None), [callback, recorder])
    trainer.train()

    history = recorder.history
    assert len(history) == 7
    changed = [step for step in range(1, 7) if not torch.equal(history[step], history[step - 1])]
    assert changed == [2, 4, 6]
    assert all(not p.requires_grad and p.grad is None for p in alpha_parameters(model))
    assert any(not torch.equal(a, layer.lora_A) for a, (_, layer) in zip(factors_before, lora_layers(model),
                                                                         strict=True))
    logs = training_logs(trainer)
    assert [row["step"] for row in logs if "alpha/heldout_loss" in row] == [2, 4, 6]
    assert all("alpha/mean" in row and "alpha/std" in row for row in logs)
    # successive held-out batches: 12 examples, 8 per batch, so the second finishes epoch 0 and starts epoch 1
    first, second = callback.batch_indices(0), callback.batch_indices(1)
    assert len(set(first)) == 8 and set(first) | set(second[:4]) == set(range(12))


def test_alpha_lora_callback_checkpoint_and_refusals(tmp_path: Path) -> None:
    model, tokenizer = lora_model(alpha_vector=True)
    scheduler = AlphaScheduler(model, lr=5e-2, every=2)
    held_out = examples(tokenizer, 8, offset=100)

    everything = torch.optim.AdamW(model.parameters(), lr=1e-2)  # includes the α vectors
    trainer = trainer_for(model, tokenizer, arguments(tmp_path / "bad", max_steps=1), (everything, None),
                          [AlphaLoRACallback(scheduler, held_out)])
    with pytest.raises(ConfigError, match="adapter_parameters"):
        trainer.train()
    with pytest.raises(ConfigError, match="empty"):
        AlphaLoRACallback(scheduler, [])

    optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    args = arguments(tmp_path / "run", max_steps=4, save_strategy="steps", save_steps=2)
    trainer = trainer_for(model, tokenizer, args, (optimizer, None), [AlphaLoRACallback(scheduler, held_out)])
    prepare_trainer(trainer).train()  # checkpoints of an adapted model
    saved = torch.load(tmp_path / "run" / "checkpoint-4" / ALPHA_STATE, weights_only=False)
    assert (tmp_path / "run" / "checkpoint-2" / ALPHA_STATE).is_file()
    assert saved["optimizer"]["state"][0]["step"] == 2  # two α steps by step 4

    # a resumed Trainer (global_step 4, read from checkpoint-4) gets the α optimiser back
    fresh_model, _ = lora_model(alpha_vector=True)
    fresh = AlphaScheduler(fresh_model, lr=5e-2, every=2)
    AlphaLoRACallback(fresh, held_out).on_train_begin(args, SimpleNamespace(global_step=4), None, optimizer=None)
    assert fresh.optimizer.state_dict()["state"][0]["step"] == 2
    assert torch.equal(fresh.optimizer.state_dict()["state"][0]["exp_avg"], saved["optimizer"]["state"][0]["exp_avg"])
