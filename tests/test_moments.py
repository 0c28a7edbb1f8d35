"""Optimisers by capability: subclasses of the supported torch optimisers work, state ScaLoRA cannot rescale exactly
(unknown keys, bitsandbytes' 8-bit and paged optimisers) is refused with the reason."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_llama, token_batch
from torch import nn

from scalora import ConfigError, LoraConfig, ScaLoRA, apply_lora, lora_factors


class LoggedAdamW(torch.optim.AdamW):
    """A subclass as users write them: same update, something extra around it."""

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        self.calls = getattr(self, "calls", 0) + 1
        return super().step(closure)


class AdamWithEma(torch.optim.AdamW):
    """A subclass that keeps per-parameter state of its own, which ScaLoRA cannot know how to rescale."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                state["ema"] = p.detach().clone() if "ema" not in state else state["ema"].lerp_(p, 0.1)
        return loss


def _model() -> nn.Module:
    return apply_lora(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).train()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for step in range(steps):
        ids = token_batch(101, batch=4, length=10, seed=step)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def test_a_subclass_of_adamw_trains_exactly_as_adamw() -> None:
    reference, model = _model(), _model()
    _train(reference, ScaLoRA(reference, torch.optim.AdamW(_trainable(reference), lr=1e-2)), 3)
    subclassed = LoggedAdamW(_trainable(model), lr=1e-2)
    _train(model, ScaLoRA(model, subclassed), 3)
    assert subclassed.calls == 3
    for (_, a), (_, b) in zip(lora_factors(reference), lora_factors(model), strict=True):
        assert torch.equal(a.base_weight_oi(), b.base_weight_oi()) and torch.equal(a.lora_A, b.lora_A)


def test_a_subclass_with_state_of_its_own_is_refused_before_anything_changes() -> None:
    model = _model()
    optimizer = ScaLoRA(model, AdamWithEma(_trainable(model), lr=1e-2))
    _train(model, optimizer, 1)  # the first rescale meets no state yet
    before = {name: (f.base_weight_oi().clone(), f.lora_A.clone()) for name, f in lora_factors(model)}
    with pytest.raises(ConfigError, match="per-parameter state 'ema'.*cannot rescale exactly"):
        _train(model, optimizer, 1)
    for name, f in lora_factors(model):
        assert torch.equal(before[name][0], f.base_weight_oi()) and torch.equal(before[name][1], f.lora_A)


class _StandIn(torch.optim.Optimizer):
    """The attributes bitsandbytes' optimisers carry (``args.optim_bits``, ``is_paged``), without its kernels."""

    def __init__(self, params: list[nn.Parameter], optim_bits: int, is_paged: bool) -> None:
        super().__init__(params, {"lr": 1e-3})
        self.args = SimpleNamespace(optim_bits=optim_bits)
        self.is_paged = is_paged


@pytest.mark.parametrize("bits,paged,reason", [
    (8, False, "8 bits, quantised block by block.*re-quantise"),
    (8, True, "8 bits, quantised block by block"),
    (32, True, "paged memory under bitsandbytes' own names"),
])
def test_bitsandbytes_style_optimisers_are_refused_with_the_reason(bits: int, paged: bool, reason: str) -> None:
    model = _model()
    with pytest.raises(ConfigError, match=rf"{reason}.*torch\.optim\.AdamW"):
        ScaLoRA(model, _StandIn(_trainable(model), bits, paged))


def test_bitsandbytes_optimisers_are_refused() -> None:
    bnb = pytest.importorskip("bitsandbytes")
    model = _model()
    for cls, reason in ((bnb.optim.AdamW8bit, "8 bits"), (bnb.optim.PagedAdamW8bit, "8 bits"),
                        (bnb.optim.PagedAdamW, "paged memory")):
        with pytest.raises(ConfigError, match=reason):
            ScaLoRA(model, cls(_trainable(model), lr=1e-3))
