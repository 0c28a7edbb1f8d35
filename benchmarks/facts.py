"""Where rank may decide on a real model: MiniLM memorises a table of new random facts (name → class).

Data: ``N_FACTS`` made-up names (a random lower-case "word" of 4–8 letters, which MiniLM's word-piece tokenizer
splits into several pieces), each given a class drawn uniformly from ``N_CLASSES``. The classification head is random
and frozen (scaled by ``HEAD_SCALE`` so that confident answers are reachable), so the facts must be written into the
encoder: every linear layer of the encoder and pooler is adapted (or, for full fine-tuning, trained at full rank:
exactly the same weight matrices). Only MiniLM's first ``LAYERS`` transformer layers are kept, so that a run takes
about a minute on one CPU core. Dropout is off.
The loss is the cross-entropy over the whole table (the task is memorisation: the table is the evaluation set), so a
run starts near ln N_CLASSES. The information to store (N_FACTS · log2 N_CLASSES bits spread over arbitrary
word-piece combinations) needs many directions in many layers; whether a rank-4 adapter is limited by its rank here
is what the gate (full fine-tuning ≤ 0.1× LoRA r = 4) and LoRA r = 64 tell.

This is the "facts" arm of ``benchmarks/rank_decides.py`` (``--size facts``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from scalora.train.models import load_model
from scalora.train.planted import PlantedMethod, adapter_optimizer, lr_schedule, tracked_run

N_FACTS = 256
N_CLASSES = 16
HEAD_SCALE = 10.0
BATCH = 16
LAYERS = 2  # MiniLM's first two transformer layers (of six): a real pre-trained encoder, cheap enough for grids
TRACKED = "bert.encoder.layer.1.attention.self.query"  # the layer whose accumulated update's rank is tracked


def _names(seed: int) -> list[str]:
    g = torch.Generator().manual_seed(40_000 + seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word() -> str:
        n = int(torch.randint(4, 9, (1,), generator=g))
        return "".join(letters[int(i)] for i in torch.randint(0, 26, (n,), generator=g))

    return [word() for _ in range(N_FACTS)]


def facts_model(seed: int) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """MiniLM with a frozen random head of ``N_CLASSES``, the tokenised table and its labels (all seeded)."""
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model, tokenizer = load_model("minilm", "classification", num_labels=N_CLASSES)
    model.bert.encoder.layer = model.bert.encoder.layer[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    with torch.no_grad():
        head = model.classifier
        nn.init.normal_(head.weight, std=HEAD_SCALE / math.sqrt(head.in_features))
        head.bias.zero_()
    model.classifier.requires_grad_(False)
    inputs = tokenizer(_names(seed), padding=True, return_tensors="pt")
    labels = torch.randint(0, N_CLASSES, (N_FACTS,), generator=torch.Generator().manual_seed(50_000 + seed))
    return model, dict(inputs), labels


def _optimizer(method: PlantedMethod, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if method.r == 0:
        model.requires_grad_(False)
        weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "classifier"]
        for w in weights:
            w.requires_grad_(True)
        return torch.optim.AdamW(weights, lr=lr, weight_decay=0.0)
    return adapter_optimizer(method, model, lr, target_modules="all-linear", exclude_modules=["classifier"])


def train_facts(method: PlantedMethod, lr: float, seed: int, steps: int, eval_every: int,
                schedule: str = "cosine", warmup: int = 0) -> list[dict[str, Any]]:
    """One run: every `eval_every` steps (and at 0 and the end) the loss over the whole table, the effective rank of
    ``TRACKED``'s accumulated update and the training seconds so far. Stops early (last loss inf) on divergence.
    ``schedule`` and ``warmup`` (`lr_schedule`): the default ``"cosine"`` decays the learning rate to 0, because
    memorisation at a constant rate ends wherever its last steps happen to oscillate."""
    model, inputs, labels = facts_model(seed)
    model.eval()  # dropout is off anyway; eval() keeps it so whatever the config says
    opt = _optimizer(method, model, lr)
    g = torch.Generator().manual_seed(60_000 + seed)
    loss_fn = nn.CrossEntropyLoss()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, N_FACTS, (BATCH,), generator=g)
        return loss_fn(model(**{k: v[idx] for k, v in inputs.items()}).logits, labels[idx])

    def eval_loss() -> float:
        return float(loss_fn(model(**inputs).logits, labels))

    return tracked_run(model, opt, TRACKED, batch_loss, eval_loss, steps, eval_every,
                       lr_schedule(method, steps, schedule, warmup))
