"""Per-task sufficient statistics over full-shape parameters: count, Σ g² (and so Î = Σ g² / n)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..layout import Layout


@dataclass
class TaskStats:
    """Running ``Σ_i g_i²`` per parameter (fp64) and the sample count, normalised late.

    Two ``TaskStats`` merge exactly (:meth:`merge`), so shards and batch sizes cannot change Î.
    """

    count: int = 0
    sum_sq: dict[str, torch.Tensor] = field(default_factory=dict)

    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """Add a batch ``{name: Tensor[B, *shape]}`` of per-sample gradients."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise InputError(f"per-sample gradient batches disagree on batch size: {sorted(sizes)}")
        for name, g in grads.items():
            sq = g.to(torch.float64).square().sum(0)
            self.sum_sq[name] = self.sum_sq[name] + sq if name in self.sum_sq else sq
        self.count += sizes.pop()

    def merge(self, other: "TaskStats") -> "TaskStats":
        """Statistics of the union of both sample sets."""
        if set(self.sum_sq) != set(other.sum_sq):
            raise InputError("cannot merge TaskStats over different parameter sets")
        return TaskStats(self.count + other.count, {n: self.sum_sq[n] + other.sum_sq[n] for n in self.sum_sq})

    def fisher(self, name: str) -> torch.Tensor:
        """Î = (1/n) Σ_i g_i² for one parameter, full shape, fp64."""
        if self.count == 0:
            raise InputError("Fisher of an empty task is undefined (0 samples)")
        return self.sum_sq[name] / self.count

    def fisher_block(self, layout: Layout, layer: int, block: str) -> torch.Tensor | None:
        """Î over the distinct head blocks of (layer, block): ``[H_b, S]``; None if not collected."""
        name = layout.head_blocks(layer, block)[0].param_name
        if name not in self.sum_sq:
            return None
        return layout.gather(layer, block, self.fisher(name).unsqueeze(0))[0]
