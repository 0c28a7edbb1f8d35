"""ScaLoRA over a quantised base: the folds go to a bounded-rank side branch (`scalora.side_branch`).

The quantised layers are real ones: bitsandbytes' ``Linear4bit`` (NF4) and ``Linear8bitLt`` (int8), on its CPU
backend (a dev dependency). The recompression maths is checked against a full SVD without bitsandbytes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import scalora
from scalora import LoraConfig, apply_lora
from scalora.errors import ConfigError
from scalora.optim import ScaLoRA
from scalora.quantised import dequantise
from scalora.quantised_layer import QuantisedLinear
from scalora.rank import effective_weight
from scalora.relora import ReLoRA
from scalora.side_branch import SideBranch, compress, recompress

try:
    import bitsandbytes as bnb
except ImportError:  # the maths of the side branch is still tested
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes (a dev dependency) is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _best_rank_k(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The truncated SVD of M at rank k and the norm of what it cuts (float64, brute force)."""
    U, S, Vh = torch.linalg.svd(M.double())
    return (U[:, :k] * S[:k]) @ Vh[:k], S[k:].square().sum().sqrt()


@pytest.mark.parametrize(("out", "inp", "m", "k"), [(20, 30, 9, 4), (6, 40, 9, 4), (40, 5, 9, 3), (12, 12, 5, 8)])
def test_recompress_is_the_best_rank_k_approximation(out: int, inp: int, m: int, k: int) -> None:
    gen = torch.Generator().manual_seed(out * inp + m)
    pairs = [(torch.randn(out, m, generator=gen, dtype=torch.float64),
              torch.randn(m, inp, generator=gen, dtype=torch.float64)) for _ in range(3)]
    for (P, Q), (P2, Q2, sigma) in zip(pairs, recompress(pairs, k), strict=True):
        best, cut = _best_rank_k(P @ Q, k)
        assert P2.shape[1] == Q2.shape[0] == min(k, out, inp, m)
        torch.testing.assert_close(P2 @ Q2, best, rtol=0, atol=1e-10)
        torch.testing.assert_close(sigma[k:].square().sum().sqrt(), cut, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sigma, torch.linalg.svdvals(P @ Q)[:sigma.shape[0]], rtol=1e-10, atol=1e-10)


def test_side_branch_is_exact_under_capacity_then_keeps_the_best_rank_and_reports_the_cut() -> None:
    gen = torch.Generator().manual_seed(0)
    branch = SideBranch(24, 16, capacity=6, dtype=torch.float32, device=torch.device("cpu"))
    total = torch.zeros(24, 16, dtype=torch.float64)
    for _ in range(3):  # 3 folds of rank 2: exactly at capacity
        B, A = torch.randn(24, 2, generator=gen), torch.randn(2, 16, generator=gen)
        branch.append_(B, A)
        total += B.double() @ A.double()
    compress([branch])
    assert branch.rank == 6 and float(branch.dropped) == 0.0
    torch.testing.assert_close(branch.weight().double(), total, rtol=0, atol=1e-5)
    B, A = torch.randn(24, 2, generator=gen), torch.randn(2, 16, generator=gen)
    branch.append_(B, A)
    total += B.double() @ A.double()
    with pytest.warns(RuntimeWarning, match="side branch reached its capacity"):
        compress([branch])
    best, cut = _best_rank_k(total, 6)
    assert branch.rank == 6
    torch.testing.assert_close(branch.weight().double(), best, rtol=0, atol=1e-4)
    dropped, relative = branch.residual()
    torch.testing.assert_close(dropped, cut, rtol=1e-4, atol=0)
    torch.testing.assert_close(relative, cut / best.norm(), rtol=1e-4, atol=0)
    assert 0 < float(relative) < 1


def test_side_branch_state_dict_carries_its_rank() -> None:
    branch = SideBranch(8, 5, capacity=4, dtype=torch.float32, device=torch.device("cpu"))
    branch.append_(torch.randn(8, 3), torch.randn(3, 5))
    fresh = SideBranch(8, 5, capacity=4, dtype=torch.float32, device=torch.device("cpu"))
    fresh.load_state_dict(branch.state_dict())
    assert fresh.rank == 3
    torch.testing.assert_close(fresh.weight(), branch.weight())


# ---------------------------------------------------------------------------------------------- real quantised bases


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(32, 48)
        self.down = nn.Linear(48, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def _quantise(linear: nn.Linear, kind: str) -> nn.Module:
    """bitsandbytes' NF4 or int8 copy of `linear`, quantised on the CPU."""
    weight = linear.weight.detach().clone()
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to("cpu")


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """An MLP with both layers quantised (`kind`) and LoRA (r = 2) on them, and its float twin: plain nn.Linear
    layers holding the dequantised weights, the same adapters."""
    torch.manual_seed(0)
    quantised = MLP()
    quantised.up, quantised.down = _quantise(quantised.up, kind), _quantise(quantised.down, kind)
    twin = MLP()
    for name in ("up", "down"):
        getattr(twin, name).weight.data.copy_(dequantise(getattr(quantised, name)))
        getattr(twin, name).bias.data.copy_(getattr(quantised, name).bias)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    apply_lora(quantised, config)
    apply_lora(twin, config)
    twin.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)
    return quantised, twin


def _train(model: nn.Module, steps: int, **kwargs) -> ScaLoRA:
    opt = ScaLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), **kwargs)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=gen), torch.randn(16, 24, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return opt


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_apply_lora_detects_the_quantised_base(kind: str) -> None:
    model, _ = _pair(kind)
    assert isinstance(model.up, QuantisedLinear) and isinstance(model.down, QuantisedLinear)
    assert model.up.lora_A.dtype == torch.float32 and model.up.side_branch.capacity == 8  # 4·r


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_scalora_on_a_quantised_base_equals_the_exact_folds_under_capacity(kind: str) -> None:
    model, twin = _pair(kind)
    steps = 6  # 6 folds of rank 2 per layer, under side_rank = 16
    opt = _train(model, steps, side_rank=16)
    _train(twin, steps)
    assert opt.last_stats.side_residual == 0.0 and opt.last_stats.identity < 1.0
    for name in ("up", "down"):
        layer, reference = getattr(model, name), getattr(twin, name)
        assert layer.side_branch.rank == 2 * steps
        effective = effective_weight(layer)  # dequant(Wq) + P Q + s B A
        torch.testing.assert_close(effective, effective_weight(reference), rtol=1e-4, atol=1e-5)
        assert (effective - dequantise(layer.base_layer).double()).norm() > 1e-2  # it did train
    x = torch.randn(4, 32)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-4, atol=1e-5)


@needs_bnb
def test_the_branch_holds_the_sum_of_the_folds_exactly() -> None:
    model, _ = _pair("nf4")
    folds = torch.zeros(48, 32, dtype=torch.float64)
    record = model.up.fold_

    def recording(B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        folds.add_(B.double() @ A.double())
        record(B, A, generator)

    model.up.fold_ = recording
    _train(model, 4)
    exact = dequantise(model.up.base_layer).double() + folds + model.up.delta_weight().double()
    torch.testing.assert_close(effective_weight(model.up), exact, rtol=0, atol=1e-5)


@needs_bnb
def test_recompression_keeps_the_best_rank_and_is_reported() -> None:
    model, _ = _pair("int8")
    folds = torch.zeros(48, 32, dtype=torch.float64)
    branch = model.up.side_branch
    append = branch.append_

    def recording(B: torch.Tensor, A: torch.Tensor) -> None:
        folds.add_(B.double() @ A.double())
        append(B, A)

    branch.append_ = recording
    with pytest.warns(RuntimeWarning, match="side branch reached its capacity"):
        opt = _train(model, 5, side_rank=8)  # the fifth fold takes the branch to rank 10
    best, cut = _best_rank_k(folds, 8)
    assert branch.rank == 8
    torch.testing.assert_close(branch.weight().double(), best, rtol=0, atol=1e-5)
    dropped, relative = branch.residual()
    torch.testing.assert_close(dropped, cut, rtol=1e-3, atol=1e-7)
    assert 0 < float(relative) < 1
    largest = max(float(getattr(model, name).side_branch.residual()[1]) for name in ("up", "down"))
    assert opt.last_stats.side_residual == pytest.approx(largest)  # the largest over the layers


@needs_bnb
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_gives_a_plain_full_precision_model(kind: str) -> None:
    model, _ = _pair(kind)
    _train(model, 6, side_rank=4)
    effective = {name: effective_weight(getattr(model, name)) for name in ("up", "down")}
    x = torch.randn(4, 32)
    before = model(x)
    with pytest.raises(ConfigError, match="unload=True"):
        scalora.merge(model, unload=False)
    scalora.merge(model)
    for name in ("up", "down"):
        layer = getattr(model, name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32 and not layer.weight.requires_grad
        torch.testing.assert_close(layer.weight.double(), effective[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


@needs_bnb
def test_the_fold_path_makes_no_sync(syncs) -> None:
    log, exempt = syncs
    model, _ = _pair("nf4")
    opt = _train(model, 4, side_rank=4)  # full: the next rescale recompresses
    nn.functional.mse_loss(model(torch.randn(16, 32)), torch.randn(16, 24)).backward()
    exempt.update(id(state["step"]) for state in opt.state.values() if isinstance(state.get("step"), torch.Tensor))
    log.clear()
    with pytest.warns(RuntimeWarning, match="capacity"):
        opt.rescale()
    assert log == [], f"the scaling step read tensors back: {log}"
    assert model.up.side_branch.rank == 4


def test_unreadable_quantised_weights_are_refused() -> None:
    model = MLP()
    model.up.weight = nn.Parameter(torch.zeros(48, 32, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ConfigError, match="'up' has a quantised weight scalora cannot read"):
        apply_lora(model, LoraConfig(r=2, target_modules=["up", "down"]))


@needs_bnb
def test_side_rank_is_checked() -> None:
    model, _ = _pair("nf4")
    with pytest.raises(ConfigError, match="side_rank"):
        ScaLoRA(model, torch.optim.AdamW(model.parameters()), side_rank=0)


@needs_bnb
def test_a_run_resumes_with_its_side_branch() -> None:
    whole, _ = _pair("nf4")
    _train(whole, 6, side_rank=4)
    first, _ = _pair("nf4")
    opt = _train(first, 3, side_rank=4)
    resumed, _ = _pair("nf4")  # the same quantised weights; the adapters and branches come from the checkpoint
    saved = {k: v for k, v in first.state_dict().items() if "lora_" in k or "side_branch" in k}
    resumed.load_state_dict(saved, strict=False)
    again = ScaLoRA(resumed, torch.optim.AdamW(resumed.parameters(), lr=1e-2), side_rank=4)
    again.load_state_dict(opt.state_dict())
    assert resumed.up.side_branch.rank == first.up.side_branch.rank == 4
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 32, generator=gen), torch.randn(16, 24, generator=gen)) for _ in range(6)]
    for x, y in batches[3:]:
        nn.functional.mse_loss(resumed(x), y).backward()
        again.step()
        again.zero_grad()
    for name in ("up", "down"):
        torch.testing.assert_close(effective_weight(getattr(resumed, name)), effective_weight(getattr(whole, name)),
                                   rtol=1e-5, atol=1e-6)


@needs_bnb
def test_relora_folds_into_the_side_branch() -> None:
    model, _ = _pair("nf4")
    opt = ReLoRA(model, torch.optim.AdamW(model.parameters(), lr=1e-2), reset_every=1000)
    x = torch.randn(4, 32)
    before = model(x)
    opt.reset()
    assert model.up.side_branch.rank == 2 and int(torch.count_nonzero(model.up.lora_B)) == 0  # B = 0: restarted
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)


@needs_bnb
def test_peft_layers_over_a_quantised_base_are_refused() -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = MLP()
    model.up = _quantise(model.up, "nf4")
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["up", "down"]))
    with pytest.raises(ConfigError, match="'up' uses a bitsandbytes nf4 base weight.*scalora.apply_lora"):
        ScaLoRA(model, torch.optim.AdamW(model.parameters()))
