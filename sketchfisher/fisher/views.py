"""Group-reduced views derived from a full-shape Fisher estimate; they never replace it."""

from __future__ import annotations

from typing import Callable

import torch

from ..layout import BLOCKS, Layout


def head_view(layout: Layout, fisher: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``[L, H, 4]``: the sum of Î over each query head's block (K/V: its kv head's block)."""
    out = torch.full((layout.num_layers, layout.num_heads, len(BLOCKS)), float("nan"), dtype=torch.float64)
    for layer in range(layout.num_layers):
        for b, block in enumerate(BLOCKS):
            for h in range(layout.num_heads):
                hb = layout.head_block(layer, block, h)
                out[layer, h, b] = hb.select(fisher(hb.param_name)).sum()
    return out


def channel_view(weight_fisher: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``[out]``: the sum of Î over each weight row (output channel) of ``W ∈ R^{out×in}``."""
    return weight_fisher.sum(0 if transposed else 1)


def param_view(weight_fisher: torch.Tensor) -> torch.Tensor:
    """The scalar total of Î over a parameter."""
    return weight_fisher.sum()
