"""The ScaLoRA optimiser: function preservation, exact moment transfer, LoRA equivalence, rank growth, resume."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from tiny import tiny_gpt2, tiny_llama, token_batch, train_steps
from torch import nn

from scalora import ConfigError, LoraConfig, apply_lora, lora_layers
from scalora.optim import ScaLoRA
from scalora.rank import effective_rank, export_lora, snapshot_base_weights, update_ranks
from scalora.solver import solve_scales


def _lora_llama(r: int = 4, seed: int = 0, **kwargs) -> nn.Module:
    model = apply_lora(tiny_llama(seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", **kwargs))
    return model.train()


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> list[float]:
    return train_steps(model, opt, lambda i: token_batch(101, batch=4, length=12, seed=seed + i), steps)


def test_outputs_unchanged_by_rescaling() -> None:
    model = _lora_llama()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), interval=1000)
    _train(model, opt, 5)
    ids = token_batch(101, seed=99)
    model(ids, labels=ids).loss.backward()
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        factors = [(layer.lora_A.clone(), layer.lora_B.clone()) for _, layer in lora_layers(model)]
        stats = opt.rescale()
        after = model(ids).logits
    assert stats.layers == 14 and stats.identity == 0.0
    changed = sum(not torch.equal(a, layer.lora_A) for (a, _), (_, layer) in zip(factors, lora_layers(model),
                                                                                 strict=True))
    assert changed == 14, "every layer's factors must really have been rescaled"
    assert (after - before).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
        lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
        lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
    ],
    ids=["adamw", "adam-amsgrad", "sgd-momentum"],
)
def test_moment_transfer_is_exact(make_opt) -> None:
    """After rescaling, the next update equals the one of an optimiser that saw the rescaled parameters and the
    transformed gradients all along."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 3))
    model = apply_lora(base, LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    layer = model[0]
    opt = ScaLoRA(model, make_opt([layer.lora_A, layer.lora_B]), interval=1000, rule="paper")
    history = []
    for step in range(4):
        x = torch.randn(16, 10, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        history.append((layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        if step < 3:
            opt.step()
            opt.zero_grad()
    scales = solve_scales(layer.lora_A, layer.lora_B, layer.lora_A.grad, layer.lora_B.grad, layer.scaling, opt.c)
    scale_B, scale_A = scales.scale_B.float(), scales.scale_A.float()
    assert not torch.allclose(scale_B, torch.ones_like(scale_B))
    opt.rescale()
    start = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    opt.optimizer.step()
    update = (layer.lora_A.detach() - start[0], layer.lora_B.detach() - start[1])

    A2, B2 = nn.Parameter(start[0].clone()), nn.Parameter(start[1].clone())
    opt2 = make_opt([A2, B2])
    for g_a, g_b in history:
        with torch.no_grad():
            A2.copy_(start[0])
            B2.copy_(start[1])
        A2.grad, B2.grad = g_a * scale_B[:, None], g_b * scale_A  # ∂ℓ/∂Ã = diag(α) g_A, ∂ℓ/∂B̃ = g_B diag(β)
        opt2.step()
    torch.testing.assert_close(A2.detach() - start[0], update[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(B2.detach() - start[1], update[1], rtol=1e-4, atol=1e-7)


def test_without_rescaling_it_is_plain_lora_bit_for_bit() -> None:
    lora, ours = _lora_llama(), _lora_llama()
    ours.load_state_dict(lora.state_dict())
    _train(lora, torch.optim.AdamW(lora.parameters(), lr=1e-2), 6)
    _train(ours, ScaLoRA(ours, torch.optim.AdamW(ours.parameters(), lr=1e-2), interval=7), 6)
    for (name, a), b in zip(lora.state_dict().items(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_accumulated_update_grows_beyond_r() -> None:
    r = 2
    results = {}
    for method in ("lora", "scalora"):
        model = _lora_llama(r=r, seed=1)
        pretrained = snapshot_base_weights(model)
        inner = torch.optim.AdamW(model.parameters(), lr=5e-3)
        opt = inner if method == "lora" else ScaLoRA(model, inner, interval=1)
        losses = _train(model, opt, 150)
        ranks = update_ranks(model, pretrained)
        results[method] = (min(info.rank for info in ranks.values()), losses[-1])
        if method == "lora":
            assert max(info.rank for info in ranks.values()) <= r
    assert results["scalora"][0] >= 4 * r, results  # every layer's update is well above rank r


def test_state_dict_resume_is_identical(tmp_path) -> None:
    def make():
        model = _lora_llama(seed=2)
        return model, ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), interval=2)

    ref_model, ref_opt = make()
    _train(ref_model, ref_opt, 8)

    model, opt = make()
    _train(model, opt, 3)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    model2, opt2 = make()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.num_steps == 3
    _train(model2, opt2, 5, seed=3)
    for (name, a), b in zip(ref_model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_lr_scheduler_and_grad_scaler() -> None:
    model = _lora_llama()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=4)
    reference = copy.deepcopy(model)
    ref_opt = ScaLoRA(reference, torch.optim.AdamW(reference.parameters(), lr=1e-2))
    ref_sched = torch.optim.lr_scheduler.LinearLR(ref_opt, start_factor=1.0, end_factor=0.5, total_iters=4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i in range(4):
        ids = token_batch(101, seed=i)
        scaler.scale(model(ids, labels=ids).loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        sched.step()
        reference(ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        ref_sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["lr"] < 1e-2
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_non_finite_gradients_never_reach_the_base() -> None:
    model = _lora_llama()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    _train(model, opt, 2)
    ids = token_batch(101)
    model(ids, labels=ids).loss.backward()
    name, layer = next(iter(lora_layers(model)))
    layer.lora_B.grad[0, 0] = float("nan")
    base_before = layer.base_layer.weight.detach().clone()
    identities_before = opt.identity_total  # the auto rule keeps step 1 (B = 0) as the identity
    stats = opt.rescale()
    assert torch.equal(layer.base_layer.weight, base_before), name
    assert stats.identity == pytest.approx(1 / 14) and opt.identity_total == identities_before + 1
    for _, other in list(lora_layers(model))[1:]:
        assert torch.isfinite(other.base_layer.weight).all()


def test_gradient_accumulation_counts_optimiser_steps() -> None:
    model = _lora_llama()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), interval=2)
    for step in range(3):
        for micro in range(2):
            ids = token_batch(101, seed=10 * step + micro)
            (model(ids, labels=ids).loss / 2).backward()
        opt.step()
        opt.zero_grad()
    assert opt.num_steps == 3 and opt.last_stats.step == 2


def test_bad_arguments() -> None:
    model = _lora_llama()
    adamw = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="interval must be a positive integer"):
        ScaLoRA(model, adamw, interval=0)
    with pytest.raises(ConfigError, match="c must be a positive number"):
        ScaLoRA(model, adamw, c=-1.0)
    with pytest.raises(ConfigError, match="mode must be one of"):
        ScaLoRA(model, adamw, mode="row")
    with pytest.raises(ConfigError, match="no LoRA layers"):
        ScaLoRA(tiny_llama(), torch.optim.AdamW(tiny_llama().parameters()))
    with pytest.raises(ConfigError, match="does not update the LoRA factors"):
        ScaLoRA(model, torch.optim.AdamW([next(p for n, p in model.named_parameters() if "lora_A" in n)]))
    alpha = apply_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], alpha_vector=True))
    with pytest.raises(ConfigError, match="cannot be combined"):
        ScaLoRA(alpha, torch.optim.AdamW(alpha.parameters()))
    from transformers.optimization import Adafactor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adafactor = Adafactor(model.parameters(), lr=1e-3, relative_step=False)
    with pytest.raises(ConfigError, match="Adafactor keeps optimiser state that cannot be rescaled exactly"):
        ScaLoRA(model, adafactor)


@pytest.mark.parametrize("compensate", [True, "int8", None], ids=["compensated", "int8", "stochastic-default"])
def test_bf16_folds_add_up(compensate) -> None:
    """Many folds far below a bf16 weight's rounding step: the naive sum stalls; the compensated ones (a bf16 or an
    int8 buffer) track the exact sum to within the rounding of the result itself; the default, stochastic rounding,
    keeps no buffer and loses nothing on average (its error is random, a fraction of the naive loss)."""
    torch.manual_seed(0)
    weight = torch.randn(64, 64)
    model = apply_lora(nn.Sequential(nn.Linear(64, 64, bias=False)).to(torch.bfloat16),
                       LoraConfig(r=4, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
    w0 = layer.base_layer.weight.detach().double()
    ScaLoRA(model, torch.optim.AdamW(model.parameters()), compensate=compensate)
    assert (layer.base_compensation is not None) == bool(compensate)
    if compensate:
        assert layer.base_compensation.dtype == (torch.int8 if compensate == "int8" else torch.bfloat16)
    g, rounding = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    B0, A0 = torch.randn(64, 4, generator=g), torch.randn(4, 64, generator=g)
    naive, exact = layer.base_layer.weight.detach().clone(), w0.clone()
    steps = 2000
    for _ in range(steps):
        B = (B0 + 0.5 * torch.randn(64, 4, generator=g)) / steps
        layer.fold_(B, A0, None if compensate is True else rounding)
        exact += B.double() @ A0.double()
        naive = (naive.float() + B @ A0).to(torch.bfloat16)
    scale = (exact - w0).norm()
    floor = (exact.to(torch.bfloat16).double() - exact).norm() / scale  # rounding the exact result once
    err = (layer.base_layer.weight.double() - exact).norm() / scale
    err_naive = (naive.double() - exact).norm() / scale
    if compensate:
        assert err <= 1.5 * floor + 1e-3, (err, floor)
        assert err_naive > 10 * err, (err_naive, err)
    else:
        moved, update = layer.base_layer.weight.double() - w0, exact - w0
        assert (moved * update).sum() / update.square().sum() == pytest.approx(1.0, abs=0.01), "unbiased"
        assert err_naive > 10 * err, (err_naive, err)


def test_effective_rank_of_known_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    low = torch.randn(30, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    info = effective_rank(low)
    assert info.rank == 5 and 1.0 < info.entropy_rank <= 5.0
    assert effective_rank(torch.eye(8)).rank == 8 and effective_rank(torch.eye(8)).entropy_rank == pytest.approx(8)
    assert effective_rank(torch.zeros(4, 4)).rank == 0


def test_export_lora_loads_in_peft(tmp_path) -> None:
    from peft import PeftModel

    model = apply_lora(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn", "c_fc"]))
    pretrained = snapshot_base_weights(model)
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2))
    for i in range(30):
        ids = token_batch(97, seed=i)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ranks = update_ranks(model, pretrained)
    full_rank = max(info.rank for info in ranks.values())
    assert full_rank > 2
    report = export_lora(model, pretrained, rank=full_rank + 4, folder=tmp_path / "hi")
    assert report.max_residual < 1e-3
    low = export_lora(model, pretrained, rank=1, folder=tmp_path / "lo")
    assert 0 < low.max_residual < 1
    ids = token_batch(97, seed=123)
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(ids).logits
        peft_model = PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "hi").eval()
        assert (peft_model(ids).logits - expected).abs().max() < 1e-3


def test_half_precision_folds_work_in_row_chunks(monkeypatch) -> None:
    """Folds into a bf16 weight in chunks of a few rows write exactly what one whole-matrix fold writes (Kahan in
    bf16 or int8, and to nearest), and the chunks respect FOLD_CHUNK_BYTES."""
    from scalora import layers

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(48, 4, generator=g) * 1e-3, torch.randn(4, 40, generator=g)

    def folded(chunk_bytes: int, compensate: torch.dtype | bool) -> torch.Tensor:
        monkeypatch.setattr(layers, "FOLD_CHUNK_BYTES", chunk_bytes)
        model = apply_lora(nn.Sequential(nn.Linear(40, 48, bias=False)), LoraConfig(r=4, target_modules=["0"]))
        layer = model[0]
        with torch.no_grad():
            layer.base_layer.weight.copy_(torch.randn(48, 40, generator=torch.Generator().manual_seed(1)))
        layer.base_layer.to(torch.bfloat16)
        if compensate:
            layer.enable_compensation(None if compensate is True else compensate)
        for _ in range(5):
            layer.fold_(B, A)
        return torch.cat([layer.base_layer.weight.float(), layer.base_compensation.float()]) if compensate \
            else layer.base_layer.weight.float()

    assert [min(s.stop, 48) - s.start for s in layers.row_chunks(48, 40)] == [48]
    monkeypatch.setattr(layers, "FOLD_CHUNK_BYTES", 7 * 40 * 4)
    assert [min(s.stop, 48) - s.start for s in layers.row_chunks(48, 40)] == [7] * 6 + [6]
    for compensate in (True, torch.int8, False):
        assert torch.equal(folded(7 * 40 * 4, compensate), folded(2**30, compensate))


def test_stochastic_folds_are_reproducible() -> None:
    """The random numbers of a stochastic fold are seeded by step and layer: two identical bf16 runs are identical
    (a resumed run draws the same ones), and they really round stochastically (differ from compensate=False)."""
    def run(compensate: bool | None) -> list[torch.Tensor]:
        model = apply_lora(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear")).train()
        opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), compensate=compensate)
        _train(model, opt, 3)
        return [layer.base_layer.weight.detach().clone() for _, layer in lora_layers(model)]

    first, second, nearest = run(None), run(None), run(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, nearest, strict=True))


def test_a_fold_that_would_overflow_an_fp16_base_leaves_it_unchanged_and_names_the_layer() -> None:
    torch.manual_seed(0)
    model = apply_lora(nn.Sequential(nn.Linear(6, 5).half()), LoraConfig(r=2, target_modules=["0"],
                                                                         init_lora_weights=False))
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.fill_(60000.0)  # near fp16's largest value: any positive fold overflows
        layer.lora_B.fill_(1000.0)  # s·B·A = 8 000 per entry: handing it to W0 overflows
        layer.lora_A.fill_(1.0)
    opt = ScaLoRA(model, torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2), rule="paper", c=1e6)
    model(torch.full((3, 6), 1e-3, dtype=torch.float16)).float().square().mean().backward()
    before = layer.base_layer.weight.detach().clone()
    factors = (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
    stats = opt.rescale()
    assert torch.equal(layer.base_layer.weight, before)  # untouched, no inf
    assert torch.equal(layer.lora_A, factors[0]) and torch.equal(layer.lora_B, factors[1])
    with pytest.warns(RuntimeWarning, match="'0'.*overflow"):
        assert stats.refused == 1.0
    assert torch.isfinite(layer.base_layer.weight).all()


def test_a_scaling_step_that_finds_no_gradient_is_refused() -> None:
    """Under any engine: a step with no gradient in any LoRA layer (no backward, or ZeRO holding the gradients)
    would silently be plain LoRA."""
    model = _lora_llama()
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ConfigError, match=r"no LoRA layer with gradients.*loss\.backward\(\).*ZeroScaLoRA"):
        opt.step()
    with pytest.raises(ConfigError, match="cannot be DeepSpeed's client optimiser"):
        opt.param_groups = []
