"""``sf.Exact()``: full-shape per-sample gradients of the layout's parameters. The reference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import InputError
from ..layout import Layout
from .base import Codec


@dataclass(frozen=True)
class Exact(Codec):
    """Keep every sample's full-shape gradient g_i (fp32). Memory grows as n × |θ_attn|: small models only.

    The gradients are formed from one batched capture per batch and checked against autograd (they must
    sum to the batch's gradient of every weight); a batch that fails the check is redone sample by sample
    with autograd (:func:`sketchfisher.collect.passes.gradient_pass`)."""

    name: ClassVar[str] = "exact"
    source: ClassVar[str] = "gradients"
    summary: ClassVar[str] = "full-shape per-sample gradients (the reference; small models)"

    def bytes_per_sample(self, head_block_sizes: list[int], factor_width: int, tokens: int) -> float:
        """fp32 gradients of every attention weight entry (the distinct head blocks tile them)."""
        return 4.0 * sum(head_block_sizes)

    def representation(self) -> "ExactContributions":
        return ExactContributions()


@dataclass
class ExactContributions:
    """Stacked per-sample gradients ``{param_name: Tensor[n, *shape]}``; absent names are missing data."""

    grads: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch of per-sample gradients ``{param_name: [B, *shape]}``."""
        for name, g in batch.items():
            self.grads.setdefault(name, []).append(g)

    def __len__(self) -> int:
        if not self.grads:
            return 0
        return sum(g.shape[0] for g in next(iter(self.grads.values())))

    def full(self, name: str) -> torch.Tensor:
        """All samples' gradients of ``name``: ``[n, *shape]``."""
        parts = self.grads[name]
        if len(parts) > 1:
            self.grads[name] = [torch.cat(parts)]
        return self.grads[name][0]

    def block(self, layout: Layout, layer: int, block: str) -> torch.Tensor | None:
        """Per-sample gradients of the distinct head blocks: ``[n, H_b, S]``; None when not collected."""
        name = layout.param_of(layer, block)
        if name not in self.grads:
            return None
        return layout.gather(layer, block, self.full(name))

    def nbytes_per_sample(self) -> int:
        n = len(self)
        if n == 0:
            raise InputError("no samples collected")
        return sum(self.full(name).nbytes for name in self.grads) // n
