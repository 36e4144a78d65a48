"""Assemble ``scores[nA, nB, L, H, 4]`` (and standard errors) from per-(layer, block) scorers."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..layout import BLOCKS, Layout
from .metric import ScoreConfig, block_scores

BlockFn = Callable[[int, str], Optional[torch.Tensor]]
BlockScorer = Callable[[int, str], Optional[tuple[torch.Tensor, Optional[torch.Tensor]]]]


def assemble(layout: Layout, n_a: int, n_b: int, scorer: BlockScorer,
             dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores and standard errors for every (layer, block, query head); NaN where data is missing.

    ``scorer(layer, block)`` returns ``(scores [nA, nB, H_b], stderr [nA, nB, H_b] or None)`` over the
    distinct head blocks, or None when that block was not collected. K/V blocks are scored once per
    kv head and broadcast to the query heads that share it; a None stderr means exact (0).
    """
    shape = (n_a, n_b, layout.num_layers, layout.num_heads, len(BLOCKS))
    scores = torch.full(shape, float("nan"), dtype=dtype)
    stderr = torch.full(shape, float("nan"), dtype=dtype)
    for layer in range(layout.num_layers):
        for b, block in enumerate(BLOCKS):
            out = scorer(layer, block)
            if out is None:
                continue
            s, se = out
            heads = layout.head_index(block).to(s.device)
            scores[:, :, layer, :, b] = s[:, :, heads].cpu().to(dtype)
            stderr[:, :, layer, :, b] = 0.0 if se is None else se[:, :, heads].cpu().to(dtype)
    return scores, stderr


def exact_scorer(grads_a: BlockFn, grads_b: BlockFn, fisher: BlockFn, count: int, cfg: ScoreConfig) -> BlockScorer:
    """Scorer from exact per-sample block gradients ``[n, H_b, S]`` and the normaliser ``[H_b, S]``."""
    def scorer(layer: int, block: str):
        ga, gb, fi = grads_a(layer, block), grads_b(layer, block), fisher(layer, block)
        if ga is None or gb is None or fi is None:
            return None
        return block_scores(ga, gb, fi, count, cfg), None
    return scorer
