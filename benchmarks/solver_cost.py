"""Cost of the ScaLoRA solver (scalora.solver.solve_scales) against the dense product it avoids.

For square layers (in = out = d) and ranks r, times, as medians over --repeats runs after --warmup runs:

  * solve_scales on one layer (n = 1);
  * a Python loop of n separate one-layer calls, and one batched call on n layers (n = --batch, default 12),
    to show what batching over layers of one shape buys;
  * one dense B @ A product of the same shape (out × in): what the solver never forms.

Both wall time and process CPU time are recorded; with --threads 1 (the default) the CPU time is the cost of the call
itself even on a machine shared with other jobs, and the table's ratios use it.

The gradients are those of a bilinear loss ⟨G, s·B·A⟩ with a low-rank G, built from G's factors (so no out × in
matrix is formed here either). Writes JSON (environment + results) to --out, the same table as Markdown next to it
(same name, .md), and prints the table.

    python benchmarks/solver_cost.py                      # full grid, writes benchmarks/results/solver_cost.json
    python benchmarks/solver_cost.py --dims 384 --ranks 4 --repeats 3 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scalora.solver import COLUMN, IDENTITY, SCALAR, solve_scales

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "solver_cost.json"


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, float]:
    """Median wall time and median process CPU time of fn(), in milliseconds.

    With one torch thread the CPU time is the cost of the call itself, unaffected by other processes competing for
    the cores; the wall time is what a user waits on an otherwise idle machine.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _layers(n: int, d: int, r: int, s: float, rank_g: int, dtype: torch.dtype, gen: torch.Generator):
    """A (n, r, d), B (n, d, r) and the exact gradients of ℓ = ⟨G, s·B·A⟩ for G = U Vᵀ of rank rank_g."""
    A = (torch.rand(n, r, d, generator=gen) * 2 - 1) / d**0.5  # PEFT's Kaiming-uniform(a=√5) bound is 1/√in
    B = 0.01 * torch.randn(n, d, r, generator=gen)  # a trained, still small lora_B
    U = torch.randn(n, d, rank_g, generator=gen) / d**0.5
    V = torch.randn(n, d, rank_g, generator=gen) / d**0.5
    grad_B = s * U @ (V.mT @ A.mT)  # s G Aᵀ
    grad_A = s * (B.mT @ U) @ V.mT  # s Bᵀ G
    return tuple(t.to(dtype).contiguous() for t in (A, B, grad_A, grad_B))


def _markdown_table(result: dict) -> str:
    n = result["config"]["batch"]
    lines = [
        f"| d | r | solve n=1 | loop {n}×1 | batched n={n} | per layer | batching gain | dense B@A | solve / B@A "
        "| wall solve n=1 | wall B@A |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["results"]:
        cpu, wall = row["cpu_ms"], row["wall_ms"]
        lines.append(
            f"| {row['d']} | {row['r']} | {cpu['solve_n1']:.3f} | {cpu['loop_n']:.3f} | {cpu['batched_n']:.3f} "
            f"| {row['cpu_batched_per_layer_ms']:.3f} | {row['cpu_batching_speedup']:.2f}× | {cpu['dense_BA']:.3f} "
            f"| {row['cpu_solve_n1_over_dense']:.3f} | {wall['solve_n1']:.3f} | {wall['dense_BA']:.3f} |"
        )
    return "\n".join(lines)


def _markdown(result: dict, json_name: str) -> str:
    env, cfg = result["environment"], result["config"]
    load = env["load_average_before"]
    return "\n".join(
        [
            "# ScaLoRA solver cost",
            "",
            f"Written by `benchmarks/solver_cost.py` together with `{json_name}` (same numbers, more fields).",
            "",
            f"`solve_scales` on square layers (in = out = d), float32 inputs, {cfg['batch']} layers per batched call,"
            f" median of {cfg['repeats']} runs after {cfg['warmup']} warm-up runs. Times in milliseconds of process CPU"
            " time (one torch thread), except the two *wall* columns. *loop* = the layers solved one call each;"
            " *batching gain* = loop / batched; *solve / B@A* = one-layer solve over one dense `B @ A` of the same"
            " shape (the out × in product the solver never forms).",
            "",
            _markdown_table(result),
            "",
            f"Environment: torch {env['torch']}, Python {env['python']}, {env['processor']}, {env['cpu_count']} CPUs,"
            f" {env['torch_threads']} torch thread(s), load average {load[0]:.1f} when the run started"
            f" ({env['date']}). Gradients: {cfg['gradients']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[384, 576, 1536, 4096], help="in = out = d")
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 64])
    p.add_argument("--batch", type=int, default=12, help="layers per batched call (default 12)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per measurement; the median is kept")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each measurement")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="input dtype")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0 = leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT.name})")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    s, c, n = 2.0, 1.0, args.batch
    gen = torch.Generator().manual_seed(args.seed)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = []
    for d in args.dims:
        for r in args.ranks:
            A, B, gA, gB = _layers(n, d, r, s, rank_g=min(4 * r, d), dtype=dtype, gen=gen)
            one = (A[:1], B[:1], gA[:1], gB[:1])
            t_one = _median_ms(lambda one=one: solve_scales(*one, s, c), args.repeats, args.warmup)
            t_loop = _median_ms(
                lambda A=A, B=B, gA=gA, gB=gB: [solve_scales(A[k], B[k], gA[k], gB[k], s, c) for k in range(n)],
                args.repeats,
                args.warmup,
            )
            t_batch = _median_ms(
                lambda A=A, B=B, gA=gA, gB=gB: solve_scales(A, B, gA, gB, s, c), args.repeats, args.warmup
            )
            A0, B0 = A[0], B[0]
            t_dense = _median_ms(lambda A0=A0, B0=B0: B0 @ A0, args.repeats, args.warmup)
            kind = solve_scales(A, B, gA, gB, s, c).kind
            rows.append(
                {
                    "d": d,
                    "r": r,
                    "n": n,
                    "wall_ms": {
                        "solve_n1": round(t_one[0], 4),
                        "loop_n": round(t_loop[0], 4),
                        "batched_n": round(t_batch[0], 4),
                        "dense_BA": round(t_dense[0], 4),
                    },
                    "cpu_ms": {
                        "solve_n1": round(t_one[1], 4),
                        "loop_n": round(t_loop[1], 4),
                        "batched_n": round(t_batch[1], 4),
                        "dense_BA": round(t_dense[1], 4),
                    },
                    "cpu_batched_per_layer_ms": round(t_batch[1] / n, 4),
                    "cpu_batching_speedup": round(t_loop[1] / t_batch[1], 3),
                    "cpu_solve_n1_over_dense": round(t_one[1] / t_dense[1], 4),
                    "dense_BA_bytes": d * d * A.element_size(),
                    "kinds": {
                        "column": int((kind == COLUMN).sum()),
                        "scalar": int((kind == SCALAR).sum()),
                        "identity": int((kind == IDENTITY).sum()),
                    },
                }
            )
            print(f"d={d:5d} r={r:3d} done", flush=True)

    result = {
        "benchmark": "solver_cost",
        "description": (
            "median wall and process-CPU time of scalora.solver.solve_scales (n = 1, a loop of n one-layer calls, "
            "one batched call on n layers) vs one dense B @ A of the same shape"
        ),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "device": "cpu",
            "load_average_before": load_before,
            "load_average_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        },
        "config": {
            "dims": args.dims,
            "ranks": args.ranks,
            "batch": n,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "input_dtype": args.dtype,
            "compute_dtype": "float32",
            "scaling": s,
            "c": c,
            "gradients": "exact gradients of <G, s*B*A> with G = U V^T of rank min(4r, d)",
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    md = args.out.with_suffix(".md")
    md.write_text(_markdown(result, args.out.name))
    print(_markdown_table(result))
    print(f"wrote {args.out} and {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
