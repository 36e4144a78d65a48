"""Assemble ``scores[nA, nB, L, H, 4]`` from per-(layer, block) contractions."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..layout import BLOCKS, Layout
from .metric import ScoreConfig, block_scores

BlockFn = Callable[[int, str], Optional[torch.Tensor]]


def score_tensor(layout: Layout, n_a: int, n_b: int, grads_a: BlockFn, grads_b: BlockFn, fisher: BlockFn,
                 count: int, cfg: ScoreConfig) -> torch.Tensor:
    """Scores for every (layer, block, query head); NaN where either side or Î is missing.

    ``grads_a(layer, block)`` → ``[nA, H_b, S]``, ``grads_b`` → ``[nB, H_b, S]``, ``fisher`` → ``[H_b, S]``
    (the normaliser, averaging ``count`` samples). K/V scores are computed once per kv head and
    broadcast to the query heads that share it.
    """
    scores = torch.full((n_a, n_b, layout.num_layers, layout.num_heads, len(BLOCKS)), float("nan"),
                        dtype=cfg.dtype)
    for layer in range(layout.num_layers):
        for b, block in enumerate(BLOCKS):
            ga, gb, fi = grads_a(layer, block), grads_b(layer, block), fisher(layer, block)
            if ga is None or gb is None or fi is None:
                continue
            s = block_scores(ga, gb, fi, count, cfg)
            scores[:, :, layer, :, b] = s[:, :, layout.head_index(block).to(s.device)].cpu()
    return scores
