"""scalora: low-rank adapters whose scaling is principled (LoRA, rsLoRA, α-LoRA, ScaLoRA)."""

from scalora.alpha_lora import AlphaScheduler, adapter_parameters
from scalora.config import LoraConfig, lora_scaling
from scalora.errors import AdapterFileError, ConfigError, ScaloraError
from scalora.factors import LoraFactors, lora_factors
from scalora.layers import LoraLayer
from scalora.model import (
    apply_lora,
    disable_adapters,
    lora_layers,
    merge,
    print_trainable_parameters,
    targetable_modules,
    trainable_parameters,
    unmerge,
)
from scalora.optim import ScaLoRA
from scalora.peft_config import get_peft_model
from scalora.peft_format import load_adapter, save_adapter
from scalora.rank import effective_rank, export_lora, snapshot_base_weights, update_ranks
from scalora.relora import ReLoRA

merge_and_unload = merge

__all__ = [
    "AdapterFileError",
    "AlphaScheduler",
    "ReLoRA",
    "ScaLoRA",
    "adapter_parameters",
    "effective_rank",
    "export_lora",
    "snapshot_base_weights",
    "update_ranks",
    "ConfigError",
    "LoraConfig",
    "LoraFactors",
    "LoraLayer",
    "ScaloraError",
    "apply_lora",
    "disable_adapters",
    "get_peft_model",
    "load_adapter",
    "lora_factors",
    "lora_layers",
    "lora_scaling",
    "merge",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "targetable_modules",
    "trainable_parameters",
    "unmerge",
]
__version__ = "0.1.0"
