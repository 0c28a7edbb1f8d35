"""ReLoRA restarts and α-LoRA's held-out schedule."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batch

from scalora import ConfigError, LoraConfig, apply_lora, lora_layers
from scalora.alpha_lora import AlphaScheduler, adapter_parameters, alpha_parameters
from scalora.moments import prune_moments
from scalora.rank import snapshot_base_weights, update_ranks
from scalora.relora import ReLoRA, jagged_cosine


def _step(model, opt, seed: int) -> None:
    ids = token_batch(101, batch=4, length=12, seed=seed)
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()


def test_relora_reset_preserves_function_and_restarts_factors() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear")).train()
    pretrained = snapshot_base_weights(model)
    opt = ReLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), reset_every=5)
    for i in range(4):
        _step(model, opt, i)
    ids = token_batch(101, seed=50)
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
    model.train()
    ids_t = token_batch(101, batch=4, length=12, seed=4)
    model(ids_t, labels=ids_t).loss.backward()
    opt.step()
    opt.zero_grad()
    assert opt.resets == 1
    for _, layer in lora_layers(model):
        assert torch.all(layer.lora_B == 0)
        for p in (layer.lora_A, layer.lora_B):
            state = opt.state[p]
            assert int((state["exp_avg"] == 0).sum()) >= int(0.99 * p.numel())
    model.eval()
    with torch.no_grad():
        after = model(ids).logits
    assert not torch.allclose(before, after)  # the 5th step itself changed the model
    ranks_after_one = update_ranks(model, pretrained)
    assert max(info.rank for info in ranks_after_one.values()) <= 2
    model.train()
    for i in range(5, 15):
        _step(model, opt, i)
    assert opt.resets == 3
    ranks = update_ranks(model, pretrained)
    assert all(info.rank == 3 * 2 for info in ranks.values()), ranks  # three restarts of rank 2 each
    assert max(info.frobenius for info in ranks.values()) < 50  # restarts stay stable


def test_relora_reset_alone_is_function_preserving() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).eval()
    opt = ReLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), reset_every=100)
    ids = token_batch(101)
    with torch.no_grad():
        before = model(ids).logits
        opt.reset()
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_prune_moments_keeps_largest_second_moments_with_one_mask() -> None:
    state = {"exp_avg": torch.arange(1.0, 101.0), "exp_avg_sq": torch.arange(100.0, 0.0, -1.0), "step": 3}
    prune_moments(state, 0.9)
    kept = state["exp_avg_sq"] != 0
    assert int(kept.sum()) == 10 and bool(kept[:10].all())  # the ten largest second moments
    assert torch.equal(state["exp_avg"] != 0, kept)  # and the first moments of the same entries
    assert state["step"] == 3
    sgd = {"momentum_buffer": torch.tensor([-5.0, 1.0, 0.5, 3.0])}
    prune_moments(sgd, 0.5)
    assert torch.equal(sgd["momentum_buffer"], torch.tensor([-5.0, 0.0, 0.0, 3.0]))


def test_jagged_cosine_schedule() -> None:
    kwargs = {"total_steps": 100, "warmup": 10, "reset_every": 30, "restart_warmup": 5}
    values = [jagged_cosine(s, **kwargs) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[30] < 0.3 * values[29]  # re-warm-up after the reset at step 30
    assert values[35] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 25 / 90)).item()))
    assert values[99] < 0.01


def test_relora_resume_and_bad_arguments() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="reset_every must be a positive integer"):
        ReLoRA(model, torch.optim.AdamW(model.parameters()), reset_every=0)
    opt = ReLoRA(model, torch.optim.AdamW(model.parameters()), reset_every=3)
    state = opt.state_dict()
    other = ReLoRA(model, torch.optim.AdamW(model.parameters()), reset_every=4)
    with pytest.raises(ConfigError, match="reset_every=3 but this optimiser has 4"):
        other.load_state_dict(state)


def test_alpha_schedule_steps_only_alpha_on_held_out_batches() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules="all-linear", alpha_vector=True)).train()
    alphas = alpha_parameters(model)
    assert len(alphas) == 14
    opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-2)
    assert {id(p) for p in adapter_parameters(model)}.isdisjoint({id(p) for p in alphas})
    schedule = AlphaScheduler(model, every=3)
    held_out = token_batch(101, batch=4, length=12, seed=1000)
    for step in range(1, 7):
        _step(model, opt, step)
        before_alpha = [a.detach().clone() for a in alphas]
        before_rest = [p.detach().clone() for p in adapter_parameters(model)]
        loss = schedule.step(step, lambda: model(held_out, labels=held_out).loss)
        changed = [not torch.equal(a, b) for a, b in zip(alphas, before_alpha, strict=True)]
        if step % 3 == 0:
            assert loss is not None and all(changed)
        else:
            assert loss is None and not any(changed)
        for p, b in zip(adapter_parameters(model), before_rest, strict=True):
            assert torch.equal(p, b)
    assert all(not a.requires_grad and a.grad is None for a in alphas)
    assert all(p.requires_grad for p in adapter_parameters(model))


def test_alpha_schedule_needs_alpha_vectors() -> None:
    model = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="no α vectors"):
        AlphaScheduler(model)
