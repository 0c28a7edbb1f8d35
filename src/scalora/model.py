"""Model surgery: put adapters into a model, fold them back out, switch them off, count what trains."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from scalora.config import ALL_LINEAR, LoraConfig
from scalora.errors import ConfigError
from scalora.layers import Conv1D, Embedding, LoraLayer, check_rank, lora_layer_class
from scalora.quantised import unreadable
from scalora.save_guard import guard_saves

CONFIG_ATTR = "scalora_config"
# Names of output heads that "all-linear" leaves alone (besides the model's own get_output_embeddings()).
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs")


@dataclass(frozen=True)
class PlannedLayer:
    """One module `apply_lora` will wrap, with its adapter's shape: A is (r, in), B is (out, r)."""

    name: str
    module: nn.Module
    layer_cls: type[LoraLayer]
    r: int
    scaling: float
    in_features: int
    out_features: int


def plan_lora(model: nn.Module, config: LoraConfig) -> list[PlannedLayer]:
    """The modules `config` targets in `model`, checked, without changing the model.

    Raises `ConfigError` if nothing matches (listing what could be targeted), if a matched module has an
    unsupported type, if r is too large for a layer, or if the model already has adapters.
    """
    require_module(model)
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a scalora.LoraConfig, got {type(config).__name__}; build one with "
                          f"LoraConfig(r=..., target_modules=...).")
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise ConfigError("this model already has LoRA adapters; merge(model) or start from a fresh model.")
    heads = _output_head_names(model)
    plan: list[PlannedLayer] = []
    for name, module in model.named_modules():
        if not name or not config.is_target(name):
            continue
        layer_cls = lora_layer_class(module)
        if config.target_modules == ALL_LINEAR:
            if layer_cls is None or layer_cls is Embedding or name in heads:
                continue
        elif layer_cls is None:
            raise ConfigError(
                f"target module {name!r} is a {type(module).__name__}; scalora adapts nn.Linear, GPT-2's Conv1D "
                f"and nn.Embedding. Name one of those (see the list of targetable modules with "
                f"scalora.targetable_modules(model))."
            )
        reason = unreadable(getattr(module, "weight", None))
        if reason is not None:
            raise ConfigError(f"target module {name!r} {reason}.")
        r = config.rank_for(name)
        if layer_cls is Embedding:
            in_f, out_f = module.num_embeddings, module.embedding_dim
        elif layer_cls is Conv1D:
            in_f, out_f = module.weight.shape
        else:
            in_f, out_f = module.in_features, module.out_features
        check_rank(r, in_f, out_f, f"module {name!r}")
        plan.append(PlannedLayer(name, module, layer_cls, r, config.scaling_for(name), in_f, out_f))
    if not plan:
        candidates = targetable_modules(model)
        shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches no module of this model. "
            f"Modules that can be targeted: {shown or '(none)'}."
        )
    return plan


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the targeted modules of `model` in LoRA layers, in place, and freeze everything else.

    Trainable afterwards: every A and B, the α vectors (if ``config.alpha_vector``) and `modules_to_save`.
    Returns the same model, which remembers its config as ``model.scalora_config``; its ``save_pretrained`` (if
    any) refuses to write the wrapped weights (`scalora.save_guard`): save ``merge(model)`` or the adapter.
    """
    plan = plan_lora(model, config)
    to_save = [name for name, _ in model.named_modules() if name and config.is_module_to_save(name)]
    if config.modules_to_save and not to_save:
        raise ConfigError(f"modules_to_save={config.modules_to_save!r} matches no module of this model.")
    for p in model.parameters():
        p.requires_grad_(False)
    for item in plan:
        layer = item.layer_cls(
            item.module, item.r, item.scaling, lora_dropout=config.lora_dropout,
            alpha_vector=config.alpha_vector, init_lora_weights=config.init_lora_weights,
        )
        _set_submodule(model, item.name, layer)
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    guard_saves(model)
    return model


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) for every LoRA layer of `model`, names as in the original model."""
    require_module(model)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def require_module(model: object) -> None:
    """A `ConfigError` unless `model` is a torch module (so a wrong argument is named, not an AttributeError)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"expected a torch.nn.Module as the model, got {type(model).__name__}; pass the model "
                          f"itself (e.g. AutoModel.from_pretrained(...)).")


def get_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ConfigError("this model has no LoRA adapters: call scalora.apply_lora(model, config) first.")
    return config


def merge(model: nn.Module, *, unload: bool = True) -> nn.Module:
    """Fold every adapter and α vector into its base weight: W ← diag(a) W + s B A, b ← a ⊙ b.

    With ``unload=True`` (default) the wrappers are removed and a plain model is returned, equal in output to the
    adapted one (PEFT's ``merge_and_unload``). With ``unload=False`` the wrappers stay, marked merged, and
    `unmerge` can undo it. If any layer's result would be NaN or inf in its weight's dtype, `NonFiniteError` names
    the layer and no weight is changed. Layers over a quantised base (`scalora.quantised_layer.QuantisedLinear`)
    become plain ``nn.Linear`` layers in their adapter's dtype, so they need ``unload=True``.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ConfigError("this model has no LoRA adapters to merge.")
    fixed = [name for name, layer in layers if not layer.merges_in_place]
    if fixed and not unload:
        raise ConfigError(f"layer {fixed[0]!r} has a quantised base weight, which cannot hold the merged update: "
                          f"merge with unload=True, which replaces it by a plain nn.Linear.")
    for name, layer in layers:  # every layer first: a refused merge leaves the whole model as it was
        layer.check_merge(f"layer {name!r}")
    for name, layer in layers:
        if unload:
            _set_submodule(model, name, layer.merged_module())
        else:
            layer.merge()
    if unload and hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge(model, unload=False)``: subtract every update again and divide out α (refused, with nothing
    changed, if some layer cannot be restored: see `LoraLayer.check_unmerge`)."""
    layers = list(lora_layers(model))
    for name, layer in layers:
        layer.check_unmerge(f"layer {name!r}")
    for _, layer in layers:
        layer.unmerge()
    return model


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its pre-trained base (no update, no α)."""
    layers = [layer for _, layer in lora_layers(model)]
    if any(layer.merged for layer in layers):
        raise ConfigError("adapters are merged into the weights; unmerge(model) before disabling them.")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.disabled = was


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared parameters are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-line summary: trainable params, all params and the trainable percentage."""
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def targetable_modules(model: nn.Module) -> list[str]:
    """Names of the modules a LoRA layer can wrap (Linear, Conv1D, Embedding)."""
    return [name for name, m in model.named_modules() if name and lora_layer_class(m) is not None]


def _output_head_names(model: nn.Module) -> set[str]:
    names = {name for name, _ in model.named_modules() if name.split(".")[-1] in _HEAD_NAMES}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        names |= {name for name, m in model.named_modules() if m is head}
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
