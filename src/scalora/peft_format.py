"""Adapters on disk in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are PEFT's: ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` (``lora_embedding_A`` /
``lora_embedding_B`` for embeddings) and ``base_model.model.<module>.<param>`` for `modules_to_save`.
α-LoRA's vectors, which PEFT cannot represent, are stored as ``base_model.model.<module>.alpha_vector`` and
flagged in the config as ``"scalora": {"alpha_vector": true}``. PEFT ignores both (it loads the factors and
drops the vectors, so its model differs); ``scalora.merge`` gives a portable export of such an adapter.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scalora.config import LoraConfig
from scalora.errors import AdapterFileError, ConfigError
from scalora.factors import BASE_CHANGED
from scalora.finite import first_nonfinite
from scalora.layers import Embedding
from scalora.model import apply_lora, get_config, lora_layers, plan_lora, require_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
ALPHA_VECTOR_KEY = "alpha_vector"


def factor_keys(name: str, embedding: bool) -> tuple[str, str]:
    if embedding:
        return f"{PREFIX}{name}.lora_embedding_A", f"{PREFIX}{name}.lora_embedding_B"
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (factors, α vectors, modules_to_save), on the CPU."""
    return {k: v.detach().contiguous().cpu() for k, v in _parameters_by_key(model).items()}


def save_adapter(model: nn.Module, folder: str | os.PathLike, *, allow_changed_base: bool = False) -> Path:
    """Write the adapter of `model` to `folder` in PEFT's format; each file is replaced atomically.

    The weights go first and the config last, each written to a temporary file and renamed over the old one,
    so an interrupted save leaves the previous adapter files whole. Refused when ScaLoRA or ReLoRA changed the
    base weights (the file would lack those changes) unless ``allow_changed_base=True``.
    """
    layers = list(lora_layers(model))
    if any(layer.merged for _, layer in layers):
        raise ConfigError("the adapters are merged into the base weights; unmerge(model) before saving them.")
    changed = [name for name, layer in layers if getattr(layer, BASE_CHANGED, False)]
    if changed and not allow_changed_base:
        raise ConfigError(
            f"ScaLoRA or ReLoRA merged updates into the base weights of {len(changed)} layer(s) (e.g. {changed[0]!r}), "
            f"which an adapter file does not hold: loaded onto the original base model it would not be the trained "
            f"model. Save the whole model with scalora.merge(model).save_pretrained(folder), or a rank-k adapter of "
            f"the whole update with scalora.export_lora(model, snapshot_base_weights(model) taken before training, k, "
            f"folder); pass allow_changed_base=True to save the factors alone anyway."
        )
    fan_in_fan_out = bool(layers) and all(layer.fan_in_fan_out for _, layer in layers)
    return write_adapter(folder, get_config(model), adapter_state_dict(model), model, fan_in_fan_out=fan_in_fan_out)


def write_adapter(
    folder: str | os.PathLike,
    config: LoraConfig,
    state: dict[str, torch.Tensor],
    model: nn.Module,
    *,
    fan_in_fan_out: bool = False,
) -> Path:
    """Write `state` (PEFT key names) and `config` as a PEFT adapter of `model`'s class, atomically per file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_dict = config.to_peft_dict()
    config_dict["fan_in_fan_out"] = fan_in_fan_out
    config_dict["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME,
                  lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n"))
    return folder


def read_adapter_config(folder: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` stored in `folder`; a clear `AdapterFileError` if it is missing or unreadable."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no adapter at {folder}: {CONFIG_NAME} is missing (save one with save_adapter).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFileError(f"{path} is not valid JSON ({exc}); the file is corrupt.") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} holds a JSON {type(data).__name__}, not an adapter config object; the file "
                               f"is corrupt or not an adapter_config.json.")
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFileError(f"{path} is not a LoRA adapter config (peft_type={data.get('peft_type')!r}).")
    try:
        return LoraConfig.from_peft_dict(data)
    except ConfigError as exc:
        raise AdapterFileError(f"{path}: {exc}") from None


def load_adapter(model: nn.Module, folder: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Load an adapter saved by scalora or PEFT into `model` (adding the adapter layers if it has none yet).

    Every key and shape is checked before anything is written: on any mismatch the model is left untouched and
    the error names the first offending key and both shapes. A model that already has adapters must scale them
    as the file's config says. Tensors holding NaN or inf are refused unless ``allow_nonfinite=True``.
    """
    require_module(model)
    folder = Path(folder)
    config = read_adapter_config(folder)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise AdapterFileError(f"no adapter weights at {folder}: {WEIGHTS_NAME} is missing.")
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"{weights_path} cannot be read ({exc}); the file is corrupt.") from None
    bad = None if allow_nonfinite else first_nonfinite(state.items())
    if bad is not None:
        raise AdapterFileError(f"{weights_path}: tensor {bad!r} holds NaN or inf (the training that wrote it "
                               f"diverged); retrain it, or pass allow_nonfinite=True to load it anyway.")

    has_layers = any(True for _ in lora_layers(model))
    expected = _expected_shapes(model, config, has_layers)
    for key, shape in expected.items():
        if key not in state:
            raise AdapterFileError(f"{weights_path} has no tensor {key!r}, which this model needs (shape {shape}).")
        if tuple(state[key].shape) != shape:
            raise AdapterFileError(
                f"shape mismatch for {key!r}: the file has {tuple(state[key].shape)}, the model needs {shape}. "
                f"The adapter was made for a different model or configuration."
            )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise AdapterFileError(
            f"{weights_path} has tensor {unexpected[0]!r} (shape {tuple(state[unexpected[0]].shape)}), which "
            f"matches nothing in this model ({len(unexpected)} such key(s)); was it made for another model?"
        )

    if has_layers:
        _check_scaling(model, config)
    else:
        apply_lora(model, config)
    params = _parameters_by_key(model)
    with torch.no_grad():
        for key, tensor in state.items():
            params[key].copy_(tensor)
    return model


def _expected_shapes(model: nn.Module, config: LoraConfig, has_layers: bool) -> dict[str, tuple[int, ...]]:
    """The key → shape map the file must match, for the model as it is or as `apply_lora` would make it."""
    if has_layers:
        current = get_config(model)
        if (current.alpha_vector, sorted(current.modules_to_save or [])) != (
            config.alpha_vector, sorted(config.modules_to_save or [])
        ):
            raise AdapterFileError("the adapter's config (alpha_vector / modules_to_save) differs from the model's.")
        return {k: tuple(p.shape) for k, p in _parameters_by_key(model).items()}
    try:
        plan = plan_lora(model, config)
    except ConfigError as exc:
        raise AdapterFileError(f"this adapter does not fit the model: {exc}") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for item in plan:
        key_a, key_b = factor_keys(item.name, item.layer_cls is Embedding)
        shapes[key_a], shapes[key_b] = (item.r, item.in_features), (item.out_features, item.r)
        if config.alpha_vector:
            shapes[f"{PREFIX}{item.name}.{ALPHA_VECTOR_KEY}"] = (item.out_features,)
    shapes.update((key, tuple(p.shape)) for key, p in modules_to_save_params(model, config))
    return shapes


def _check_scaling(model: nn.Module, config: LoraConfig) -> None:
    """The model's adapters must scale each layer as the file's config does, or its factors compute another update."""
    for name, layer in lora_layers(model):
        scale = config.scaling_for(name)
        if not math.isclose(scale, layer.scaling, rel_tol=1e-6):
            raise AdapterFileError(
                f"the adapter scales layer {name!r} by {scale:.6g} (lora_alpha={config.alpha_for(name)}, "
                f"r={config.rank_for(name)}, use_rslora={config.use_rslora}) but the model's adapter there scales "
                f"by {layer.scaling:.6g}; load it into a model without adapters (load_adapter then adds them with "
                f"the file's config)."
            )


def _parameters_by_key(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live parameters behind each key of the adapter file."""
    params: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        key_a, key_b = factor_keys(name, isinstance(layer, Embedding))
        params[key_a], params[key_b] = layer.lora_A, layer.lora_B
        if layer.alpha_vector is not None:
            params[f"{PREFIX}{name}.{ALPHA_VECTOR_KEY}"] = layer.alpha_vector
    params.update(modules_to_save_params(model, get_config(model)))
    return params


def modules_to_save_params(model: nn.Module, config: LoraConfig) -> Iterator[tuple[str, torch.Tensor]]:
    for mod_name, module in model.named_modules():
        if mod_name and config.is_module_to_save(mod_name):
            for p_name, p in module.named_parameters():
                yield f"{PREFIX}{mod_name}.{p_name}", p


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through `write(tmp_path)` into a temporary file beside `path`, fsync, then rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file should be as readable as the run's others
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
