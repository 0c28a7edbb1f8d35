"""`ScaLoRA`: wraps any Adam-family optimiser with ScaLoRA's optimally scaled, accumulated low-rank steps.

Before the wrapped optimiser's ordinary step, every `interval` steps and for every LoRA layer (docs/scalora.md):

1. solve the optimal scales α (``scale_B``, the columns of B) and β (``scale_A``, the rows of A) from A, B and their
   gradients
   (`scalora.scaling_problem`, `scalora.solver`, batched over layers of one shape);
2. merge the residual into the frozen weight, W0 ← W0 + s B diag(1 − α⊙β) A, so W is unchanged;
3. rescale B ← B diag(α), A ← diag(β) A, their gradients g_B ← g_B diag(β), g_A ← diag(α) g_A, and the
   optimiser's moments the same way (`scalora.moments`): no reset, no warm-up.

With α = β = 1 this is exactly LoRA; over many steps the merged residuals add up to a high-rank update.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from scalora.directions import next_directions, scale_invariant
from scalora.errors import ConfigError
from scalora.moments import check_moments, check_transformable, scale_moments
from scalora.scaling_problem import optimizer_system, scaling_system
from scalora.sharded import is_sharded, local, local_rows, local_state, sum_partial, whole, whole_stacked
from scalora.side_branch import SideBranch, compress
from scalora.solver import (
    AUTO_RULES,
    COLUMN,
    DEFAULT_FACTOR_NORM,
    DEFAULT_TAU,
    IDENTITY,
    MODES,
    SCALAR,
    Scales,
    solve_system,
)
from scalora.wrapper import OptimizerWrapper

RULES = ("optimizer", "paper")
COMPENSATIONS = (None, False, True, "int8")
"""The values of ``compensate`` (`ScaLoRA`): stochastic rounding, to nearest, a Kahan buffer, an int8 one."""

#: why a scaling step that finds no gradient is refused: it would pass silently as a plain LoRA step
NO_GRADIENTS = ("ScaLoRA step {step} found no LoRA layer with gradients, so it cannot scale anything and the run "
                "would silently be plain LoRA. Call loss.backward() before optimizer.step(). Under DeepSpeed ZeRO the "
                "gradients live in the engine's partitions, not in .grad: pass the plain optimiser to "
                "deepspeed.initialize and call scalora.zero.ZeroScaLoRA(engine).before_step() between "
                "engine.backward(loss) and engine.step().")


#: the statistics of a scaling step, after `step` and `layers`, and their values before any layer was solved
_STAT_FIELDS = {"column": 0.0, "scalar": 0.0, "identity": 0.0, "alpha_mean": 1.0, "alpha_std": 0.0,
                "beta_mean": 1.0, "beta_std": 0.0, "refused": 0.0, "side_residual": 0.0}


class ScalingStats:
    """What a scaling step did: fractions of `layers` solved by column / scalar / identity scaling, and the mean and
    spread (population standard deviation) of the scales over all their entries: ``alpha_*`` of α (``scale_B``, the
    columns of lora_B), ``beta_*`` of β (``scale_A``, the rows of lora_A), the names written to metrics.jsonl.

    ``refused`` is the fraction of layers whose fold would have overflowed their fp16 base weight: those were left
    untouched for the step (and named in a warning when the statistics are read).

    ``side_residual`` is, over the layers with a quantised base, the largest relative residual of the side branch
    (`scalora.side_branch.SideBranch.residual`): what recompressions cut, over what the branch holds; 0 while every
    branch holds the exact sum of its folds.

    `step` and `layers` are known on the host. The other fields (``column``, ``scalar``, ``identity``,
    ``alpha_mean``, ``alpha_std``, ``beta_mean``, ``beta_std``, ``refused``, ``side_residual``) stay on the device
    as one tensor until one of them, or `as_dict`, is read: that read is the step's only host–device
    synchronisation, and a step whose statistics nobody reads makes none.
    """

    def __init__(self, step: int = 0, layers: int = 0, values: torch.Tensor | None = None,
                 refused: list[tuple[str, torch.Tensor]] | None = None) -> None:
        self.step = step
        self.layers = layers
        self._values = values  # (9,) in the order of _STAT_FIELDS; None: nothing solved
        self._refused = refused or []  # (layer name, 0-dim bool "its fold was refused") of the fp16 layers
        self._host: dict[str, float] | None = None

    def __getattr__(self, name: str) -> float:
        if name not in _STAT_FIELDS:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return self._read()[name]

    def _read(self) -> dict[str, float]:
        if self._host is None:
            values = _STAT_FIELDS.values() if self._values is None else self._values.tolist()
            self._host = dict(zip(_STAT_FIELDS, values, strict=True))
            if self._host["refused"] > 0:
                names = [repr(name) for name, flag in self._refused if bool(flag)]
                warnings.warn(f"ScaLoRA step {self.step}: the fold into the fp16 base weight of {', '.join(names)} "
                              f"would overflow (inf), so those layers were left unchanged for this step. Lower the "
                              f"learning rate, or keep the base in bf16 / fp32.", RuntimeWarning, stacklevel=3)
        return self._host

    def as_dict(self, prefix: str = "scalora/") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in {"step": self.step, "layers": self.layers, **self._read()}.items()}

    def __repr__(self) -> str:
        return f"ScalingStats({', '.join(f'{k}={v:g}' for k, v in self.as_dict('').items())})"


class ScaLoRA(OptimizerWrapper):
    """ScaLoRA around an existing optimiser: ``ScaLoRA(model, torch.optim.AdamW(...), interval=1, c=1.0)``.

    Args:
        model: the model with LoRA layers, scalora's (``scalora.apply_lora``) or PEFT's (``peft.get_peft_model``,
            its active adapter), possibly wrapped in DDP.
        optimizer: the optimiser over the model's trainable parameters (SGD or an Adam-family torch optimiser, or a
            subclass: their moments transform exactly; others, bitsandbytes' 8-bit and paged ones included, are
            refused with the reason).
        interval: rescale every `interval` optimiser steps (ScaLoRA-I); steps are counted from 1, so a run shorter
            than `interval` is plain LoRA.
        rule: ``"optimizer"`` (default) fits the step the wrapped optimiser will actually take (Adam's step is
            linear in the scales); ``"paper"`` is the published closed form, which assumes a plain gradient step.
        c: c = L·η of the scaling problem (larger c → smaller scales), or chosen per layer and step (optimiser-aware
            rule with an Adam-type optimiser): ``"lora-step"`` (also ``"auto"``, the default there) makes the fitted
            step as large as LoRA's step from factors of norm `factor_norm`, so LoRA's learning rate serves ScaLoRA
            (`scalora.scaling_problem.lora_step_c`); ``"first-order"`` takes the smallest factors whose step stays
            first-order accurate, second- to first-order ratio `tau` (`scalora.scaling_problem.first_order_c`; its
            step grows like the square of the learning rate). Default otherwise: 1.0 (the paper's setting).
        tau: the ratio of second- to first-order change that ``c="first-order"`` allows.
        factor_norm: the factor norm ρ of ``c="lora-step"`` (default 1/√3, the norm of a row of LoRA's initial A).
        mode: ``"column"`` (per-column scales, scalar fallback) or ``"scalar"`` (one scale per factor).
        transfer_moments: transform the optimiser's moments with the scales (the paper's ablation turns it off).
        compensate: how folds into a bf16 / fp16 base weight are rounded. ``None`` (default): stochastically
            (`scalora.rounding`), which adds no memory and loses nothing on average; ``True``: Kahan-compensated, the
            rounding error kept in a buffer the size of each adapted weight (the exact sum, for twice the weights'
            memory); ``"int8"``: the same in one byte per entry, in 1/254ths of the weight's spacing, rounded
            stochastically (`scalora.compensation`: within a few percent of the exact sum's rounding floor, for
            1.5× the weights' memory); ``False``: to nearest (tiny folds vanish). ``benchmarks/bf16_drift.py``
            measures them all.
        side_rank: the capacity k of the side branch that takes the folds of every layer with a quantised base
            (`scalora.side_branch`, docs/quantised.md): above it the branch is recompressed to its best rank-k
            approximation and the cut is reported (``last_stats.side_residual``). Default: 4·r of each layer.

    Under FSDP2 (`fully_shard`) each rank solves from its shards (`scalora.sharded`); FSDP1 is refused.

    Behaves as a torch optimiser (`param_groups`, `zero_grad`, `state_dict`, LR schedulers, GradScaler,
    ``transformers.Trainer``); `last_stats` tells what the latest scaling step did.
    """

    supports_fsdp2 = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        interval: int = 1,
        rule: str = "optimizer",
        c: float | str | None = None,
        tau: float = DEFAULT_TAU,
        factor_norm: float = DEFAULT_FACTOR_NORM,
        mode: str = "column",
        transfer_moments: bool = True,
        compensate: bool | str | None = None,
        side_rank: int | None = None,
    ) -> None:
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"interval must be a positive integer, got {interval!r}.")
        if rule not in RULES:
            raise ConfigError(f"rule must be one of {RULES}, got {rule!r}.")
        if not (c is None or c == "auto" or c in AUTO_RULES or (isinstance(c, (int, float)) and not isinstance(c, bool)
                                                               and c > 0 and math.isfinite(c))):
            raise ConfigError(f"c must be a positive number, 'auto' or one of {AUTO_RULES}, got {c!r}.")
        for name, value in (("tau", tau), ("factor_norm", factor_norm)):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise ConfigError(f"{name} must be a positive number, got {value!r}.")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {mode!r}.")
        if compensate not in COMPENSATIONS:
            raise ConfigError(f"compensate must be one of {COMPENSATIONS}, got {compensate!r}.")
        if side_rank is not None and (isinstance(side_rank, bool) or not isinstance(side_rank, int) or side_rank < 1):
            raise ConfigError(f"side_rank must be a positive integer or None, got {side_rank!r}.")
        super().__init__(model, optimizer)
        check_transformable(optimizer)
        self.power = 2
        if rule == "optimizer":
            self.power = 1 if scale_invariant(optimizer) else 2
        if c is None:
            c = "auto" if self.power == 1 else 1.0
        if c == "auto":
            c = AUTO_RULES[0]
        if c in AUTO_RULES and self.power != 1:
            raise ConfigError(f"c={c!r} needs the optimiser-aware rule with an Adam-type optimiser (its step does not "
                              "depend on the size of the factors); pass a number c.")
        for name, layer in self.layers:
            if layer.alpha_vector is not None:
                raise ConfigError(f"layer {name!r} has an α vector: ScaLoRA and α-LoRA cannot be combined.")
            if layer.side_branch is not None and side_rank is not None:
                layer.side_branch.capacity = side_rank
        self._check_sharded(bool(compensate))
        self._sharding_checked = False  # checked again at the first scaling step: accelerate shards after this
        self.interval = interval
        self.rule = rule
        self.c: float | str = c if isinstance(c, str) else float(c)
        self.tau = float(tau)
        self.factor_norm = float(factor_norm)
        self.mode = mode
        self.transfer_moments = transfer_moments
        self.side_rank = side_rank
        self._identity_total: int | torch.Tensor = 0  # a device tensor once a step ran: read through identity_total
        self._scalings: dict[tuple, torch.Tensor] = {}  # per shape group and device: the layers' s, on that device
        self.last_stats = ScalingStats()
        self.compensate = compensate
        if compensate:
            for _, layer in self.layers:
                layer.enable_compensation(torch.int8 if compensate == "int8" else None)
        #: layers whose folds round stochastically: half-precision bases unless `compensate` says otherwise (the
        #: weight itself), and every layer with an int8 compensation (its residual)
        self._stochastic = frozenset(i for i, (_, layer) in enumerate(self.layers) if compensate == "int8" or (
            compensate is None and layer.weight.dtype in (torch.float16, torch.bfloat16)))

    def _check_sharded(self, compensate: bool) -> None:
        """Refuse layers sharded by FSDP2 that ScaLoRA folds only unsharded: a quantised base (its side branch) and
        a compensation buffer (`compensate`, or one already kept)."""
        for name, layer in self.layers:
            if not (is_sharded(layer.weight) or is_sharded(layer.lora_B)):
                continue
            if layer.side_branch is not None:
                raise ConfigError(f"layer {name!r} has a quantised base and is sharded by FSDP2; ScaLoRA keeps the "
                                  f"folds of quantised bases only unsharded: train it under DDP.")
            if compensate or layer.base_compensation is not None:
                raise ConfigError(f"layer {name!r} is sharded by FSDP2 and needs a compensation buffer "
                                  f"(compensate=True or 'int8'), which ScaLoRA supports only unsharded: leave "
                                  f"compensate unset (stochastic rounding), or train it under DDP.")

    def __repr__(self) -> str:
        return (f"ScaLoRA(interval={self.interval}, rule={self.rule!r}, c={self.c!r}, tau={self.tau}, "
                f"factor_norm={self.factor_norm:.4g}, mode={self.mode!r}, transfer_moments={self.transfer_moments}, "
                f"optimizer={self.optimizer!r})")

    def before_step(self) -> None:
        if self.num_steps % self.interval == 0:
            self.rescale()

    @property
    def identity_total(self) -> int:
        """How many layer solves of all scaling steps so far kept the identity (reading it synchronises)."""
        return int(self._identity_total)

    @torch.no_grad()
    def rescale(self) -> ScalingStats:
        """Solve α, β for every layer with gradients, merge the residual, rescale factors, gradients, moments.
        A step with no layer with gradients is refused (`ConfigError`).

        No host–device synchronisation: layers whose solve is the identity go through the same arithmetic with
        their fold masked to zero, and the statistics stay on the device until read (`ScalingStats`). Side branches
        of quantised bases that the folds took above their capacity are recompressed (`scalora.side_branch.compress`).
        """
        if not self._sharding_checked:
            self._check_sharded(False)
            self._sharding_checked = True
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (_, layer) in enumerate(self.layers):
            A, B = layer.lora_A, layer.lora_B
            if A.grad is None or B.grad is None:
                continue
            # layers of one shape and one pair of parameter groups (so one learning rate) are solved together
            key = (tuple(A.shape), tuple(B.shape), A.dtype, A.device, id(group_of[id(A)]), id(group_of[id(B)]))
            groups[key].append(i)
        if not groups:
            raise ConfigError(NO_GRADIENTS.format(step=self.num_steps))
        kinds, scales_B, scales_A = [], [], []
        refused: list[tuple[str, torch.Tensor]] = []
        built = []  # per group: its layer indices, its system (this rank's part under FSDP2), A whole, B local
        batches: dict[tuple, list[int]] = defaultdict(list)  # groups whose systems are solved in one batch
        for indices in groups.values():
            first = self.layers[indices[0]][1]
            group_A, group_B = group_of[id(first.lora_A)], group_of[id(first.lora_B)]
            system, A, B = self._system(tuple(indices), group_A, group_B)
            # systems of one size (2r), dtype and learning rate (and, under FSDP2, mesh) stack, whatever the shapes
            mesh = id(first.lora_B.device_mesh) if is_sharded(first.lora_B) else None
            batches[(system[0].shape[-1], system[0].dtype, system[0].device, group_A["lr"], mesh)].append(len(built))
            built.append((tuple(indices), system, A, B))
        for (_, _, _, lr, _), members in batches.items():
            scales = self._solve([built[j][0] for j in members], [built[j][1] for j in members], lr)
            for j, part in zip(members, scales, strict=True):
                indices, _, A, B = built[j]
                refused += self._apply(indices, A, B, part)
                kinds.append(part.kind)
                scales_B.append(part.scale_B.flatten())
                scales_A.append(part.scale_A.flatten())
        branches = [layer.side_branch for _, layer in self.layers if layer.side_branch is not None]
        compress(branches)
        self.last_stats = self._stats(kinds, scales_B, scales_A, refused, branches)
        return self.last_stats

    def _fold_generator(self, index: int) -> torch.Generator | None:
        """The random numbers for layer `index`'s stochastically rounded fold at this step, None when its folds are
        not rounded so. Seeded by step and layer: a resumed run draws the same ones, with nothing saved."""
        if index not in self._stochastic:
            return None
        generator = torch.Generator(device=self.layers[index][1].weight.device)
        generator.manual_seed(self.num_steps * len(self.layers) + index)
        return generator

    def _scaling(self, indices: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The scales s of the layers `indices` as a float64 tensor on `device`, built once and kept."""
        key = (indices, device)
        if key not in self._scalings:
            self._scalings[key] = torch.tensor([self.layers[i][1].scaling for i in indices], dtype=torch.float64,
                                               device=device)
        return self._scalings[key]

    def _system(self, indices: tuple[int, ...], group_A: dict, group_B: dict
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """The system (H, λ, ‖U_B U_A‖², squared factor norms; the last two None where the rule needs none) of the
        layers `indices` of one shape (and one pair of parameter groups `group_A`, `group_B` of their lora_A and
        lora_B), by the paper's rule or from the wrapped optimiser's next step; and, for the folds, their lora_A
        stacked whole (gathered under FSDP2) and their lora_B stacked (this rank's rows)."""
        layers = [self.layers[i][1] for i in indices]
        # under FSDP2, A whole and B's local rows: the system is then this rank's partial sum (`scalora.sharded`);
        # A, its gradient and its direction are gathered in one call
        A_side = [layer.lora_A for layer in layers] + [layer.lora_A.grad for layer in layers]
        if self.rule == "optimizer":
            A_side += list(next_directions(self.optimizer, group_A, [layer.lora_A for layer in layers]))
        A, grad_A, *dirs_A = whole_stacked(A_side).split(len(layers))
        B = torch.stack([local(layer.lora_B) for layer in layers])
        grad_B = torch.stack([local(layer.lora_B.grad) for layer in layers])
        if self.rule == "paper":
            return (*scaling_system(A, B, grad_A, grad_B), None, None), A, B
        # U_B in units of lora_A's learning rate, so that one η serves the layer (LoRA+ has two)
        ratio = group_B["lr"] / group_A["lr"] if group_A["lr"] else 1.0
        dirs_B = next_directions(self.optimizer, group_B, [layer.lora_B for layer in layers])
        if ratio != 1.0:
            dirs_B.mul_(ratio)
        return optimizer_system(A, B, grad_A, grad_B, dirs_A[0], dirs_B), A, B

    def _solve(self, groups: list[tuple[int, ...]], systems: list[tuple[torch.Tensor, ...]], lr: float
               ) -> list[Scales]:
        """The scales of several groups of layers, from their systems (of one size, dtype and learning rate `lr`)
        stacked into one batched solve (and, under FSDP2, summed over the ranks in one all-reduce); one `Scales`
        per group."""
        H, lam, second, norms = (None if parts[0] is None else parts[0] if len(parts) == 1 else torch.cat(parts)
                                 for parts in zip(*systems, strict=True))
        first = self.layers[groups[0][0]][1]
        if is_sharded(first.lora_B):
            H, lam, second, norms = sum_partial(first.lora_B, H, lam, second, norms)
        scaling = self._scaling(tuple(i for indices in groups for i in indices), H.device)
        scales = solve_system(H, lam, scaling, self.c, self.mode, power=self.power, second=second, lr=lr,
                              tau=self.tau, norms=norms, factor_norm=self.factor_norm)
        sizes = [len(indices) for indices in groups]
        return [Scales(*parts) for parts in zip(scales.scale_B.split(sizes), scales.scale_A.split(sizes),
                                                scales.kind.split(sizes), strict=True)]

    def _apply(self, indices: tuple[int, ...], A: torch.Tensor, B: torch.Tensor, scales: Scales
               ) -> list[tuple[str, torch.Tensor]]:
        """For the layers `indices` of one group: merge s·B diag(1 − α⊙β) A into W0 (rounded stochastically where
        `_fold_generator` says so), then B ← B diag(α), A ← diag(β) A, and their gradients and moments; α =
        ``scales.scale_B``, β = ``scales.scale_A``. `A` is their lora_A stacked whole, `B` their lora_B stacked (this
        rank's rows), both as they were solved from. The folds are one per layer; the pieces and every rescaling are
        computed for the whole group at once (multi-tensor operations), so a scaling step launches a few operations
        per group rather than per layer.

        Where the solve was the identity (``scales.kind``), the fold adds exact zeros (both pieces are masked, so a
        NaN in them cannot reach W0) and every multiplication is by 1. An fp16 base weight is checked first: a fold
        that would overflow it makes the layer the identity for this step; the returned (layer name, 0-dim bool)
        pairs, one per fp16 layer, say so, on the device.
        """
        layers = [self.layers[i][1] for i in indices]
        if self.transfer_moments:  # before anything changes
            for layer in layers:
                check_moments(self.optimizer.state.get(layer.lora_B, {}))
                check_moments(self.optimizer.state.get(layer.lora_A, {}))
        keep = (scales.kind != IDENTITY)[:, None, None]
        coef = (self._scaling(indices, A.device)[:, None] * (1.0 - scales.scale_B * scales.scale_A)).to(B.dtype)
        pieces_B = torch.where(keep, B * coef[:, None, :], 0.0)
        pieces_A = torch.where(keep, A, 0.0)
        scale_B = list(scales.scale_B.to(B.dtype).unbind(0))
        scale_A = list(scales.scale_A.to(A.dtype).unbind(0))
        refused = []
        for k, (i, layer) in enumerate(zip(indices, layers, strict=True)):
            piece_B, piece_A = pieces_B[k], pieces_A[k]
            if layer.fan_in_fan_out and is_sharded(layer.weight):
                # W0 stored (in, out) under FSDP2: its local rows are columns of the (out, in) update, folded with
                # B whole
                piece_B = torch.where(keep[k], whole(layer.lora_B) * coef[k], 0.0)
                piece_A = piece_A[:, local_rows(layer.weight)]
            if layer.weight.dtype == torch.float16:  # bf16 and fp32 share fp32's range: a finite fold cannot overflow
                flag = ~layer.fold_finite(piece_B, piece_A)
                refused.append((self.layers[i][0], flag))
                piece_B, piece_A = torch.where(flag, 0.0, piece_B), torch.where(flag, 0.0, piece_A)
                scale_B[k], scale_A[k] = torch.where(flag, 1.0, scale_B[k]), torch.where(flag, 1.0, scale_A[k])
            layer.fold_(piece_B, piece_A, self._fold_generator(i))
        # under FSDP2 this rank holds some rows of B and A, and of their gradients and moments (`scalora.sharded`)
        rows = [local_rows(layer.lora_A) for layer in layers]
        scale_B_rows = [scale[r, None] for scale, r in zip(scale_B, rows, strict=True)]
        scale_A_rows = [scale[r, None] for scale, r in zip(scale_A, rows, strict=True)]
        torch._foreach_mul_([local(layer.lora_B) for layer in layers], scale_B)
        torch._foreach_mul_([local(layer.lora_A) for layer in layers], scale_A_rows)
        torch._foreach_mul_([local(layer.lora_B.grad) for layer in layers], scale_A)  # ∂ℓ/∂B̃ = g_B diag(β)
        torch._foreach_mul_([local(layer.lora_A.grad) for layer in layers], scale_B_rows)  # ∂ℓ/∂Ã = diag(α) g_A
        if self.transfer_moments:
            state = self.optimizer.state
            scale_moments([local_state(state.get(layer.lora_B, {})) for layer in layers], scale_A)
            scale_moments([local_state(state.get(layer.lora_A, {})) for layer in layers], scale_B_rows)
        return refused

    def _stats(self, kinds: list[torch.Tensor], scales_B: list[torch.Tensor], scales_A: list[torch.Tensor],
               refused: list[tuple[str, torch.Tensor]], branches: list[SideBranch]) -> ScalingStats:
        """The step's statistics as one device tensor (nothing is read back here)."""
        kind = torch.cat(kinds)
        scale_B, scale_A = torch.cat(scales_B).double(), torch.cat(scales_A).double()
        self._identity_total = self._identity_total + (kind == IDENTITY).sum()
        n_refused = torch.stack([flag for _, flag in refused]).sum() if refused else kind.new_zeros(())
        side = torch.stack([branch.residual()[1].to(kind.device) for branch in branches]).amax() if branches \
            else scale_B.new_zeros(())
        values = torch.stack([(kind == COLUMN).double().mean(), (kind == SCALAR).double().mean(),
                              (kind == IDENTITY).double().mean(), scale_B.mean(), scale_B.std(unbiased=False),
                              scale_A.mean(), scale_A.std(unbiased=False), n_refused.double() / kind.numel(), side])
        return ScalingStats(step=self.num_steps, layers=kind.numel(), values=values, refused=refused)

    # ------------------------------------------------------------------ checkpoints
    def settings(self) -> dict[str, Any]:
        return {"interval": self.interval, "rule": self.rule, "c": self.c, "tau": self.tau,
                "factor_norm": self.factor_norm, "mode": self.mode,
                "transfer_moments": self.transfer_moments, "side_rank": self.side_rank, "compensate": self.compensate}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """As the wrapper's; a state saved when ``c="auto"`` meant the first-order rule says so (it resumes only under
        ``c="first-order"``, never silently under another rule)."""
        saved = state_dict.get("scalora")
        if isinstance(saved, dict) and saved.get("c") == "auto":
            state_dict = {**state_dict, "scalora": {**saved, "c": "first-order"}}
        super().load_state_dict(state_dict)

    def extra_state(self) -> dict[str, Any]:
        return {"identity_total": self.identity_total}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._identity_total = int(state.get("identity_total", 0))
