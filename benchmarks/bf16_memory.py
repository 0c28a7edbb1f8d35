"""Peak memory of ScaLoRA against LoRA on a bf16 SmolLM2-135M: what the way of folding into bf16 weights costs.

The model is built from SmolLM2-135M's configuration (Llama: 30 layers, hidden 576, MLP 1536, 9 heads of which 3
key/value, vocabulary 49 152, tied embeddings) with random bf16 weights, so nothing is downloaded; memory does not
depend on the weights' values. LoRA r = 8 on every linear layer, AdamW; each method trains in a fresh process
(batch --batch × --length tokens), whose RSS high-water mark is reset once the model, the optimiser and a first step
exist, so the peak is that of training steps. Methods:

* ``lora``: plain AdamW;
* ``scalora``: ScaLoRA's default for half-precision bases, stochastically rounded folds (no buffer);
* ``scalora-compensated``: ``ScaLoRA(..., compensate=True)``, a Kahan buffer the size of every adapted weight;
* ``scalora-int8``: ``ScaLoRA(..., compensate="int8")``, the same buffer in one byte per entry.

Reports peak RSS, its growth over the RSS before the timed steps, and the bytes of parameters and buffers (the
compensation buffers are buffers), each as a ratio to LoRA's. Writes JSON and the same table as Markdown.

    python benchmarks/bf16_memory.py                      # 3 steps of 2 × 128 tokens per method
    python benchmarks/bf16_memory.py --steps 1 --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import command_line, environment, save_report
from step_time import _peak_rss_kib, _proc_status_kib, _reset_peak_rss

METHODS = ("lora", "scalora", "scalora-compensated", "scalora-int8")
COMPENSATE = {"scalora": None, "scalora-compensated": True, "scalora-int8": "int8"}
#: SmolLM2-135M's published configuration (HuggingFaceTB/SmolLM2-135M, config.json)
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 0,
                "eos_token_id": 0}


def worker(method: str, steps: int, batch: int, length: int) -> dict:
    """Train `steps` steps with `method` in this process; its peak RSS and tensor bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scalora import LoraConfig, ScaLoRA, apply_lora

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16)
    apply_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if method != "lora":
        optimizer = ScaLoRA(model, optimizer, compensate=COMPENSATE[method])
    ids = torch.randint(2, SMOLLM2_135M["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # the optimiser's moments and ScaLoRA's buffers exist from here on
    reset = _reset_peak_rss()
    before = _proc_status_kib("VmRSS")
    for _ in range(steps):
        step()
    tensors = {"params": sum(p.numel() * p.element_size() for p in model.parameters()),
               "buffers": sum(b.numel() * b.element_size() for b in model.buffers())}
    return {"method": method, "peak_rss_mib": _peak_rss_kib() / 1024, "rss_before_mib": before / 1024,
            "peak_reset": reset, "tensor_mib": {k: v / 2**20 for k, v in tensors.items()}}


def markdown(report: dict) -> str:
    rows = report["results"]
    lora = rows["lora"]
    json_name = Path(report["args"]["out"]).name
    lines = ["# Peak memory in bf16: ScaLoRA against LoRA (SmolLM2-135M's shape, random weights)", "",
             f"Written by `benchmarks/bf16_memory.py` (`{report['command']}`), with `{json_name}`. "
             f"{report['args']['steps']} training steps of {report['args']['batch']} × {report['args']['length']} "
             "tokens per method, each in a fresh process; r = 8 on every linear layer, AdamW.", "",
             "| method | peak RSS MiB | × LoRA | growth in training MiB | parameters + buffers MiB | × LoRA |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        tensors = sum(row["tensor_mib"].values())
        lines.append(f"| {name} | {row['peak_rss_mib']:.0f} | {row['peak_rss_mib'] / lora['peak_rss_mib']:.3f} | "
                     f"{row['peak_rss_mib'] - row['rss_before_mib']:.0f} | {tensors:.0f} | "
                     f"{tensors / sum(lora['tensor_mib'].values()):.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bf16_memory.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.batch, args.length)))
        return {}
    results = {}
    for method in METHODS:
        out = subprocess.run([sys.executable, __file__, "--worker", method, "--steps", str(args.steps), "--batch",
                              str(args.batch), "--length", str(args.length)], check=True, capture_output=True,
                             text=True).stdout
        results[method] = json.loads(out.strip().splitlines()[-1])
    report = {"command": command_line(__file__, argv), "args": {k: str(v) for k, v in vars(args).items()},
              "environment": environment(), "results": results}
    save_report(args.out, report, markdown)
    return report


if __name__ == "__main__":
    main()
