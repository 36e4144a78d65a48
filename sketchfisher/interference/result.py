"""``InterferenceResult``: the score tensor with its metadata and tidy views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd
import torch

from ..errors import InputError
from ..layout import BLOCKS, Layout, block_index


@dataclass
class InterferenceResult:
    """Stage 6 output.

    ``scores[i, j, layer, head, b]`` with ``b`` in (Q, K, V, O) order and samples in iteration
    order; NaN marks missing data. ``stderr`` has the same shape (exactly 0 for exact codecs).
    For ``variant="signed"`` a *negative* score is a conflict; for the others a large score is.
    """

    scores: torch.Tensor
    stderr: torch.Tensor
    layout: Layout
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scores.shape != self.stderr.shape:
            raise InputError(f"stderr shape {tuple(self.stderr.shape)} != scores shape {tuple(self.scores.shape)}")

    @property
    def n_a(self) -> int:
        return self.scores.shape[0]

    @property
    def n_b(self) -> int:
        return self.scores.shape[1]

    def head_means(self) -> torch.Tensor:
        """Mean over sample pairs per (layer, head, block): ``[L, H, 4]``, NaN-aware."""
        return self.scores.nanmean(dim=(0, 1))

    def pair(self, i: int, j: int, layer: int, head: int) -> dict[str, float]:
        """The four block scores of one (i, j, layer, head)."""
        return {blk: float(self.scores[i, j, layer, head, b]) for b, blk in enumerate(BLOCKS)}

    def to_frame(self) -> pd.DataFrame:
        """Every score as a tidy row: block, layer, head, sample_i, sample_j, score, stderr."""
        n_a, n_b, L, H, B = self.scores.shape
        idx = torch.cartesian_prod(*(torch.arange(s) for s in (n_a, n_b, L, H, B)))
        return pd.DataFrame({
            "block": [BLOCKS[b] for b in idx[:, 4].tolist()],
            "layer": idx[:, 2].numpy(), "head": idx[:, 3].numpy(),
            "sample_i": idx[:, 0].numpy(), "sample_j": idx[:, 1].numpy(),
            "score": self.scores.reshape(-1).numpy(), "stderr": self.stderr.reshape(-1).numpy(),
        })

    def top_conflicts(self, k: int = 20, block: Optional[str] = None) -> pd.DataFrame:
        """The ``k`` strongest conflicts (largest scores; most negative for ``signed``), NaN excluded."""
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        scores, stderr = self.scores, self.stderr
        blocks = list(range(len(BLOCKS)))
        if block is not None:
            blocks = [block_index(block)]
        sub = scores[..., blocks]
        key = -sub if self.config.get("variant") == "signed" else sub
        key = torch.where(torch.isnan(key), torch.full_like(key, -float("inf")), key).reshape(-1)
        valid = int((~torch.isnan(sub)).sum())
        top = torch.topk(key, min(k, valid)).indices
        coords = torch.stack(torch.unravel_index(top, sub.shape), dim=1).tolist()
        rows = []
        for i, j, layer, head, b in coords:
            rows.append({"block": BLOCKS[blocks[b]], "layer": layer, "head": head, "sample_i": i, "sample_j": j,
                         "score": float(sub[i, j, layer, head, b]),
                         "stderr": float(stderr[i, j, layer, head, blocks[b]])})
        return pd.DataFrame(rows, columns=["block", "layer", "head", "sample_i", "sample_j", "score", "stderr"])
