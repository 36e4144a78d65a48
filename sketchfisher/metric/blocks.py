"""Scores of one (layer, block), row chunk by row chunk: the interface the Stage 6 engine streams over.

A :class:`BlockScores` scores task-A samples ``lo:hi`` against every task-B sample over the block's
distinct head blocks. :class:`ExactBlock` does it from exact per-sample gradients (the ``Exact`` and
``Factors`` codecs); the sketch codec's counterpart is
:class:`sketchfisher.compress.sketch_block.SketchBlock`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..errors import GradientError
from .config import ScoreConfig
from .sides import contract, shift, x_side, y_side


class BlockScores(Protocol):
    n_a: int
    row_bytes: int

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores ``[hi − lo, nB, H_b]`` and standard errors (None when exact)."""


Provider = Callable[[int, str], Optional[BlockScores]]
"""Maps (layer, block) to its :class:`BlockScores`, or None when that block was not collected."""


@dataclass
class ExactBlock:
    """Exact scores of one (layer, block) from per-sample block gradients ``[n, H_b, S]``.

    Unless the normaliser depends on i (leave-one-out), 1/(Î + ε + λ) is folded into the j side
    once per block, so each row chunk only applies the i-side transform to its own gradients.
    """

    ga: torch.Tensor
    y: torch.Tensor
    fisher: torch.Tensor
    count: int
    cfg: ScoreConfig
    folded: bool = False

    @classmethod
    def build(cls, ga: torch.Tensor, gb: torch.Tensor, fisher: torch.Tensor, count: int, cfg: ScoreConfig):
        fisher = fisher.to(cfg.dtype)
        if cfg.normalizer == "loo":
            return cls(ga, y_side(gb, cfg), fisher, count, cfg)
        inv = 1.0 / (fisher + shift(fisher, cfg))
        return cls(ga, y_side(gb, cfg).mul_(inv), fisher, count, cfg, folded=True)

    @property
    def n_a(self) -> int:
        return self.ga.shape[0]

    @property
    def row_bytes(self) -> int:
        heads, size = self.ga.shape[1:]
        item = torch.empty((), dtype=self.cfg.dtype).element_size()
        return 3 * heads * size * item + self.y.shape[0] * heads * item

    def rows(self, lo: int, hi: int):
        if self.folded:
            x = self.cfg.spec.i_numerator(self.ga[lo:hi].to(self.cfg.dtype))
        else:
            x = x_side(self.ga[lo:hi], self.fisher, self.count, self.cfg)
        scores = contract(x, self.y)
        if not bool(torch.isfinite(scores).all()) and bool(torch.isfinite(self.ga[lo:hi]).all()):
            raise GradientError(f"scores of task-A samples {lo}..{hi - 1} overflow {str(self.cfg.dtype).replace('torch.', '')}"
                                " although their gradients are finite (they are too large for it); score in float64 "
                                "(dtype=torch.float64) or scale the loss down")
        return scores, None
