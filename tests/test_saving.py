"""Saving that never lies: adapters and save_pretrained after ScaLoRA or ReLoRA, and export_lora for PEFT's Auto
classes."""

from __future__ import annotations

import copy
import json
import pickle
import warnings
from pathlib import Path

import peft
import pytest
import torch
from tiny import tiny_bert, tiny_llama, token_batch
from torch import nn
from transformers import AutoModelForCausalLM

from scalora import ConfigError, LoraConfig, ReLoRA, ScaLoRA, apply_lora, export_lora, merge, save_adapter
from scalora.peft_config import peft_task_type
from scalora.rank import snapshot_base_weights
from scalora.wrapper import BASE_WEIGHTS

TARGETS = ["q_proj", "v_proj"]


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    model.train()
    for step in range(steps):
        ids = token_batch(101, batch=4, length=10, seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _adamw(model: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _peft_llama(model: nn.Module | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model or tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(token_batch(101, seed=42)).logits


@pytest.mark.parametrize("wrapper", [lambda m, o: ScaLoRA(m, o), lambda m, o: ReLoRA(m, o, reset_every=2)],
                         ids=["scalora", "relora"])
def test_save_adapter_refuses_after_base_weights_changed(tmp_path: Path, wrapper) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    save_adapter(model, tmp_path / "before")  # plain LoRA: the adapter is the whole update
    optimizer = wrapper(model, _adamw(model))
    save_adapter(model, tmp_path / "not-stepped")  # nothing merged yet
    _train(model, optimizer)
    with pytest.raises(ConfigError, match=r"scalora\.merge\(model\).*export_lora.*allow_changed_base=True"):
        save_adapter(model, tmp_path / "after")
    assert save_adapter(model, tmp_path / "after", allow_changed_base=True).is_dir()


def test_save_pretrained_of_an_adapted_model_is_refused_and_merge_loads_exactly(tmp_path: Path) -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    with pytest.raises(ConfigError, match=r"random weights.*scalora\.merge\(model\)\.save_pretrained.*save_adapter"):
        model.save_pretrained(tmp_path / "wrapped")
    assert not (tmp_path / "wrapped").exists()
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):  # still pickles; the guard comes along
        with pytest.raises(ConfigError, match="random weights"):
            copied.save_pretrained(tmp_path / "copied")
    _train(model, ScaLoRA(model, _adamw(model)))
    with pytest.raises(ConfigError, match="export_lora"):  # after ScaLoRA the adapter alone is no way out
        model.save_pretrained(tmp_path / "wrapped")
    trained = _logits(model)
    merge(model).save_pretrained(tmp_path / "merged")  # the plain model saves as usual
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(loaded) - trained).abs().max() <= 1e-5


def test_peft_save_pretrained_refused_only_once_scalora_changed_its_base(tmp_path: Path) -> None:
    plain_lora = _peft_llama()
    plain_lora.save_pretrained(tmp_path / "lora")  # PEFT's own LoRA saves as always
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()

    model = _peft_llama()
    _train(model, ScaLoRA(model, _adamw(model)))
    with pytest.raises(ConfigError, match=r"merge_and_unload\(\)\.save_pretrained.*export_lora"):
        model.save_pretrained(tmp_path / "scalora")
    trained = _logits(model)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_logits(loaded) - trained).abs().max() <= 1e-5


def test_optimizer_state_carries_peft_base_weights_only(tmp_path: Path) -> None:
    model = _peft_llama()
    optimizer = ScaLoRA(model, _adamw(model))
    _train(model, optimizer)
    state = optimizer.state_dict()
    assert set(state[BASE_WEIGHTS]) == {f"model.layers.{i}.self_attn.{t}" for i in range(2) for t in TARGETS}

    torch.save(state, tmp_path / "optimizer.pt")
    fresh = _peft_llama()  # what resuming a PEFT checkpoint builds: the pre-trained base and the saved adapter
    peft.set_peft_model_state_dict(fresh, peft.get_peft_model_state_dict(model))
    assert (_logits(fresh.eval()) - _logits(model)).abs().max() > 1e-3  # the adapter alone is not the trained model
    ScaLoRA(fresh, _adamw(fresh)).load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert (_logits(fresh) - _logits(model)).abs().max() == 0.0

    other = _peft_llama(tiny_llama())
    other_optimizer = ScaLoRA(other, _adamw(other))
    state[BASE_WEIGHTS].popitem()
    with pytest.raises(ConfigError, match="saved for another model"):
        other_optimizer.load_state_dict(state)

    ours = apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=TARGETS))
    assert BASE_WEIGHTS not in ScaLoRA(ours, _adamw(ours)).state_dict()  # scalora's state dict holds W0 itself


@pytest.mark.parametrize("kind", ["scalora", "peft"])
def test_export_lora_loads_with_auto_peft_model(tmp_path: Path, kind: str) -> None:
    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = apply_lora(base, LoraConfig(r=4, target_modules=TARGETS)) if kind == "scalora" else _peft_llama(base)
    snapshot = snapshot_base_weights(model)
    _train(model, ScaLoRA(model, _adamw(model)), steps=3)  # ΔW has rank ≤ 3 residuals · 4 + the last B A: 16
    report = export_lora(model, snapshot, rank=16, folder=tmp_path / "export")
    assert report.max_residual <= 1e-6
    config = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base") and config["task_type"] == "CAUSAL_LM"
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (_logits(loaded) - _logits(model)).abs().max() <= 1e-4


def test_task_types() -> None:
    assert peft_task_type(tiny_llama()) == "CAUSAL_LM"
    assert peft_task_type(_peft_llama()) == "CAUSAL_LM"
    assert peft_task_type(tiny_bert()) == "SEQ_CLS"
    assert peft_task_type(nn.Linear(2, 2)) is None
