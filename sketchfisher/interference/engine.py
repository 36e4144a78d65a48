"""Stream Stage 6 scores block by block and row chunk by row chunk, with bounded memory.

A *provider* maps (layer, block) to a :class:`~sketchfisher.metric.BlockScores` (or None when that
block was not collected). ``BlockScores.rows(lo, hi)`` scores task-A samples ``lo:hi`` against every task-B
sample over the block's distinct head blocks. :func:`iter_chunks` walks all of them, expanding
K/V kv-head scores to the query heads that share them, so reducers (full tensor, means, top-k,
per-sample summaries) never need the whole ``[nA, nB, L, H, 4]`` tensor.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..layout import Layout
from ..metric import Provider

DEFAULT_MAX_BYTES = 1 << 28


def iter_chunks(layout: Layout, provider: Provider, max_bytes: int = DEFAULT_MAX_BYTES, expand: bool = True
                ) -> Iterator[tuple[int, int, int, int, torch.Tensor, Optional[torch.Tensor]]]:
    """Yield ``(layer, b, lo, hi, scores [c, nB, H], stderr or None)`` over every collected block.

    ``b`` indexes ``layout.block_names`` (Q, K, V, O for attention). Rows are chunked so that one chunk's working set stays under
    ``max_bytes`` (at least one row per chunk). With ``expand=False`` the last axis holds the
    distinct head blocks (H_kv for K/V) instead of query heads.
    """
    for layer in range(layout.num_layers):
        for b, block in enumerate(layout.block_names):
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
    shape = (n_a, n_b, layout.num_layers, layout.num_heads, len(layout.block_names))
    scores = torch.full(shape, float("nan"), dtype=dtype)
    stderr = torch.full(shape, float("nan"), dtype=dtype)
    for layer, b, lo, hi, s, se in iter_chunks(layout, provider, max_bytes):
        scores[lo:hi, :, layer, :, b] = s.cpu().to(dtype)
        stderr[lo:hi, :, layer, :, b] = 0.0 if se is None else se.cpu().to(dtype)
    return scores, stderr
