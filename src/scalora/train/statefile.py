"""Nested training state (optimiser, schedules, random generators) in one safetensors file, without pickle.

The tensors are the file's tensors; the structure around them (dicts, lists, tuples, numbers, strings, None) is
JSON in the file's metadata, with every dict and tuple tagged (``{"dict": [[key, value], ...]}``,
``{"tuple": [...]}``) so that integer keys and tuples come back as they were, and every tensor replaced by
``{"tensor": "<name>"}``. Reading builds only those types: a tampered file is an error, never code that runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_KEY = "state"


def save(state: Any, path: Path) -> None:
    """Write `state` to `path` (a TypeError names any value that is not a tensor, container or plain value)."""
    tensors: dict[str, torch.Tensor] = {}
    names: dict[int, str] = {}

    def encode(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if id(value) not in names:
                names[id(value)] = str(len(tensors))
                tensors[names[id(value)]] = value.detach().cpu().contiguous()
            return {"tensor": names[id(value)]}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [encode(v) for v in value]
        if isinstance(value, tuple):
            return {"tuple": [encode(v) for v in value]}
        if isinstance(value, dict):
            return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
        raise TypeError(f"a training state cannot hold a {type(value).__name__} ({value!r:.60})")

    tree = encode(state)
    save_file(tensors, path, metadata={_KEY: json.dumps(tree)})


def load(path: Path) -> Any:
    """Read a state written by `save`; ValueError (or OSError, SafetensorError) if the file is not one."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    if _KEY not in metadata:
        raise ValueError("the file has no training-state structure")

    def decode(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [decode(v) for v in node]
        if isinstance(node, dict) and len(node) == 1:
            ((tag, body),) = node.items()
            if tag == "tensor" and isinstance(body, str) and body in tensors:
                return tensors[body]
            if tag == "tuple" and isinstance(body, list):
                return tuple(decode(v) for v in body)
            if tag == "dict" and isinstance(body, list) and all(isinstance(p, list) and len(p) == 2 for p in body):
                return {decode(k): decode(v) for k, v in body}
        raise ValueError(f"unexpected entry {json.dumps(node)[:80]}")

    return decode(json.loads(metadata[_KEY]))


def tensors_in(state: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor inside `state`, paths like ``optimizer/state/0/exp_avg``."""
    if isinstance(state, torch.Tensor):
        yield where, state
    elif isinstance(state, dict):
        for key, value in state.items():
            yield from tensors_in(value, f"{where}/{key}" if where else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from tensors_in(value, f"{where}[{i}]")
