"""Group-reduced views derived from a full-shape Fisher estimate; they never replace it."""

from __future__ import annotations

from typing import Callable

import torch

from ..layout import Layout


def head_view(layout: Layout, fisher: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """``[L, units, blocks]``: the sum of Î over each unit's block: ``[L, H, 4]`` over each query head's
    Q/K/V/O block (K/V: its kv head's block) for attention, ``[L, groups, blocks]`` over each channel
    group's GATE/UP rows and DOWN columns for an MLP layout (blocks in ``layout.block_names``)."""
    layout.require_single("head_view")
    out = torch.full((layout.num_layers, layout.num_heads, len(layout.block_names)), float("nan"),
                     dtype=torch.float64)
    for layer in range(layout.num_layers):
        for b, block in enumerate(layout.block_names):
            if (layer, block) not in layout.blocks:
                continue
            f = fisher(layout.param_of(layer, block))
            for h in range(layout.num_heads):
                out[layer, h, b] = layout.head_block(layer, block, h).select(f).sum()
    return out


unit_view = head_view


def channel_view(weight_fisher: torch.Tensor, transposed: bool = False, axis: str = "out") -> torch.Tensor:
    """The sum of Î over each output channel (``axis="out"``: rows of ``W ∈ R^{out×in}``, ``[out]``) or input
    channel (``axis="in"``: columns, ``[in]``) of any linear weight; ``transposed`` for Conv1D storage."""
    if axis not in ("out", "in"):
        raise ValueError(f"axis must be 'out' or 'in', got {axis!r}")
    logical_rows = axis == "out"
    return weight_fisher.sum(1 if logical_rows != transposed else 0)


def param_view(weight_fisher: torch.Tensor) -> torch.Tensor:
    """The scalar total of Î over a parameter."""
    return weight_fisher.sum()
