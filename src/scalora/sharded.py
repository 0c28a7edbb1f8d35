"""ScaLoRA on FSDP2's shards (`torch.distributed.fsdp.fully_shard`): the solve and the fold without gathering W0.

FSDP2 keeps every parameter as a `DTensor` sharded on dim 0: each rank holds some rows of W0 (out × in), of B
(out × r) and of A (r × in), and of their gradients and optimiser moments. ScaLoRA's system needs r × r Gram products
only (`scalora.scaling_problem.optimizer_system`):

* A is small (r × in), so A, its gradient and its direction are gathered whole, all layers of one shape in one
  all-gather;
* the B-side products BᵀB, Bᵀ U_B, U_Bᵀ U_B and coldot(∂ℓ/∂B, U_B) are sums over the rows of B, so each rank's
  products over its own rows are partial sums. H, the β block of λ, ‖U_B U_A‖² and B's squared column norms are
  linear in them, so the system built from the local rows of B and the whole A is the rank's partial system:
  summed over the ranks (one all-reduce for the systems of all groups, which stack whatever the layers' shapes), it
  is the system of the whole layer. The α block of λ (rowdot over A) is already whole on every rank and is not
  summed.

Every rank then solves the same system to the same scales (α of the columns of B, β of the rows of A), folds
s·B_local diag(1 − α⊙β) A into its own rows of W0, rescales its rows of B (all r columns) and its rows of A (the β
entries of those rows), and transforms the moments on their shards. Nothing of size out × in travels.

A W0 stored (in, out) (GPT-2's Conv1D, PEFT's ``fan_in_fan_out``) is sharded on its input dimension: its local rows
are columns of the (out, in) update, so the fold gathers B (out × r, small) and takes those columns of A.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support, or older than FSDP2
    DTensor = None


def is_sharded(tensor: Tensor) -> bool:
    """True for a `DTensor` (a parameter sharded by FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def whole(tensor: Tensor) -> Tensor:
    """The whole tensor (all-gathered from its shards); a plain tensor is returned as it is."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local(tensor: Tensor) -> Tensor:
    """This rank's shard, a plain tensor whose in-place changes are the parameter's; a plain tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def local_rows(tensor: Tensor) -> slice:
    """The rows (dim 0) of the whole `tensor` that this rank's shard holds (FSDP2 shards dim 0 like torch.chunk)."""
    if not is_sharded(tensor):
        return slice(None)
    mesh = tensor.device_mesh
    per_rank = -(-tensor.shape[0] // mesh.size())
    start = min(mesh.get_local_rank() * per_rank, tensor.shape[0])
    return slice(start, start + local(tensor).shape[0])


#: all-gather into one tensor, under its newer name where torch has it (the old one warns of its deprecation)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def whole_stacked(tensors: list[Tensor]) -> Tensor:
    """``torch.stack`` of the whole `tensors` (of one shape, sharded alike or all plain), gathered from their shards in
    one all-gather: each rank's shards, padded to the largest shard's rows, go in one buffer. When the first is
    sharded, the others may be given as this rank's shards already (plain tensors)."""
    if not is_sharded(tensors[0]):
        return torch.stack(tensors)
    mesh, rows = tensors[0].device_mesh, tensors[0].shape[0]
    per_rank = -(-rows // mesh.size())
    shards = torch.stack([local(t) for t in tensors])
    mine = shards.new_zeros((len(tensors), per_rank) + shards.shape[2:])
    mine[:, :shards.shape[1]] = shards
    gathered = mine.new_empty((mesh.size() * len(tensors),) + mine.shape[1:])
    _all_gather_single(gathered, mine, group=mesh.get_group())
    # (ranks, n, per_rank, …) → (n, ranks · per_rank, …): every shard but the last ones is full, so the first
    # `rows` rows are the tensor's
    gathered = gathered.view((mesh.size(),) + mine.shape).transpose(0, 1)
    return gathered.reshape((len(tensors), -1) + shards.shape[2:])[:, :rows]


def local_state(state: dict) -> dict:
    """An optimiser state with every sharded tensor replaced by its local shard (same storage)."""
    return {key: local(value) if isinstance(value, Tensor) else value for key, value in state.items()}


def sum_partial(reference: Tensor, H: Tensor, lam: Tensor, second: Tensor | None, norms: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Sum the ranks' partial systems (H, the β block of λ, ‖U_B U_A‖², B's squared column norms) over
    `reference`'s mesh in one all-reduce; λ's α block and A's row norms are whole on every rank already."""
    n, m = lam.shape
    r = m // 2
    parts = [H.reshape(n, -1), lam[:, r:]]
    parts += [] if norms is None else [norms[:, :r]]
    parts += [] if second is None else [second.reshape(n, 1)]
    flat = torch.cat(parts, dim=-1)
    dist.all_reduce(flat, group=reference.device_mesh.get_group())
    H = flat[:, :m * m].reshape(n, m, m)
    lam = torch.cat([lam[:, :r], flat[:, m * m:m * m + r]], dim=-1)
    if norms is not None:
        norms = torch.cat([flat[:, m * m + r:m * m + 2 * r], norms[:, r:]], dim=-1)
    return H, lam, None if second is None else flat[:, -1], norms
