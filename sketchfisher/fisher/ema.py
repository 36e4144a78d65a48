"""The exponential moving average of per-sample contributions, bias-corrected."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError


@dataclass
class EMAFisher:
    """Exponential moving average ``F_t = β F_{t−1} + (1−β) C_t`` with ``F_0 = 0``.

    :meth:`value` is the bias-corrected ``F̂_t = F_t / (1 − β^t)``; a constant stream returns the
    constant at every step.
    """

    beta: float = 0.99
    steps: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise InputError(f"EMAFisher.beta must be in [0, 1), got {self.beta!r}")

    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """Add per-sample gradients ``{name: Tensor[B, *shape]}``: B steps in batch order."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise InputError(f"per-sample gradient batches disagree on batch size: {sorted(sizes)}")
        for name, g in grads.items():
            f = self.state.get(name)
            f = torch.zeros(g.shape[1:], dtype=torch.float64, device=g.device) if f is None else f
            for c in g.to(torch.float64).square():
                f = self.beta * f + (1.0 - self.beta) * c
            self.state[name] = f
        self.steps += sizes.pop()

    def value(self, name: str) -> torch.Tensor:
        if self.steps == 0:
            raise InputError("EMAFisher has seen no samples")
        return self.state[name] / (1.0 - self.beta ** self.steps)
