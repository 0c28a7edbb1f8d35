"""Drift of a bf16 / fp16 base weight under many tiny ScaLoRA merges, and the memory each way of merging costs.

ScaLoRA merges a residual s·B diag(1 − α⊙β) A into the frozen weight at every step. Each residual is far below
the rounding step of a bf16 weight (2⁻⁸ relative), so naive in-place adds lose most of it. For each dtype the
script folds the same sequence of random rank-r residuals into an fp64 reference and into low-precision weights
merged six ways:

* naive: W ← round-to-nearest(W + Δ) (`fold_` without a buffer or generator);
* compensated: `fold_` with a Kahan buffer (`compensate=True`), a second weight-sized tensor in the weight's dtype;
* int8: `fold_` with an int8 Kahan buffer (`compensate="int8"`, `scalora.compensation`): the residual in 1/254ths of
  the weight's spacing, rounded stochastically, one byte per entry;
* stochastic: `fold_` with stochastic rounding (`scalora.rounding`, ScaLoRA's default), nothing kept;
* side-K: an fp32 low-rank side buffer holding the last K residuals (rank ≤ r·K, added in the forward pass), folded
  into W to nearest every K merges. Here the buffer's product is summed densely in fp32, which equals the product of
  its factors up to fp32 rounding; its extra bytes are those of the factors, (out + in)·r·K·4.

After every `--report-every` folds it reports the relative drift ‖W − W_ref‖ / ‖W_ref − W₀‖ of the weight the model
computes with (W plus a side buffer's unfolded part), next to the floor ‖round(W_ref) − W_ref‖ / ‖W_ref − W₀‖ that
any weight stored in that dtype must pay, and each method's extra bytes. Writes JSON and the same table as Markdown.

    python benchmarks/bf16_drift.py                      # 10 000 merges, 128 × 128, r = 8
    python benchmarks/bf16_drift.py --merges 500 --out /tmp/drift.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from common import save_report
from torch import nn

from scalora import LoraConfig, apply_lora

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _layer(w0: torch.Tensor, dtype: torch.dtype, r: int) -> nn.Module:
    """A LoRA layer over a copy of w0 in `dtype` (its `fold_` is the one ScaLoRA uses)."""
    size = w0.shape[0]
    model = apply_lora(nn.Sequential(nn.Linear(size, size, bias=False)), LoraConfig(r=r, target_modules=["0"]))
    with torch.no_grad():
        model[0].base_layer.weight.copy_(w0)
    model[0].base_layer.to(dtype)
    return model[0]


def run(dtype: torch.dtype, merges: int, size: int, r: int, step_scale: float, report_every: int,
        seed: int, side_every: list[int]) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(size, size, generator=g) / size**0.5
    layers = {name: _layer(w0, dtype, r) for name in ("naive", "compensated", "int8", "stochastic")}
    layers["compensated"].enable_compensation()
    layers["int8"].enable_compensation(torch.int8)
    rounding = torch.Generator().manual_seed(seed + 1)
    start = layers["naive"].base_layer.weight.detach().double()
    exact = start.clone()
    side = {k: {"weight": start.to(dtype), "pending": torch.zeros(size, size)} for k in side_every}
    element = torch.finfo(dtype).bits // 8
    # A slowly drifting direction plus noise: the residuals of consecutive steps are correlated, as in training.
    direction_b, direction_a = torch.randn(size, r, generator=g), torch.randn(r, size, generator=g)
    rows = []
    for i in range(1, merges + 1):
        B = (direction_b + torch.randn(size, r, generator=g)) * step_scale / size**0.5
        A = (direction_a + torch.randn(r, size, generator=g)) / size**0.5
        for name, layer in layers.items():
            layer.fold_(B, A, rounding if name in ("stochastic", "int8") else None)
        delta = B @ A
        exact += delta.double()
        for k, buffer in side.items():
            buffer["pending"] += delta
            if i % k == 0:
                buffer["weight"] = (buffer["weight"].float() + buffer["pending"]).to(dtype)
                buffer["pending"].zero_()
        if i % report_every == 0 or i == merges:
            moved = float((exact - start).norm())
            computed = {name: layer.base_layer.weight.double() for name, layer in layers.items()}
            computed.update({f"side-{k}": b["weight"].double() + b["pending"].double() for k, b in side.items()})
            rows.append({
                "merges": i,
                **{name: float((weight - exact).norm()) / moved for name, weight in computed.items()},
                "floor": float((exact.to(dtype).double() - exact).norm()) / moved,
                "update_norm_rel": moved / float(start.norm()),
            })
    return {"dtype": str(dtype).replace("torch.", ""), "curve": rows, "final": rows[-1],
            "extra_bytes": _extra_bytes(size, r, element, side_every), "weight_bytes": size * size * element,
            "extra_bytes_4096": _extra_bytes(4096, r, element, side_every), "weight_bytes_4096": 4096**2 * element}


def _extra_bytes(size: int, r: int, element: int, side_every: list[int]) -> dict[str, int]:
    """Bytes each method keeps beside a size × size weight of `element` bytes per entry."""
    return {"naive": 0, "compensated": size * size * element, "int8": size * size, "stochastic": 0,
            **{f"side-{k}": 2 * size * r * k * 4 for k in side_every}}


def markdown(report: dict) -> str:
    """The final drift of every method, in units of the floor too, with its extra bytes."""
    lines = ["# Folds into half-precision weights: drift and memory", "",
             f"Written by `benchmarks/bf16_drift.py` (`{report['command']}`), with `bf16_drift.json`. A "
             f"{report['args']['size']} × {report['args']['size']} weight takes {report['args']['merges']} rank-"
             f"{report['args']['r']} merges of relative size {report['args']['step_scale']}; drift is "
             "‖W − W_ref‖ / ‖W_ref − W₀‖ of the weight the model computes with; the floor is what storing the exact "
             "result in that dtype costs once. Extra bytes are per adapted weight, next to the weight's own, here and "
             "for a 4096 × 4096 weight (a 7 B Llama's attention).", "",
             "| dtype | method | drift | × floor | extra bytes | × weight bytes | × weight bytes at 4096² |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for res in report["results"]:
        final = res["final"]
        for name, extra in res["extra_bytes"].items():
            lines.append(f"| {res['dtype']} | {name} | {final[name]:.4f} | {final[name] / final['floor']:.2f} | "
                         f"{extra:,} | {extra / res['weight_bytes']:.2f} | "
                         f"{res['extra_bytes_4096'][name] / res['weight_bytes_4096']:.2f} |")
        lines.append(f"| {res['dtype']} | floor | {final['floor']:.4f} | 1.00 | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=128, help="the layer is size × size")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--step-scale", type=float, default=1e-4, help="size of one residual relative to W")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--side-every", default="10,100", help="periods K of the fp32 low-rank side buffers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bf16_drift.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    side_every = [int(k) for k in args.side_every.split(",") if k]
    results = [run(DTYPES[name], args.merges, args.size, args.r, args.step_scale, args.report_every, args.seed,
                   side_every) for name in args.dtypes.split(",")]
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
              "machine": platform.machine(), "seconds": time.perf_counter() - t0, "results": results}
    save_report(args.out, report, markdown)
    return report


if __name__ == "__main__":
    main()
