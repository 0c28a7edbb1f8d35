"""ScaLoRA where users already train: transformers.Trainer and TRL's SFTTrainer (PEFT's model and scalora's),
and accelerate. A few steps of a tiny Llama on the CPU each; checkpoints resume exactly; saving never lies."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator

from scalora import ConfigError, LoraConfig, ScaLoRA, apply_lora, lora_factors, merge
from scalora.train.callbacks import find_scalora, prepare_trainer
from scalora.train.models import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
TEXTS = [f"the {w} cat sat on mat {i}" for i, w in enumerate(["red", "big", "old", "shy", "odd", "wet"] * 4)]


def llama(seed: int = 0) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(seed)
    return tiny_model("llama", hidden=32, layers=2)


def peft_llama() -> tuple[torch.nn.Module, Any]:
    model, tokenizer = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft_config()), tokenizer


def peft_config() -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], task_type="CAUSAL_LM")


def examples(tokenizer: Any) -> list[dict[str, list[int]]]:
    out = []
    for text in TEXTS:
        enc = tokenizer(text, padding="max_length", max_length=24, truncation=True)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "labels": [t if m else -100 for t, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]})
    return out


def scalora_adamw(model: torch.nn.Module) -> ScaLoRA:
    return ScaLoRA(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))


def arguments(folder: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(output_dir=str(folder), max_steps=STEPS, per_device_train_batch_size=4,
                                    logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                                    disable_tqdm=True, seed=0, learning_rate=1e-2)
    settings.update(overrides)
    return TrainingArguments(**settings)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every layer's base weight and factors (the whole trained state of the adapted layers)."""
    out = {}
    for name, layer in lora_factors(model):
        out[f"{name}.W0"] = layer.base_weight_oi().detach().clone()
        out[f"{name}.A"], out[f"{name}.B"] = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, f"largest difference {worst}"


def logits(model: torch.nn.Module, tokenizer: Any) -> torch.Tensor:
    ids = torch.tensor([examples(tokenizer)[0]["input_ids"]])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------------------------------------------------
# transformers.Trainer


@pytest.mark.parametrize("kind", ["peft", "scalora"])
def test_trainer_checkpoints_resume_exactly_and_save_model_refuses(tmp_path: Path, kind: str) -> None:
    def build() -> tuple[Trainer, Any]:
        if kind == "peft":
            model, tokenizer = peft_llama()
        else:
            model, tokenizer = llama()
            apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"]))
        model.train()
        trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=examples(tokenizer),
                          data_collator=default_data_collator)
        return prepare_trainer(trainer, scalora_adamw), tokenizer

    trainer, tokenizer = build()
    before = weights(trainer.model)
    trainer.train()
    straight = weights(trainer.model)
    assert any(not torch.equal(before[k], straight[k]) for k in before if k.endswith(".W0"))  # ScaLoRA merged
    assert (tmp_path / "checkpoint-2" / "optimizer.pt").is_file()

    resumed, _ = build()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == STEPS
    assert_same(weights(resumed.model), straight)

    with pytest.raises(ConfigError, match="save_pretrained refused"):
        trainer.save_model(str(tmp_path / "final"))
    with pytest.raises(ConfigError, match="save_pretrained refused"):
        trainer.save_model(_internal_call=True)  # what push_to_hub saves
    trained = logits(trainer.model, tokenizer)
    plain = trainer.model.merge_and_unload() if kind == "peft" else merge(trainer.model)
    plain.save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(loaded, tokenizer) - trained).abs().max() <= 1e-5


def test_trainer_without_prepare_refuses_its_first_checkpoint(tmp_path: Path) -> None:
    model, tokenizer = llama()
    apply_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    trainer = Trainer(model=model.train(), args=arguments(tmp_path, max_steps=2), train_dataset=examples(tokenizer),
                      data_collator=default_data_collator, optimizers=(scalora_adamw(model), None))
    with pytest.raises(ConfigError, match=r"prepare_trainer\(trainer\)"):
        trainer.train()


def test_prepare_trainer_refusals(tmp_path: Path) -> None:
    model, tokenizer = peft_llama()
    optimizer = scalora_adamw(model)
    best = Trainer(model=model, args=arguments(tmp_path, load_best_model_at_end=True, eval_strategy="steps",
                                               eval_steps=2),
                   train_dataset=examples(tokenizer), eval_dataset=examples(tokenizer)[:4],
                   data_collator=default_data_collator, optimizers=(optimizer, None))
    with pytest.raises(ConfigError, match="load_best_model_at_end"):
        prepare_trainer(best)
    with pytest.raises(ConfigError, match="either that or make_optimizer"):
        prepare_trainer(best, scalora_adamw)


# ---------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer with peft_config=


def test_sft_trainer_with_peft_config(tmp_path: Path) -> None:
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    def build() -> trl.SFTTrainer:
        model, tokenizer = llama()
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="steps", save_steps=2,
                             disable_tqdm=True, seed=0, learning_rate=1e-2, max_length=24)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": TEXTS}),
                                 processing_class=tokenizer, peft_config=peft_config())
        return prepare_trainer(trainer, scalora_adamw)

    trainer = build()
    assert isinstance(trainer.model, peft.PeftModel)
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    assert find_scalora(trainer.optimizer).num_steps == STEPS
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".W0"))
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    with pytest.raises(ConfigError, match=r"merge_and_unload\(\)\.save_pretrained"):
        trainer.save_model()

    resumed = build()
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert_same(weights(resumed.model), after)


# ---------------------------------------------------------------------------------------------------------
# accelerate


def accelerate_run(model: torch.nn.Module, data: list[dict], steps: range, state: Path | None = None,
                   save: Path | None = None) -> dict[str, torch.Tensor]:
    """Train `model` with ScaLoRA through ``Accelerator.prepare`` on batches `steps` of `data`."""
    AcceleratorState._reset_state(True)  # a Trainer earlier in the process (TRL's: bf16) left its settings
    accelerator = Accelerator(cpu=True)
    optimizer = scalora_adamw(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if state is not None:
        accelerator.load_state(str(state))
    model.train()
    for step in steps:
        batch = default_data_collator(data[4 * step: 4 * step + 4])
        accelerator.backward(model(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    if save is not None:
        accelerator.save_state(str(save))
    return weights(model)


def test_accelerate_prepare_matches_a_plain_loop_and_resumes(tmp_path: Path) -> None:
    model, tokenizer = peft_llama()
    data = examples(tokenizer)
    plain_optimizer = scalora_adamw(model)
    model.train()
    for step in range(STEPS):
        model(**default_data_collator(data[4 * step: 4 * step + 4])).loss.backward()
        plain_optimizer.step()
        plain_optimizer.zero_grad()
    plain = weights(model)

    assert_same(accelerate_run(peft_llama()[0], data, range(STEPS)), plain)
    accelerate_run(peft_llama()[0], data, range(2), save=tmp_path / "state")
    assert_same(accelerate_run(peft_llama()[0], data, range(2, STEPS), state=tmp_path / "state"), plain)
