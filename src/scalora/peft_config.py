"""PEFT's configuration objects and the fields its Auto classes read, for scalora's adapters.

* `get_peft_model(model, config)` is `apply_lora` under PEFT's name and accepts a ``peft.LoraConfig`` too: its
  fields mean the same in scalora (``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``, ...), so it is
  converted, and a feature scalora lacks (DoRA, ``lora_bias``, ...) is refused by name.
* `peft_task_type(model)` and `base_model_name_or_path(model)` are what ``peft.AutoPeftModelFor*.from_pretrained``
  needs in ``adapter_config.json`` to rebuild the base model: its task (``CAUSAL_LM`` for a ``*ForCausalLM``, ...)
  and where its weights are.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from scalora.config import LoraConfig
from scalora.errors import ConfigError
from scalora.factors import peft_root
from scalora.model import apply_lora

# PEFT's task types and the transformers auto-mapping whose classes they fit, most specific first.
_TASKS = (
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("FEATURE_EXTRACTION", "MODEL_MAPPING_NAMES"),
)


def as_lora_config(config: Any) -> LoraConfig:
    """`config` as a scalora `LoraConfig`: itself, or the conversion of a ``peft.LoraConfig``."""
    if isinstance(config, LoraConfig):
        return config
    peft_type = getattr(config, "peft_type", None)
    if peft_type is None or not callable(getattr(config, "to_dict", None)):
        raise ConfigError(f"config must be a scalora.LoraConfig or a peft.LoraConfig, got {type(config).__name__}.")
    if getattr(peft_type, "value", peft_type) != "LORA":
        raise ConfigError(f"{type(config).__name__} configures PEFT's {getattr(peft_type, 'value', peft_type)} "
                          f"method; scalora adds LoRA adapters: pass a peft.LoraConfig or a scalora.LoraConfig.")
    try:
        return LoraConfig.from_peft_dict(config.to_dict())
    except ConfigError as exc:
        raise ConfigError(f"this peft.LoraConfig cannot be converted: {exc} To keep PEFT's layers, build the model "
                          f"with peft.get_peft_model instead (ScaLoRA trains those too).") from None


def get_peft_model(model: nn.Module, config: Any) -> nn.Module:
    """`scalora.apply_lora` under PEFT's name: adds scalora's layers to `model` in place, from a scalora
    `LoraConfig` or a ``peft.LoraConfig``, and returns the model (not a PEFT wrapper)."""
    return apply_lora(model, as_lora_config(config))


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for `model`'s class (``"CAUSAL_LM"`` for ``LlamaForCausalLM`` or ``GPT2LMHeadModel``,
    ``"SEQ_CLS"`` for ``BertForSequenceClassification``, ...); None for a model transformers does not know."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # transformers is optional: without it no model has a transformers class
        return None
    name = type(peft_root(model)).__name__
    for task, mapping in _TASKS:
        for value in getattr(modeling_auto, mapping).values():
            if name == value or (isinstance(value, tuple) and name in value):
                return task
    return None


def base_model_name_or_path(model: nn.Module) -> str | None:
    """Where `model`'s pre-trained weights came from (the name or folder given to ``from_pretrained``), or None
    for a model built in code."""
    config = getattr(peft_root(model), "config", None)
    return getattr(config, "_name_or_path", None) or None
