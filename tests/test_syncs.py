"""A ScaLoRA scaling step makes no host–device synchronisation, and exactly one when its statistics are read.

Counted on CPU, where nothing really waits: every way Python code reads a tensor back (`item`, `tolist`, `bool`,
`int`, `float`, `index`) is patched to count, and so are `torch.tensor` / `torch.as_tensor` on Python data, which on
an accelerator would be host-to-device copies. The optimiser's own step counters are exempt: torch keeps them in
host memory (unless `capturable`), so reading them costs no synchronisation on any device.
"""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_llama, token_batch

from scalora import LoraConfig, apply_lora
from scalora.optim import ScaLoRA
from scalora.relora import ReLoRA


def _model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Tiny Llama, r = 4 on every linear layer: four shapes (q/o 32×32, k/v 16×32, gate/up 64×32, down 32×64)."""
    model = apply_lora(tiny_llama().to(dtype), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model.train()


def _backward(model: torch.nn.Module, seed: int) -> None:
    ids = token_batch(101, batch=2, length=8, seed=seed)
    model(ids, labels=ids).loss.backward()


def _warm_up(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    """Steps before counting: the first builds the per-group constants, and under c='auto' B = 0 is the identity."""
    for step in range(steps):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    _backward(model, steps)


@pytest.mark.parametrize(("rule", "dtype", "compensate"), [("optimizer", torch.float32, None),
                                                           ("paper", torch.float32, None),
                                                           ("optimizer", torch.bfloat16, None),
                                                           ("optimizer", torch.bfloat16, True),
                                                           ("optimizer", torch.bfloat16, "int8")],
                         ids=["optimizer-auto", "paper", "optimizer-bf16-stochastic", "optimizer-bf16-kahan",
                              "optimizer-bf16-int8"])
def test_scaling_step_makes_no_sync_until_stats_are_read(syncs, rule, dtype, compensate) -> None:
    log, exempt = syncs
    model = _model(dtype)
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rule=rule, compensate=compensate,
                  **({"c": 1.0} if rule == "paper" else {}))
    _warm_up(model, opt)
    exempt.update(id(state["step"]) for state in opt.state.values() if isinstance(state.get("step"), torch.Tensor))
    log.clear()
    stats = opt.rescale()
    assert log == [], f"the scaling step read tensors back: {log}"
    values = stats.as_dict()
    assert stats.column + stats.scalar + stats.identity == pytest.approx(1.0) and stats.alpha_std >= 0
    assert log == ["tolist"], f"reading the statistics should be one synchronisation, got {log}"
    assert values["scalora/layers"] == 14 and values["scalora/identity"] < 1.0  # the step did rescale layers


#: torch calls that check LAPACK / cuSOLVER error codes on the host (`infos.any().item()` inside torch), which on an
#: accelerator waits for the device; the patches above cannot see those reads
HOST_CHECKED = [(torch, "cholesky_inverse"), (torch, "cholesky_solve"), (torch, "inverse"), (torch.linalg, "eigh"),
                (torch.linalg, "svd"), (torch.linalg, "cholesky"), (torch.linalg, "inv"), (torch.linalg, "solve"),
                (torch.linalg, "pinv"), (torch.linalg, "lstsq")]


@pytest.mark.parametrize("rule", ["optimizer", "paper"])
def test_scaling_step_on_an_accelerator_uses_no_host_checked_linear_algebra(monkeypatch, rule) -> None:
    """The solver's accelerator path (forced here on CPU) must not call a factorisation whose error codes torch
    reads back: there the fallback for near-singular systems runs for every layer, so any such call would show."""
    import scalora.solver

    model = _model()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), rule=rule,
                  **({"c": 1.0} if rule == "paper" else {}))
    _warm_up(model, opt)
    called = []
    for module, name in HOST_CHECKED:
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: called.append(_name))
    monkeypatch.setattr(scalora.solver, "_on_host", lambda t: False)
    stats = opt.rescale()
    assert called == [], f"the accelerator path called {called}"
    assert stats.layers == 14 and stats.identity < 1.0


def test_relora_checks_every_fold_with_one_sync(syncs) -> None:
    log, _ = syncs
    model = _model()
    opt = ReLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), reset_every=1000)
    _warm_up(model, opt)
    log.clear()
    opt.reset()
    assert log == ["tolist"], log
