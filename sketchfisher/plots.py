"""Matplotlib figures from result tables only (no model access)."""

from __future__ import annotations

from pathlib import Path

import torch

from .layout import BLOCKS


def plot_block_heatmaps(values: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """One layer×head heatmap per block (Q, K, V, O) from ``values[L, H, 4]``; NaN cells blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = values.detach().cpu().double().numpy()
    fig, axes = plt.subplots(1, len(BLOCKS), figsize=(4 * len(BLOCKS), 3.2), constrained_layout=True)
    for ax, (b, block) in zip(axes, enumerate(BLOCKS)):
        im = ax.imshow(v[:, :, b], aspect="auto", cmap="viridis", origin="lower")
        ax.set_title(block)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, shrink=0.85)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
