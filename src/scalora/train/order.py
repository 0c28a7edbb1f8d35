"""The order in which a run visits its examples: seeded per-epoch permutations, chosen by step number alone."""

from __future__ import annotations

import torch


class BatchOrder:
    """Micro-batch k holds examples [k·b, (k+1)·b) of an endless stream of seeded per-epoch permutations."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch]

    def __call__(self, k: int) -> list[int]:
        start = k * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]
