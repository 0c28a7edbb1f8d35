"""The method registry: every method is one complete object, and a new one needs nothing else."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny import tiny_bert

from scalora.alpha_lora import alpha_parameters
from scalora.model import lora_layers
from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA
from scalora.train import registry
from scalora.train.config import TrainConfig
from scalora.train.hooks import HeldOutAlphaStep, ScalingReport
from scalora.train.methods import adapt, build
from scalora.train.registry import METHODS


def test_every_method_is_described_for_the_command_line_and_the_plots() -> None:
    assert list(METHODS) == ["full", "lora", "rslora", "alpha-lora", "scalora", "scalora-i", "relora"]
    for name, method in METHODS.items():
        assert method.name == name and method.help and method.label and method.color
    assert len({m.label for m in METHODS.values()}) == len({m.color for m in METHODS.values()}) == len(METHODS)
    assert [m for m in METHODS if METHODS[m].result == "adapter"] == ["lora", "rslora", "alpha-lora"]


@pytest.mark.parametrize("name, wrapper, hook", [("lora", torch.optim.AdamW, None),
                                                  ("scalora-i", ScaLoRA, ScalingReport),
                                                  ("relora", ReLoRA, None)])
def test_build_follows_the_method_object(name: str, wrapper: type, hook: type | None) -> None:
    cfg = TrainConfig(method=name, r=2)
    setup = build(cfg, adapt(cfg, tiny_bert()))
    assert isinstance(setup.optimizer, wrapper)
    assert isinstance(setup.hook, hook) if hook else setup.hook.key is None and not setup.hook.stats(1)


def test_alpha_lora_holds_out_examples_for_its_step() -> None:
    cfg = TrainConfig(method="alpha-lora", r=2, alpha_holdout=4, batch_size=2)
    model = adapt(cfg, tiny_bert())
    examples = [{"i": i} for i in range(10)]
    train, held = METHODS["alpha-lora"].split(cfg, examples)
    assert train == examples[:6] and held == examples[6:]
    setup = build(cfg, model, held=held, collate=lambda rows: {})
    assert isinstance(setup.hook, HeldOutAlphaStep) and setup.hook.key == "alpha"
    stepped = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert alpha_parameters(model) and not stepped & {id(p) for p in alpha_parameters(model)}


def test_an_eighth_method_is_one_object(monkeypatch: pytest.MonkeyPatch) -> None:
    eighth = dataclasses.replace(METHODS["rslora"], name="rslora-fast", help="rsLoRA at a higher default lr",
                                 label="rsLoRA (fast)", color="tab:green", lr=1e-3)
    monkeypatch.setitem(registry.METHODS, eighth.name, eighth)
    cfg = TrainConfig(method="rslora-fast", r=2)
    assert cfg.learning_rate == 1e-3
    model = adapt(cfg, tiny_bert())
    assert all(layer.scaling == cfg.lora_alpha / 2**0.5 for _, layer in lora_layers(model))
    assert build(cfg, model).optimizer.param_groups[0]["lr"] == 1e-3
