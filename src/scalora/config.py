"""`LoraConfig`: PEFT's vocabulary, validated, and its round trip through `adapter_config.json`.

A LoRA layer computes ``y = a ⊙ (W0 x + b0) + s · B A x`` with ``s = lora_alpha / r`` (LoRA) or
``s = lora_alpha / √r`` (rsLoRA, ``use_rslora=True``); ``a`` is α-LoRA's learned row scaling of the frozen base
(``alpha_vector=True``), fixed to 1 otherwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from scalora.errors import ConfigError

ALL_LINEAR = "all-linear"

# PEFT fields we read and write but that carry no meaning for scalora when they hold these neutral values.
_PEFT_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "peft_type": ("LORA",),
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "layers_to_transform": (None, []),
    "layers_pattern": (None, [], ""),
    "layer_replication": (None,),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "megatron_config": (None,),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "loftq_config": ({}, None),
    "eva_config": (None,),
    "corda_config": (None,),
    "lora_ga_config": (None,),
    "kasa_config": (None,),
    "monteclora_config": (None,),
    "arrow_config": (None,),
    "velora_config": (None,),
    "alora_invocation_tokens": (None,),
}
# PEFT fields that are bookkeeping only: accepted with any value and not kept.
_PEFT_IGNORED = {
    "auto_mapping", "base_model_class", "parent_library", "revision", "inference_mode", "peft_version",
    "fan_in_fan_out", "megatron_core", "qalora_group_size", "ensure_weight_tying", "runtime_config",
}
# Keys scalora writes into adapter_config.json beside PEFT's, under this one entry (PEFT ignores it).
SCALORA_KEY = "scalora"


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """The scale s of the update s·BA: ``lora_alpha / r`` (LoRA) or ``lora_alpha / √r`` (rsLoRA)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rule for `rank_pattern` / `alpha_pattern`: the first key whose regex matches the end of the name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _name_matches(spec: str | list[str], module_name: str) -> bool:
    """PEFT's rule: a string is a regex matched against the whole name; a list matches a name or its suffix."""
    if isinstance(spec, str):
        return re.fullmatch(spec, module_name) is not None
    return module_name in spec or any(module_name.endswith(f".{key}") for key in spec)


@dataclass
class LoraConfig:
    """Which modules get adapters and how their update is scaled.

    Args:
        r: rank of the update B A (B: out × r, A: r × in).
        lora_alpha: numerator of the scale s (s = lora_alpha / r, or / √r with `use_rslora`).
        lora_dropout: dropout applied to the adapter's input, in [0, 1).
        target_modules: module names or suffixes (list), a regex matched against the whole name (str),
            or ``"all-linear"``: every ``nn.Linear`` / GPT-2 ``Conv1D`` except the output head.
        exclude_modules: names (list) or a regex (str) never to adapt.
        use_rslora: rank-stabilised scale s = lora_alpha / √r.
        alpha_vector: α-LoRA: learn a vector a (init 1) rescaling the rows and bias of each frozen base weight.
        init_lora_weights: ``True`` (A Kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r²), B = 0),
            or ``False`` (both random: the adapter is not a no-op; for tests).
        modules_to_save: modules (names or suffixes) trained in full and saved with the adapter.
        rank_pattern / alpha_pattern: per-module overrides of r / lora_alpha, keyed by regex (PEFT's rule).
        bias: only ``"none"`` (biases stay frozen).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    alpha_vector: bool = False
    init_lora_weights: bool | Literal["gaussian"] = True
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: Literal["none"] = "none"
    base_model_name_or_path: str | None = None
    task_type: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
        _check_positive_int("r", self.r)
        _check_positive_number("lora_alpha", self.lora_alpha)
        if isinstance(self.lora_dropout, bool) or not (
            isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0
        ):
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.target_modules is None or (isinstance(self.target_modules, list) and len(self.target_modules) == 0):
            raise ConfigError(
                "target_modules is empty: name the modules to adapt, e.g. target_modules=['q_proj', 'v_proj'], "
                "a regex, or 'all-linear'."
            )
        for name in ("target_modules", "exclude_modules"):
            _check_name_spec(name, getattr(self, name))
        if self.modules_to_save is not None and not _is_str_list(self.modules_to_save):
            raise ConfigError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}.")
        for name in ("use_rslora", "alpha_vector"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(
                f"init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}."
            )
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported: scalora keeps biases frozen (bias='none').")
        for name, check in (("rank_pattern", _check_positive_int), ("alpha_pattern", _check_positive_number)):
            patterns = getattr(self, name)
            if not isinstance(patterns, dict):
                raise ConfigError(f"{name} must be a dict from a module-name regex to a value, e.g. "
                                  f"{{'q_proj': 16}}; got {type(patterns).__name__}.")
            for key, value in patterns.items():
                if not isinstance(key, str):
                    raise ConfigError(f"{name} keys must be module-name regexes (strings), got {key!r}.")
                _check_name_spec(f"{name} key", key)
                check(f"{name}[{key!r}]", value)
        for name in ("base_model_name_or_path", "task_type"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string or None, got {getattr(self, name)!r}.")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        return pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.rank_for(module_name), self.alpha_for(module_name), self.use_rslora)

    def is_target(self, module_name: str) -> bool:
        """True if `module_name` is named by target_modules and not by exclude_modules or modules_to_save."""
        if self.exclude_modules and _name_matches(self.exclude_modules, module_name):
            return False
        if self.modules_to_save and any(
            re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module_name) for m in self.modules_to_save
        ):
            return False
        if self.target_modules == ALL_LINEAR:
            return True  # the layer type and the output head are checked by the caller
        return _name_matches(self.target_modules, module_name)

    def is_module_to_save(self, module_name: str) -> bool:
        return bool(self.modules_to_save) and _name_matches(self.modules_to_save, module_name)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Build from scalora's own dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoraConfig field(s) {unknown}; valid fields are {sorted(known)}.")
        return cls(**data)

    def to_peft_dict(self) -> dict[str, Any]:
        """The `adapter_config.json` contents, in PEFT's field names (α-LoRA's flag under the "scalora" key)."""
        d = self.to_dict()
        alpha_vector = d.pop("alpha_vector")
        d.update(
            peft_type="LORA",
            use_dora=False,
            fan_in_fan_out=False,
            inference_mode=True,
            layers_to_transform=None,
            layers_pattern=None,
            lora_bias=False,
        )
        d[SCALORA_KEY] = {"alpha_vector": alpha_vector}
        return d

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> LoraConfig:
        """Read a PEFT `adapter_config.json` dict. Features scalora cannot honour are an error, never ignored."""
        data = dict(data)
        extra = data.pop(SCALORA_KEY, None) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"the {SCALORA_KEY!r} entry must be an object, got {extra!r}.")
        for key, neutral in _PEFT_NEUTRAL.items():
            if key in data:
                value = data.pop(key)
                if value not in neutral:
                    raise ConfigError(
                        f"this adapter uses PEFT's {key}={value!r}, which scalora does not support; "
                        f"load it with PEFT, or retrain it with scalora."
                    )
        for key in _PEFT_IGNORED:
            data.pop(key, None)
        data["alpha_vector"] = bool(extra.get("alpha_vector", False))
        for key in ("rank_pattern", "alpha_pattern"):
            if data.get(key) is None:
                data[key] = {}
        return cls.from_dict(data)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}.")


def _check_positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{name} must be a positive number, got {value!r}.")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _check_name_spec(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value == ALL_LINEAR and name == "target_modules":
            return
        try:
            re.compile(value)
        except (re.error, RecursionError, OverflowError) as exc:
            raise ConfigError(f"{name}={value!r} is not a valid regular expression: {exc}.") from None
        return
    if not _is_str_list(value):
        raise ConfigError(f"{name} must be a list of module names or a regex string, got {value!r}.")
