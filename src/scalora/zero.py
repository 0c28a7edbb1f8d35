"""ScaLoRA under DeepSpeed ZeRO-2 and ZeRO-3: `ZeroScaLoRA(engine).before_step()` between ``engine.backward(loss)``
and ``engine.step()``.

ZeRO keeps the LoRA factors' gradients, fp32 master weights and AdamW moments in flat partitions spread over the
ranks, outside the parameters (``.grad`` is None), and replaces its client optimiser's parameter groups with those
partitions: ScaLoRA cannot be the client optimiser. Instead, at every scaling step and for every LoRA layer:

1. A (r × in) and B (out × r), their gradients and their moments are gathered whole, in fp32, through DeepSpeed's
   fragment API (``deepspeed.utils.safe_get_full_*``): r·(in + out) numbers each, never W0;
2. ScaLoRA's own step runs on these copies (`scalora.optim.ScaLoRA.rescale`: the same solve, fold and moment
   transform), so every rank solves the same system to the same scales;
3. the rescaled factors go back to the fp32 master and to the working copy, and the rescaled gradients and moments to
   their partitions (``safe_set_full_*``: each rank keeps its own fragment);
4. the fold W0 ← W0 + s·B diag(1 − α⊙β) A: under ZeRO-2 W0 is whole on every rank; under ZeRO-3 each rank adds the
   entries of s·B diag(1 − α⊙β) A that its flat partition ``W0.ds_tensor`` covers, computed from the rows of the
   product that span them, so W0 is never gathered.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from scalora.errors import ConfigError
from scalora.factors import LoraFactors, lora_factors
from scalora.moments import MOMENT_KEYS, check_moments
from scalora.optim import ScalingStats, ScaLoRA
from scalora.rounding import stochastic_round
from scalora.wrapper import OptimizerWrapper

#: the ZeRO stages whose gradients are reduced and partitioned when ``engine.backward`` returns
STAGES = (2, 3)


def partition_span(param: torch.Tensor) -> tuple[int, int]:
    """(start, count): the entries of the flattened whole `param` that this rank's ZeRO-3 partition
    ``param.ds_tensor`` holds in its first `count` entries (the last rank's partition is padded)."""
    size = param.ds_tensor.numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    return start, max(0, min(size, param.ds_numel - start))


def gathered(param: torch.Tensor) -> bool:
    """True when a ZeRO-3 `param` is present whole on this rank (a persistent or gathered parameter)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


class GatheredFactors(LoraFactors):
    """One LoRA layer under ZeRO, seen whole: its factors are fp32 copies gathered from the engine (with their
    gradients), its base weight the layer's own W0 (whole under ZeRO-2, this rank's flat partition under ZeRO-3)."""

    def __init__(self, layer: LoraFactors, partitioned: bool) -> None:
        super().__init__(layer.module)
        self.layer = layer
        self.partitioned = partitioned
        real = (layer.lora_A, layer.lora_B)
        shapes = [p.ds_shape if partitioned else p.shape for p in real]
        self._A, self._B = (nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=p.device))
                            for shape, p in zip(shapes, real, strict=True))

    @property
    def pairs(self) -> tuple[tuple[torch.Tensor, nn.Parameter], ...]:
        """(the engine's parameter, its gathered copy) for A and B."""
        return (self.layer.lora_A, self._A), (self.layer.lora_B, self._B)

    @property
    def lora_A(self) -> torch.Tensor:
        return self._A

    @property
    def lora_B(self) -> torch.Tensor:
        return self._B

    @property
    def scaling(self) -> float:
        return self.layer.scaling

    @property
    def active(self) -> bool:
        return self.layer.active

    @property
    def embedding(self) -> bool:
        return self.layer.embedding

    @property
    def fan_in_fan_out(self) -> bool:
        return self.layer.fan_in_fan_out

    @property
    def base_in_state_dict(self) -> bool:
        return self.layer.base_in_state_dict

    @property
    def alpha_vector(self) -> torch.Tensor | None:
        return self.layer.alpha_vector

    @property
    def base_compensation(self) -> torch.Tensor | None:
        return self.layer.base_compensation

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def enable_compensation(self, dtype: torch.dtype | None = None) -> None:
        self.layer.enable_compensation(dtype)

    def reset_lora_parameters(self) -> None:
        raise NotImplementedError("ReLoRA's restarts are not supported under DeepSpeed ZeRO.")

    @property
    def _whole(self) -> bool:
        """True when W0 is whole on this rank (ZeRO-2, or a persistent ZeRO-3 parameter)."""
        return not self.partitioned or gathered(self.weight)

    def fold_(self, B: torch.Tensor, A: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """W0 ← W0 + B A; under ZeRO-3 on this rank's partition (and on the whole W0 where it is present, every rank
        then computing the same sum, of which the partition keeps its span)."""
        weight = self.weight
        if self._whole:
            self.layer.fold_(B, A, generator)
            if self.partitioned:
                start, count = partition_span(weight)
                weight.ds_tensor[:count].copy_(weight.data.flatten()[start:start + count])
            return
        start, count = partition_span(weight)
        target = weight.ds_tensor[:count]
        exact = target.to(torch.promote_types(target.dtype, torch.float32)) + self._span(B, A, start, count)
        if generator is not None and exact.dtype != target.dtype:
            exact = stochastic_round(exact, target.dtype, generator)
        target.copy_(exact)

    def _span(self, B: torch.Tensor, A: torch.Tensor, start: int, count: int) -> torch.Tensor:
        """Entries start … start + count of B A flattened in W0's stored layout, from the rows that span them."""
        left, right = (A.t(), B.t()) if self.fan_in_fan_out else (B, A)
        cols = right.shape[1]
        first, last = start // cols, -(-(start + count) // cols)
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        rows = left[first:last].to(dtype) @ right.to(dtype)
        offset = start - first * cols
        return rows.flatten()[offset:offset + count]

    def fold_finite(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Only fp16 bases are checked, and `ZeroScaLoRA` refuses fp16 engines: reached under ZeRO-2 only."""
        if not self._whole:
            raise NotImplementedError("checking a fold into a partitioned fp16 base weight (ZeRO-3 with fp16).")
        return self.layer.fold_finite(B, A)


class _GatheredScaLoRA(ScaLoRA):
    """ScaLoRA acting on gathered copies of the layers (`GatheredFactors`) and an optimiser over them that holds the
    gathered moments; it is never stepped, only `rescale` runs."""

    def __init__(self, views: list[tuple[str, LoraFactors]], model: nn.Module, optimizer: torch.optim.Optimizer,
                 **settings: Any) -> None:
        self._views = views
        super().__init__(model, optimizer, **settings)

    def find_layers(self, model: nn.Module) -> list[tuple[str, LoraFactors]]:
        return self._views


class ZeroScaLoRA:
    """ScaLoRA for a DeepSpeed engine under ZeRO-2 or ZeRO-3, in bf16 or fp32.

    ``deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), ...), config=...)`` with the
    plain optimiser (torch's Adam or AdamW), then ``scalora = ZeroScaLoRA(engine, **settings)`` with ScaLoRA's settings
    (`scalora.optim.ScaLoRA`: interval, rule, c, tau, mode, transfer_moments, compensate) and, every micro-step::

        engine.backward(loss)
        scalora.before_step()    # rescales at the gradient-accumulation boundary, every `interval` steps
        engine.step()

    Steps are the engine's (``engine.global_steps``), so a run resumed from a DeepSpeed checkpoint keeps its
    `interval` and its rounding seeds. `last_stats` tells what the latest scaling step did.
    """

    def __init__(self, engine: Any, **settings: Any) -> None:
        stage = engine.zero_optimization_stage()
        if stage not in STAGES:
            raise ConfigError(f"ZeroScaLoRA supports ZeRO stages {' and '.join(map(str, STAGES))}, not stage {stage}: "
                              f"set zero_optimization.stage in the DeepSpeed config (or train under DDP with "
                              f"scalora.optim.ScaLoRA).")
        if engine.fp16_enabled():
            raise ConfigError("ZeroScaLoRA does not support DeepSpeed's fp16 mode (its gradients carry the loss scale "
                              "and overflowing steps are skipped): use bf16 or fp32.")
        self.engine = engine
        self.partitioned = stage == 3
        client = engine.optimizer.optimizer
        if isinstance(client, OptimizerWrapper):
            raise ConfigError(f"the engine's client optimiser is {type(client).__name__}: pass the plain optimiser "
                              f"(torch.optim.AdamW) to deepspeed.initialize; ZeroScaLoRA does ScaLoRA's part.")
        if settings.get("compensate") and self.partitioned:
            raise ConfigError("compensate=True or 'int8' keeps a buffer the size of each whole base weight, which "
                              "ZeRO-3 partitions: leave compensate unset (stochastic rounding), or use ZeRO-2.")
        self._views = [(name, GatheredFactors(layer, self.partitioned)) for name, layer in lora_factors(engine.module)]
        #: per gathered copy: the engine's parameter, and the index of its flat partition (`_flat`)
        self._sources: dict[nn.Parameter, tuple[torch.Tensor, int]] = {}
        groups: dict[int, list[nn.Parameter]] = {}
        for _, view in self._views:
            for real, copy in view.pairs:
                flat = self._flat_index(real)
                self._sources[copy] = (real, flat)
                groups.setdefault(self._group_index(flat), []).append(copy)
        self._groups = list(groups)  # client group index of each of the gathered optimiser's groups
        optimizer = type(client)([{**self._hyper(index), "params": params} for index, params in groups.items()])
        self.scalora = _GatheredScaLoRA(self._views, engine.module, optimizer, **settings)

    @property
    def last_stats(self) -> ScalingStats:
        return self.scalora.last_stats

    def _flat_index(self, param: torch.Tensor) -> int:
        """Which of the engine's flat fp32 partitions (one per parameter group, ZeRO-3: sub-group) holds `param`."""
        zero = self.engine.optimizer
        if self.partitioned:
            position = zero.grad_position.get(zero.get_param_id(param)) if param.requires_grad else None
            index = None if position is None else position[0]
        else:
            index = next((i for i, group in enumerate(zero.bit16_groups) if any(p is param for p in group)), None)
        if index is None:
            raise ConfigError("the DeepSpeed engine's optimiser does not update every LoRA factor; build it over "
                              "model.parameters() (or every lora_A / lora_B) with the factors trainable.")
        return index

    def _flat(self, index: int) -> torch.Tensor:
        zero = self.engine.optimizer
        return (zero.fp32_partitioned_groups_flat if self.partitioned else zero.single_partition_of_fp32_groups)[index]

    def _group_index(self, flat: int) -> int:
        """The client optimiser's parameter group of flat partition `flat`."""
        return self.engine.optimizer.sub_group_to_group_id[flat] if self.partitioned else flat

    def _hyper(self, index: int) -> dict[str, Any]:
        """The hyperparameters (lr, betas, ...) of the client optimiser's parameter group `index`, as they are now."""
        return {key: value for key, value in self.engine.optimizer.optimizer.param_groups[index].items()
                if key != "params"}

    def before_step(self) -> ScalingStats | None:
        """Call between ``engine.backward(loss)`` and ``engine.step()``: at a gradient-accumulation boundary, every
        `interval` steps, rescales (`rescale`); the statistics of a scaling step, else None."""
        if not self.engine.is_gradient_accumulation_boundary():
            return None
        if (self.engine.global_steps + 1) % self.scalora.interval:  # the step engine.step() is about to take
            return None
        return self.rescale()

    @torch.no_grad()
    def rescale(self) -> ScalingStats:
        """Gather every layer's factors, gradients and moments, run ScaLoRA's step on them, write everything back."""
        from deepspeed.utils import (
            safe_get_full_fp32_param,
            safe_get_full_grad,
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_grad,
            safe_set_full_optimizer_state,
        )

        client = self.engine.optimizer.optimizer
        inner = self.scalora.optimizer
        self.scalora.num_steps = self.engine.global_steps + 1  # seeds the stochastic rounding of its folds
        for group, index in zip(inner.param_groups, self._groups, strict=True):
            group.update(self._hyper(index))  # the learning rate of a scheduler, among others
        for copy, (real, flat) in self._sources.items():
            copy.copy_(safe_get_full_fp32_param(real).view_as(copy))
            copy.grad = safe_get_full_grad(real).float().view_as(copy)
            state = client.state.get(self._flat(flat), {})
            check_moments(state)
            inner.state[copy] = {key: safe_get_full_optimizer_state(real, key).view_as(copy)
                                 for key in MOMENT_KEYS if isinstance(state.get(key), torch.Tensor)}
            if "step" in state:
                inner.state[copy]["step"] = state["step"]
        stats = self.scalora.rescale()
        for copy, (real, _) in self._sources.items():
            safe_set_full_fp32_param(real, copy)
            self._write_working(real, copy)
            safe_set_full_grad(real, copy.grad)
            for key, value in inner.state[copy].items():
                if key in MOMENT_KEYS:
                    safe_set_full_optimizer_state(real, value, key)
        inner.state.clear()
        return stats

    def _write_working(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """The engine's working copy of `param` (bf16 or fp32) ← `value`: whole under ZeRO-2; under ZeRO-3 this
        rank's partition, and the whole parameter where it is present."""
        if not self.partitioned:
            param.data.copy_(value)
            return
        start, count = partition_span(param)
        param.ds_tensor[:count].copy_(value.flatten()[start:start + count])
        if gathered(param):
            param.data.copy_(value)
