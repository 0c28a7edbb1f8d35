"""Training step time and peak memory on MiniLM: full fine-tuning, PEFT's LoRA, scalora's LoRA and ScaLoRA.

Every method trains the same BERT encoder (all-MiniLM-L6-v2, the ``minilm`` asset) with a 2-class head on one
fixed random batch, in train mode with dropout switched off, so that all methods do identical work apart from
the adapters. Methods (AdamW, lr 1e-4):

* ``full``: every weight trainable;
* ``peft-lora``: ``peft.get_peft_model`` with LoRA (r=8, alpha=16) on every linear layer of the encoder;
* ``lora``: ``scalora.apply_lora`` with the same configuration;
* ``scalora``: the same adapters, optimiser wrapped in ``scalora.optim.ScaLoRA`` (rescaling every step);
* ``scalora-i10``: ScaLoRA rescaling every 10th step.

The classifier head is trainable in every adapter method (``modules_to_save=["classifier"]``).

A step is forward, ``loss.backward()``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``, timed with
``time.perf_counter`` (Python's garbage collector is paused while steps are timed). Each measurement runs in a
fresh child process (this script with the hidden ``--worker`` flag), so that its memory is its own; the child
reports its peak resident set size (RSS) over the training steps (the kernel's high-water mark, reset once the
model is built; where the reset is not allowed, the child's whole-life peak) and the peak of torch-allocated
bytes (tensors alive before a step plus the largest net allocation within one extra, profiled step; torch keeps
no allocator statistics on the CPU, so this is read from the profiler's allocation events).

The whole side-by-side comparison is repeated ``--repeats`` times; in each round every method runs once, the
order rotated from round to round, so slow drift of the machine affects all methods alike. Per method the table
gives the median step time over all measured steps of all rounds, with its 10th and 90th percentiles. Each ratio
is computed within a round (the two methods measured side by side) and the median over rounds is reported.
``scalora-i10`` is compared by mean step time, since the median would leave out the one step in ten that
rescales; ``--steps`` should be a multiple of 10 so every round holds the same number of rescaling steps.

Run ``python benchmarks/step_time.py --help``. The MiniLM asset must be present: ``scalora assets fetch minilm``
(or pass ``--fetch``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

METHODS = ("full", "peft-lora", "lora", "scalora", "scalora-i10")
TARGET_MODULES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
MODULES_TO_SAVE = ["classifier"]
LORA_ALPHA = 16
LR = 1e-4
INTERVALS = {"scalora": 1, "scalora-i10": 10}
DEFAULT_OUT = Path("benchmarks/results/step_time.json")

# (name, numerator, denominator, metric the target is judged on, target: ratio must be <= this)
RATIOS: tuple[tuple[str, str, str, str, float], ...] = (
    ("lora/peft-lora time", "lora", "peft-lora", "median_ms", 1.00),
    ("scalora/lora time", "scalora", "lora", "median_ms", 1.10),
    ("scalora-i10/lora time", "scalora-i10", "lora", "mean_ms", 1.02),
    ("scalora/lora peak RSS", "scalora", "lora", "peak_rss_mib", 1.05),
)

# Settings of the full run and of --small (a quick check); flags given explicitly win over both.
FULL = {"steps": 30, "warmup": 5, "repeats": 3, "batch": 32, "seq": 64}
SMALL = {"steps": 3, "warmup": 1, "repeats": 1, "batch": 4, "seq": 32}
MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_methods(text: str) -> list[str]:
    if text.strip() == "all":
        return list(METHODS)
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Step time and peak memory of full fine-tuning, PEFT LoRA, scalora LoRA and ScaLoRA on MiniLM.",
    )
    p.add_argument("--steps", type=int, default=None, help=f"measured steps per run (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps before them (default {FULL['warmup']})")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"rounds; each runs every method once, side by side (default {FULL['repeats']})")
    p.add_argument("--batch", type=int, default=None, help=f"sequences per batch (default {FULL['batch']})")
    p.add_argument("--seq", type=int, default=None, help=f"tokens per sequence (default {FULL['seq']})")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r; lora_alpha is 16 (default 8)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help=f"torch.set_num_threads in every run (default {default_threads()}: every CPU available)")
    p.add_argument("--methods", type=parse_methods, default=list(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}, or all (default all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head, the adapters and the batch (default 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"JSON results; a .md table is written beside it (default {DEFAULT_OUT})")
    p.add_argument("--small", action="store_true",
                   help="quick check: " + ", ".join(f"{k} {v}" for k, v in SMALL.items()))
    p.add_argument("--fetch", action="store_true", help="download the MiniLM asset first if it is missing")
    p.add_argument("--worker", choices=METHODS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the settings left unset from --small or the full-run defaults, and check them."""
    base = SMALL if args.small else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("steps", "batch", "seq", "rank", "threads", "repeats"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key} must be at least 1, got {getattr(args, key)}")
    if args.warmup < 0:
        raise SystemExit(f"--warmup must be at least 0, got {args.warmup}")
    return args


# ----------------------------------------------------------------------------------------------------
# Worker: one method, one fresh process
# ----------------------------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_rss_kib() -> int:
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB elsewhere


def load_model(seed: int):
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    from scalora.train import assets

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)  # the new classifier head is initialised from the global generator
    model = AutoModelForSequenceClassification.from_pretrained(
        assets.path("minilm"), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    return model.float().train()


def build(method: str, rank: int, seed: int):
    """(model, optimizer) for `method`, built from the pre-trained weights; adapters seeded with `seed`."""
    import torch

    model = load_model(seed)
    torch.manual_seed(seed + 1)
    if method == "peft-lora":
        import peft

        config = peft.LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES,
                                 modules_to_save=MODULES_TO_SAVE)
        model = peft.get_peft_model(model, config)
    elif method != "full":
        from scalora import LoraConfig, apply_lora

        config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=TARGET_MODULES,
                            modules_to_save=MODULES_TO_SAVE)
        apply_lora(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    if method in INTERVALS:
        from scalora.optim import ScaLoRA

        optimizer = ScaLoRA(model, optimizer, interval=INTERVALS[method])
    return model, optimizer


def _tensor_bytes(model, optimizer) -> dict[str, int]:
    import torch

    seen: set[int] = set()
    params = grads = buffers = state = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
            if p.grad is not None:
                grads += p.grad.numel() * p.grad.element_size()
    for b in model.buffers():
        if id(b) not in seen:
            seen.add(id(b))
            buffers += b.numel() * b.element_size()
    for s in optimizer.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                state += v.numel() * v.element_size()
    return {"params": params, "grads": grads, "buffers": buffers, "optimizer_state": state}


def _peak_step_allocation(step) -> int | None:
    """Largest net torch allocation (bytes) within one call of `step`, from the profiler's memory events."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # a private profiler API; report nothing rather than fail the run
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from scalora import trainable_parameters

    torch.set_num_threads(args.threads)
    method = args.worker
    rss_start = _proc_status_kib("VmRSS")
    model, optimizer = build(method, args.rank, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.config.vocab_size
    input_ids = torch.randint(1000, vocab, (args.batch, args.seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (args.batch,), generator=generator)
    trainable, total = trainable_parameters(model)

    def step() -> tuple[float, float, float, float]:
        c0 = time.process_time()
        t0 = time.perf_counter()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2, time.process_time() - c0

    gc.collect()
    rss_before = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(args.warmup):
        step()
    gc.collect()
    gc.disable()
    try:
        phases = [step() for _ in range(args.steps)]
    finally:
        gc.enable()
    peak_rss = _peak_rss_kib()
    alive = _tensor_bytes(model, optimizer)  # grads are None here (zero_grad(set_to_none=True))
    inputs = sum(t.numel() * t.element_size() for t in (input_ids, attention_mask, labels))
    peak_alloc = _peak_step_allocation(step)
    torch_peak = None if peak_alloc is None else sum(alive.values()) + inputs + peak_alloc
    result: dict[str, Any] = {
        "method": method,
        "step_s": [sum(p[:3]) for p in phases],
        "forward_s": [p[0] for p in phases],
        "backward_s": [p[1] for p in phases],
        "optimizer_s": [p[2] for p in phases],
        "cpu_s": [p[3] for p in phases],
        "trainable_params": trainable,
        "total_params": total,
        "rss_start_mib": None if rss_start is None else rss_start / 1024,
        "rss_before_training_mib": None if rss_before is None else rss_before / 1024,
        "peak_rss_mib": peak_rss / 1024,
        "peak_rss_scope": "training steps" if reset else "whole process (high-water mark could not be reset)",
        "torch_peak_mib": None if torch_peak is None else torch_peak / MIB,
        "torch_persistent_mib": {k: v / MIB for k, v in alive.items()},
        "threads": torch.get_num_threads(),
    }
    if method in INTERVALS:
        result["scalora_rescales"] = optimizer.num_steps // optimizer.interval
        result["scalora_last_stats"] = optimizer.last_stats.as_dict(prefix="")
    return result


# ----------------------------------------------------------------------------------------------------
# Parent: rounds of side-by-side runs, statistics, report
# ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_child(method: str, args: argparse.Namespace, workdir: Path, tag: str) -> dict[str, Any]:
    out = workdir / f"{tag}-{method}.json"
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--worker", method, "--worker-out", str(out),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--seq", str(args.seq),
        "--rank", str(args.rank), "--threads", str(args.threads), "--seed", str(args.seed),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"the {method} run failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Statistics of one method over all its rounds (times in ms, memory in MiB)."""
    steps = [t * 1e3 for r in runs for t in r["step_s"]]
    per_round = [{
        "median_ms": statistics.median(r["step_s"]) * 1e3,
        "mean_ms": statistics.fmean(r["step_s"]) * 1e3,
        "peak_rss_mib": r["peak_rss_mib"],
        "torch_peak_mib": r["torch_peak_mib"],
    } for r in runs]
    torch_peaks = [r["torch_peak_mib"] for r in runs if r["torch_peak_mib"] is not None]
    first = runs[0]
    out = {
        "median_ms": statistics.median(steps),
        "p10_ms": percentile(steps, 10),
        "p90_ms": percentile(steps, 90),
        "mean_ms": statistics.fmean(steps),
        "forward_median_ms": statistics.median(t * 1e3 for r in runs for t in r["forward_s"]),
        "backward_median_ms": statistics.median(t * 1e3 for r in runs for t in r["backward_s"]),
        "optimizer_median_ms": statistics.median(t * 1e3 for r in runs for t in r["optimizer_s"]),
        "cpu_median_ms": statistics.median(t * 1e3 for r in runs for t in r["cpu_s"]),
        "measured_steps": len(steps),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "peak_rss_scope": first["peak_rss_scope"],
        "rss_before_training_mib": first["rss_before_training_mib"],
        "torch_peak_mib": statistics.median(torch_peaks) if torch_peaks else None,
        "torch_persistent_mib": first["torch_persistent_mib"],
        "trainable_params": first["trainable_params"],
        "total_params": first["total_params"],
        "per_round": per_round,
        "step_ms": steps,
    }
    for key in ("scalora_rescales", "scalora_last_stats"):
        if key in first:
            out[key] = first[key]
    return out


def ratios(rounds: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each ratio within every round (side by side), then the median over rounds, against its target."""
    out = []
    for name, num, den, metric, target in RATIOS:
        entry: dict[str, Any] = {"name": name, "numerator": num, "denominator": den, "metric": metric,
                                 "target": target, "per_round": [], "median": None, "passed": None}
        if all(num in r and den in r for r in rounds):
            per_round = [rounds_metric(r[num], metric) / rounds_metric(r[den], metric) for r in rounds]
            entry["per_round"] = per_round
            entry["median"] = statistics.median(per_round)
            entry["passed"] = bool(entry["median"] <= target)
            if metric.endswith("_ms"):  # the other time statistic, for information
                other = "mean_ms" if metric == "median_ms" else "median_ms"
                entry[f"median_of_{other}_ratio"] = statistics.median(
                    rounds_metric(r[num], other) / rounds_metric(r[den], other) for r in rounds)
            else:
                entry["median_of_training_growth_ratio"] = statistics.median(
                    _growth(r[num]) / _growth(r[den]) for r in rounds)
        out.append(entry)
    return out


def rounds_metric(run: dict[str, Any], metric: str) -> float:
    if metric == "median_ms":
        return statistics.median(run["step_s"]) * 1e3
    if metric == "mean_ms":
        return statistics.fmean(run["step_s"]) * 1e3
    return run[metric]


def _growth(run: dict[str, Any]) -> float:
    """Peak RSS over the steps minus the RSS before them (what training itself added), at least 1 MiB."""
    return max(run["peak_rss_mib"] - (run["rss_before_training_mib"] or 0.0), 1.0)


def environment(threads: int) -> dict[str, Any]:
    import torch

    def version(name: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    commit = None
    try:
        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_available": default_threads(),
        "threads": threads,
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "peft": version("peft"),
        "scalora": version("scalora"),
        "git_commit": commit,
        "load_average_at_start": load,
    }


def command_line(argv: list[str]) -> str:
    script = Path(__file__).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(Path.cwd())
    return shlex.join(["python", str(script), *argv])


def markdown(report: dict[str, Any]) -> str:
    env, args = report["environment"], report["args"]
    lines = [
        "# Training step time on MiniLM",
        "",
        f"Command: `{report['command']}`",
        "",
        f"{env['date']}, {env['cpu_model']}, {env['threads']} threads, torch {env['torch']}, "
        f"transformers {env['transformers']}, peft {env['peft']}, scalora {env['scalora']}. "
        f"Batch {args['batch']} × {args['seq']} tokens, r={args['rank']}, {args['steps']} measured steps after "
        f"{args['warmup']} warm-up steps, {args['repeats']} round(s), methods interleaved.",
        "",
        "| method | median step ms | p10–p90 ms | mean ms | fwd / bwd / opt ms | peak RSS MiB | torch peak MiB "
        "| trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in report["methods"].items():
        torch_peak = "n/a" if s["torch_peak_mib"] is None else f"{s['torch_peak_mib']:.0f}"
        lines.append(
            f"| {method} | {s['median_ms']:.1f} | {s['p10_ms']:.1f}–{s['p90_ms']:.1f} | {s['mean_ms']:.1f} "
            f"| {s['forward_median_ms']:.1f} / {s['backward_median_ms']:.1f} / {s['optimizer_median_ms']:.1f} "
            f"| {s['peak_rss_mib']:.0f} | {torch_peak} | {s['trainable_params']:,d} |"
        )
    lines += [
        "",
        "Peak RSS: the child process's resident-set high-water mark over the training steps (reset after the model "
        "is built; it includes the libraries and frozen weights). Torch peak: bytes of tensors alive before a step "
        "plus the largest net allocation within one profiled step.",
        "",
        "Ratios are computed within each round (methods side by side) and the median over rounds is reported.",
        "",
        "| ratio | statistic | per round | median | target | result |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in report["ratios"]:
        if r["median"] is None:
            lines.append(f"| {r['name']} | {r['metric']} | – | – | ≤ {r['target']:.2f} | not measured |")
            continue
        rounds = ", ".join(f"{x:.3f}" for x in r["per_round"])
        verdict = "pass" if r["passed"] else "FAIL"
        lines.append(f"| {r['name']} | {r['metric']} | {rounds} | {r['median']:.3f} | ≤ {r['target']:.2f} "
                     f"| {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve(build_parser().parse_args(argv))
    if args.worker is not None:
        if args.worker_out is None:
            raise SystemExit("--worker needs --worker-out")
        result = run_worker(args)
        args.worker_out.write_text(json.dumps(result))
        return result

    from scalora.train import asset_fetch, assets

    try:
        assets.path("minilm")
    except assets.AssetMissingError as exc:
        if not args.fetch:
            raise SystemExit(f"{exc}\n(or rerun with --fetch)") from None
        asset_fetch.fetch("minilm")
    if args.steps % 10:
        print(f"note: --steps {args.steps} is not a multiple of 10, so scalora-i10's rounds may hold different "
              f"numbers of rescaling steps", file=sys.stderr)

    report: dict[str, Any] = {"command": command_line(argv), "environment": environment(args.threads)}
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="scalora-step-time-") as tmp:
        for r in range(args.repeats):
            order = args.methods[r % len(args.methods):] + args.methods[: r % len(args.methods)]
            results = {}
            for method in order:
                res = run_child(method, args, Path(tmp), f"round{r}")
                results[method] = res
                print(f"round {r + 1}/{args.repeats} {method:12s} median {statistics.median(res['step_s']) * 1e3:8.1f}"
                      f" ms  mean {statistics.fmean(res['step_s']) * 1e3:8.1f} ms  peak RSS "
                      f"{res['peak_rss_mib']:7.0f} MiB", flush=True)
            rounds.append(results)
    report["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("worker", "worker_out")}
    report["rounds_order"] = [list(r) for r in rounds]
    report["methods"] = {m: summarise([r[m] for r in rounds]) for m in args.methods}
    report["ratios"] = ratios(rounds)
    report["targets"] = {r["name"]: {"target": r["target"], "metric": r["metric"], "median": r["median"],
                                     "passed": r["passed"]} for r in report["ratios"]}
    with contextlib.suppress(OSError):
        report["environment"]["load_average_at_end"] = list(os.getloadavg())

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    md = markdown(report)
    args.out.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
