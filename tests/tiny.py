"""Tiny randomly initialised transformers models for fast tests (no download)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertForSequenceClassification, GPT2LMHeadModel, LlamaForCausalLM

from scalora.train.models import tiny_network


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 over 97 tokens and 64 positions (BOS = EOS = 0)."""
    return tiny_network("gpt2", 97, positions=64, seed=seed, bos_token_id=0, eos_token_id=0)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """Llama over 101 tokens and 64 positions (BOS 0, EOS = pad = 1)."""
    return tiny_network("llama", 101, positions=64, seed=seed, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_bert(seed: int = 0, num_labels: int = 2) -> BertForSequenceClassification:
    """BERT classifier over 103 tokens and 64 positions."""
    return tiny_network("bert", 103, num_labels=num_labels, positions=64, seed=seed)


def token_batch(vocab_size: int, batch: int = 3, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab_size, (batch, length), generator=g)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, batch: Callable[[int], torch.Tensor],
                steps: int) -> list[float]:
    """Train a causal LM `steps` steps on ``batch(step)`` (its own labels); the losses."""
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
