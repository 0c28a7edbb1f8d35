"""Drift of a bf16 / fp16 base weight under many tiny ScaLoRA merges: naive rounding vs compensated folds.

ScaLoRA merges a residual s·B diag(1 − α⊙β) A into the frozen weight at every step. Each residual is far below
the rounding step of a bf16 weight (2⁻⁸ relative), so naive in-place adds lose most of it. `LoraLayer.fold_` with
a compensation buffer (Kahan summation, buffer in the weight's dtype) keeps what rounding dropped.

For each dtype the script folds the same sequence of random rank-r residuals into (a) an fp64 reference, (b) a
naive low-precision weight (W ← round(W + Δ)), (c) a compensated one (`fold_`), and reports after every
`--report-every` folds the relative drift ‖W − W_ref‖ / ‖W_ref − W₀‖, next to the floor ‖round(W_ref) − W_ref‖ /
‖W_ref − W₀‖ that any weight stored in that dtype must pay.

    python benchmarks/bf16_drift.py                      # 10 000 merges, 384 × 384, r = 8 (about a minute)
    python benchmarks/bf16_drift.py --merges 500 --out /tmp/drift.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

from scalora import LoraConfig, apply_lora

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def run(dtype: torch.dtype, merges: int, size: int, r: int, step_scale: float, report_every: int,
        seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(size, size, generator=g) / size**0.5
    model = apply_lora(nn.Sequential(nn.Linear(size, size, bias=False)), LoraConfig(r=r, target_modules=["0"]))
    layer = model[0]
    with torch.no_grad():
        layer.base_layer.weight.copy_(w0)
    layer.base_layer.to(dtype)
    layer.enable_compensation()
    start = layer.base_layer.weight.detach().double()
    naive = layer.base_layer.weight.detach().clone()
    exact = start.clone()
    # A slowly drifting direction plus noise: the residuals of consecutive steps are correlated, as in training.
    direction_b, direction_a = torch.randn(size, r, generator=g), torch.randn(r, size, generator=g)
    rows = []
    for i in range(1, merges + 1):
        B = (direction_b + torch.randn(size, r, generator=g)) * step_scale / size**0.5
        A = (direction_a + torch.randn(r, size, generator=g)) / size**0.5
        layer.fold_(B, A)
        delta = B @ A
        exact += delta.double()
        naive = (naive.float() + delta).to(dtype)
        if i % report_every == 0 or i == merges:
            moved = float((exact - start).norm())
            rows.append({
                "merges": i,
                "naive": float((naive.double() - exact).norm()) / moved,
                "compensated": float((layer.base_layer.weight.double() - exact).norm()) / moved,
                "floor": float((exact.to(dtype).double() - exact).norm()) / moved,
                "update_norm_rel": moved / float(start.norm()),
            })
    return {"dtype": str(dtype).replace("torch.", ""), "curve": rows, "final": rows[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merges", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=384, help="the layer is size × size (MiniLM's attention)")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--step-scale", type=float, default=1e-4, help="size of one residual relative to W")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--dtypes", default="bfloat16,float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bf16_drift.json")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = [run(DTYPES[name], args.merges, args.size, args.r, args.step_scale, args.report_every, args.seed)
               for name in args.dtypes.split(",")]
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
              "args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
              "machine": platform.machine(), "seconds": time.perf_counter() - t0, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("| dtype | merges | naive drift | compensated drift | floor (rounding W_ref once) |")
    print("|---|---:|---:|---:|---:|")
    for res in results:
        f = res["final"]
        print(f"| {res['dtype']} | {f['merges']} | {f['naive']:.4f} | {f['compensated']:.4f} | {f['floor']:.4f} |")
    return report


if __name__ == "__main__":
    main()
