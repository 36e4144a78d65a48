"""Stream Stage 6 scores block by block and row chunk by row chunk, with bounded memory.

A *provider* maps (layer, block) to a :class:`BlockScores` (or None when that block was not
collected). ``BlockScores.rows(lo, hi)`` scores task-A samples ``lo:hi`` against every task-B
sample over the block's distinct head blocks. :func:`iter_chunks` walks all of them, expanding
K/V kv-head scores to the query heads that share them, so reducers (full tensor, means, top-k,
per-sample summaries) never need the whole ``[nA, nB, L, H, 4]`` tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Protocol

import torch

from ..layout import BLOCKS, Layout
from ..metric import ScoreConfig, contract, ridge, x_side, y_side

DEFAULT_MAX_BYTES = 1 << 28


class BlockScores(Protocol):
    n_a: int
    row_bytes: int

    def rows(self, lo: int, hi: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Scores ``[hi − lo, nB, H_b]`` and standard errors (None when exact)."""


Provider = Callable[[int, str], Optional[BlockScores]]


@dataclass
class ExactBlock:
    """Exact scores of one (layer, block) from per-sample block gradients ``[n, H_b, S]``.

    Unless the normaliser depends on i (leave-one-out), 1/(Î + ε + λ) is folded into the j side
    once per block, so each row chunk only squares (or takes |·| of) its own gradients.
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
        inv = 1.0 / (fisher + (cfg.eps + ridge(fisher, cfg)))
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
            x = self.ga[lo:hi].to(self.cfg.dtype, copy=True)  # a private copy: safe to modify in place
            if self.cfg.variant == "paper":
                x.square_()
            elif self.cfg.variant == "symmetric":
                x.abs_()
        else:
            x = x_side(self.ga[lo:hi], self.fisher, self.count, self.cfg)
        return contract(x, self.y), None


def iter_chunks(layout: Layout, provider: Provider, max_bytes: int = DEFAULT_MAX_BYTES, expand: bool = True
                ) -> Iterator[tuple[int, int, int, int, torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(layer, b, lo, hi, scores [c, nB, H], stderr or None)`` over every collected block.

    ``b`` indexes (Q, K, V, O). Rows are chunked so that one chunk's working set stays under
    ``max_bytes`` (at least one row per chunk). With ``expand=False`` the last axis holds the
    distinct head blocks (H_kv for K/V) instead of query heads.
    """
    for layer in range(layout.num_layers):
        for b, block in enumerate(BLOCKS):
            scores = provider(layer, block)
            if scores is None:
                continue
            heads = layout.head_index(block)
            step = max(1, int(max_bytes // max(1, scores.row_bytes)))
            for lo in range(0, scores.n_a, step):
                hi = min(scores.n_a, lo + step)
                s, se = scores.rows(lo, hi)
                if not expand:
                    yield layer, b, lo, hi, s, se
                    continue
                idx = heads.to(s.device)
                yield layer, b, lo, hi, s[:, :, idx], None if se is None else se[:, :, idx]


def assemble(layout: Layout, n_a: int, n_b: int, provider: Provider, dtype: torch.dtype = torch.float64,
             max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[torch.Tensor, torch.Tensor]:
    """The full ``scores`` and ``stderr`` tensors ``[nA, nB, L, H, 4]``; NaN where data is missing."""
    shape = (n_a, n_b, layout.num_layers, layout.num_heads, len(BLOCKS))
    scores = torch.full(shape, float("nan"), dtype=dtype)
    stderr = torch.full(shape, float("nan"), dtype=dtype)
    for layer, b, lo, hi, s, se in iter_chunks(layout, provider, max_bytes):
        scores[lo:hi, :, layer, :, b] = s.cpu().to(dtype)
        stderr[lo:hi, :, layer, :, b] = 0.0 if se is None else se.cpu().to(dtype)
    return scores, stderr
