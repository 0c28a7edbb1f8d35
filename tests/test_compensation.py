"""The fold compensation's number formats (`scalora.compensation`), checked against exact arithmetic."""

from __future__ import annotations

import pytest
import torch

from scalora import ConfigError, LoraConfig, ScaLoRA, apply_lora
from scalora.compensation import INT8_UNITS, compensation_residual, compensation_value, spacing


@pytest.mark.parametrize("dtype, bits", [(torch.bfloat16, 7), (torch.float16, 10)])
def test_spacing_is_one_unit_in_the_last_place(dtype, bits) -> None:
    w = torch.tensor([1.0, -1.0, 1.5, -3.0, 0.0], dtype=dtype)
    expected = torch.tensor([2.0**-bits, 2.0**-bits, 2.0**-bits, 2.0 ** (1 - bits), 0.0])
    expected[-1] = float(torch.nextafter(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)))  # subnormal
    assert torch.equal(spacing(w), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_residual_keeps_what_rounding_lost_to_half_a_unit(dtype) -> None:
    """Rounded to nearest, the int8 residual restores exact − round(exact) to within half of 1/254 of a spacing,
    every code fits int8 (|code| ≤ 127, also at a power of two); the full buffer keeps it rounded once to the
    dtype."""
    g = torch.Generator().manual_seed(0)
    exact = torch.cat([torch.randn(4096, generator=g, dtype=torch.float64),
                       torch.tensor([1.0 - 2.0**-12, 2.0 + 2.0**-9, -0.0])]).float()
    rounded = exact.to(dtype)
    code = compensation_residual(exact, rounded, torch.int8)
    assert code.dtype == torch.int8 and int(code.abs().max()) <= INT8_UNITS // 2
    restored = rounded.float() + compensation_value(code, rounded, torch.float32)
    unit = spacing(rounded) / INT8_UNITS
    assert bool(((restored - exact).abs() <= 0.5 * unit * (1 + 1e-3) + 1e-12).all())
    assert float((restored - exact).abs().max()) < float((rounded.float() - exact).abs().max()) / 50
    full = compensation_residual(exact, rounded, dtype)
    assert full.dtype == dtype
    error = (rounded.float() + compensation_value(full, rounded, torch.float32) - exact).abs()
    assert bool((error <= 0.5 * spacing(full) * (1 + 1e-3)).all())  # the residual rounded once, in the dtype


def test_int8_residual_rounds_stochastically_without_bias() -> None:
    """With random numbers the int8 code is one of the two neighbouring units, the far one with probability equal to
    the fraction: averaged over many draws it restores the residual; different draws differ."""
    exact = torch.full((20000,), 1.0 + 0.3 * 2.0**-7 + 0.25 * 2.0**-7 / INT8_UNITS)  # 0.3 spacing + ¼ unit
    rounded = exact.to(torch.bfloat16)
    code = compensation_residual(exact, rounded, torch.int8, torch.Generator().manual_seed(0))
    nearest = compensation_residual(exact, rounded, torch.int8)
    assert set(code.unique().tolist()) == {int(nearest[0]), int(nearest[0]) + 1}
    residual = (exact - rounded.float())[0] * INT8_UNITS / spacing(rounded)[0]
    assert float(code.float().mean()) == pytest.approx(float(residual), abs=0.02)
    again = compensation_residual(exact, rounded, torch.int8, torch.Generator().manual_seed(1))
    assert not torch.equal(code, again)


def test_non_finite_residual_keeps_zero() -> None:
    exact = torch.tensor([float("inf"), float("nan"), 1e39])
    kept = compensation_residual(exact, exact.to(torch.float16), torch.int8)
    assert torch.equal(kept, torch.zeros(3, dtype=torch.int8))


def test_unknown_compensation_is_refused() -> None:
    model = apply_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(ConfigError, match=r"compensate must be one of \(None, False, True, 'int8'\)"):
        ScaLoRA(model, torch.optim.AdamW(model.parameters()), compensate="kahan")
