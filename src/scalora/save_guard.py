"""Saves that never lie: ``save_pretrained`` refuses to write files that would load back as a different model.

Two cases do:

* a model with scalora's layers: its state dict has wrapped keys (``q_proj.base_layer.weight``, ``q_proj.lora_A``)
  that ``from_pretrained`` loads into a plain model as *randomly initialised* weights;
* a PEFT model whose base weights ScaLoRA or ReLoRA changed (they merge updates into W0): PEFT saves the adapter
  only, which loaded onto the original base model is not the trained model.

`guard_saves(model)` makes ``model.save_pretrained`` (and what calls it: ``push_to_hub``,
``transformers.Trainer.save_model``) refuse them, saying what to call instead. Training checkpoints are read back
into the same adapted model, so they are allowed inside `checkpoint_saves(model)`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from scalora.errors import ConfigError
from scalora.factors import lora_factors

_ALLOWED = "_scalora_checkpoint_saves"


def save_refusal(model: nn.Module) -> str | None:
    """Why ``model.save_pretrained`` would write a different model than `model`, or None when it would not."""
    factors = lora_factors(model)
    changed = any(f.base_changed for _, f in factors)
    adapter = ("a rank-k adapter of the whole update with scalora.export_lora(model, snapshot_base_weights(model) "
               "taken before training, k, folder)" if changed
               else "the adapter with scalora.save_adapter(model, folder)")
    if any(f.base_in_state_dict for _, f in factors):
        return ("this model has scalora's LoRA layers: save_pretrained would write wrapped keys (…base_layer.weight, "
                "…lora_A) that from_pretrained loads as random weights. Save the fine-tuned model with "
                f"scalora.merge(model).save_pretrained(folder), or {adapter}.")
    if changed:
        return ("ScaLoRA or ReLoRA merged updates into this PEFT model's base weights, which PEFT's adapter files "
                "do not hold: the saved adapter would not be the trained model. Save the fine-tuned model with "
                f"model.merge_and_unload().save_pretrained(folder), or {adapter}.")
    return None


def guard_saves(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` raise `ConfigError` while `save_refusal` has a reason (outside
    `checkpoint_saves`); a model without ``save_pretrained`` is left alone."""
    if not callable(getattr(model, "save_pretrained", None)) or "save_pretrained" in vars(model):
        return
    model.save_pretrained = _GuardedSavePretrained(model)


@contextmanager
def checkpoint_saves(model: nn.Module) -> Iterator[None]:
    """Within the block ``model.save_pretrained`` writes the adapted model as it is, for a training checkpoint
    that is read back into the same adapted model (``load_state_dict`` or PEFT's ``load_adapter``)."""
    previous = vars(model).get(_ALLOWED, False)
    setattr(model, _ALLOWED, True)
    try:
        yield
    finally:
        setattr(model, _ALLOWED, previous)


class _GuardedSavePretrained:
    """The model's own ``save_pretrained`` behind `save_refusal` (an object, not a bound method, so that the model
    still pickles and deep-copies)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reason = None if vars(self.model).get(_ALLOWED, False) else save_refusal(self.model)
        if reason is not None:
            raise ConfigError(f"save_pretrained refused: {reason} Under transformers.Trainer, "
                              f"scalora.train.callbacks.prepare_trainer(trainer) keeps its checkpoints working.")
        return type(self.model).save_pretrained(self.model, *args, **kwargs)
