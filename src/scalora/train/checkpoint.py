"""Training checkpoints: written whole or not at all, resumed only into the same configuration, never pickled.

A checkpoint is a folder ``<output_dir>/checkpoint`` with ``model.safetensors`` (the weights that change while
training), ``training_state.safetensors`` (optimiser, schedules, random generators: see `statefile`) and
``trainer_state.json`` (step and the configuration, readable). It is written to a temporary folder and swapped in
with renames; if a write fails or is interrupted the previous checkpoint stays where it was, intact.

Checkpoints written before the training state moved to safetensors hold ``training_state.pt`` instead; it is read
with ``torch.load(weights_only=True)``, which builds tensors and plain values only and refuses anything else.
Tensors holding NaN or inf are refused unless asked for (``allow_nonfinite``).
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scalora.errors import ScaloraError
from scalora.finite import first_nonfinite
from scalora.train import statefile
from scalora.train.config import TrainConfig

NAME = "checkpoint"
_OLD = "checkpoint.old"
TMP_PREFIX = ".checkpoint-"  # checkpoints being written (left behind only by a killed process)
STATE = "training_state.safetensors"
_PICKLED_STATE = "training_state.pt"  # written before the training state moved to safetensors


class CheckpointError(ScaloraError):
    """A checkpoint is missing, unreadable, or belongs to another configuration."""


@dataclass
class Checkpoint:
    step: int
    model: dict[str, torch.Tensor]
    state: dict[str, Any]


def mutable_state(model: nn.Module, include_frozen: bool) -> dict[str, torch.Tensor]:
    """The model tensors a checkpoint needs: trainable ones, and every tensor if the frozen weights change too.

    α-LoRA's vectors are kept although they are frozen between their own steps. Tied tensors (GPT-2's input and
    output embeddings) are stored once, under their first name: safetensors refuses shared storage, and loading
    one name restores both.
    """
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...], tuple[int, ...]]] = set()
    for name, t in model.state_dict().items():
        if not (include_frozen or name in trainable or name.endswith((".base_compensation", ".alpha_vector"))):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def find(output_dir: Path) -> Path | None:
    """The checkpoint folder of a run; after a crash between the two renames of a save, the previous one."""
    for name in (NAME, _OLD):
        folder = output_dir / name
        if (folder / "trainer_state.json").is_file():
            return folder
    return None


def save(output_dir: Path, cfg: TrainConfig, step: int, model_state: dict[str, torch.Tensor],
         state: dict[str, Any]) -> Path:
    """Write a checkpoint for `step`; the previous one is replaced only once this one is complete."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=output_dir))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the checkpoint should be as readable as the run's other files
        save_file({k: v.cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
        statefile.save(state, tmp / STATE)
        (tmp / "trainer_state.json").write_text(json.dumps(
            {"step": step, "fingerprint": cfg.fingerprint(), "config": cfg.identity()}, indent=2, sort_keys=True))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        final = replace_dir(tmp, output_dir / NAME)
        fsync_dir(output_dir)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Put the complete folder `tmp` at `final`: the old one is moved aside first and removed only afterwards,
    so at every moment one whole version exists (`find` looks at the moved-aside name too)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    # without `final`, `old` may be the only whole version (a save failed between the renames): keep it until now
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def fsync_dir(folder: Path) -> None:
    """Make the renames inside `folder` durable (a crash after this keeps them)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(folder: Path) -> dict[str, Any]:
    """The training state of the checkpoint `folder`, from safetensors or (older checkpoints) a weights-only pickle."""
    if (folder / STATE).is_file():
        state = statefile.load(folder / STATE)
    else:
        state = torch.load(folder / _PICKLED_STATE, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"the training state is a {type(state).__name__}, not a dict")
    return state


def load(output_dir: Path, cfg: TrainConfig, *, allow_nonfinite: bool = False) -> Checkpoint:
    """Read the run's checkpoint, refusing one written under a different configuration, one that cannot be read
    as tensors and plain values (never unpickling code), and, unless `allow_nonfinite`, one holding NaN or inf."""
    folder = find(output_dir)
    if folder is None:
        raise CheckpointError(f"no checkpoint to resume in {output_dir}; drop --resume to start a new run.")
    try:
        meta = json.loads((folder / "trainer_state.json").read_text())
        step = int(meta["step"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, KeyError, TypeError,
            ValueError) as exc:
        raise CheckpointError(f"the checkpoint in {folder} cannot be read ({reason(exc)}); start over with "
                              f"--overwrite (or resume from a copy of an intact run).") from None
    if meta.get("fingerprint") != cfg.fingerprint():
        saved = meta["config"] if isinstance(meta.get("config"), dict) else {}
        ours = cfg.identity()
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs now {ours.get(k)!r}"
                for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise CheckpointError(
            f"the checkpoint in {folder} was written by a run with a different configuration "
            f"({'; '.join(diff) or 'unknown fields'}). Resume with the same options, or use another --output-dir."
        )
    try:
        model = load_file(folder / "model.safetensors")
        state = read_state(folder)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"the training state in {folder} cannot be read safely: it is corrupt or holds objects "
                              f"other than tensors and plain values (tampered with?), so nothing of it was run "
                              f"({reason(exc)}); start over with --overwrite.") from None
    except (OSError, SafetensorError, RuntimeError, EOFError, RecursionError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint in {folder} cannot be read ({reason(exc)}); start over with "
                              f"--overwrite (or resume from a copy of an intact run).") from None
    bad = None if allow_nonfinite else first_nonfinite([*model.items(), *statefile.tensors_in(state)])
    if bad is not None:
        raise CheckpointError(f"the checkpoint in {folder} holds NaN or inf in {bad!r}, so resuming it would train "
                              f"on broken values; start over with --overwrite (and a lower --lr).")
    return Checkpoint(step, model, state)


def reason(exc: BaseException) -> str:
    """The cause of an error in one line, e.g. "No space left on device: runs/x/metrics.jsonl"."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
