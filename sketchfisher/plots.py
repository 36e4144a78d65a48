"""Matplotlib figures from result tables only (no model access)."""

from __future__ import annotations

from pathlib import Path

import torch

from .layout import BLOCKS


def plot_block_heatmaps(values: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """One layer×head heatmap per block (Q, K, V, O) from ``values[L, H, 4]``; NaN cells blank."""
    plt = _pyplot()
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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_block_comparison(values: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Mean score per layer for each block (lines), from ``values[L, H, 4]`` (e.g. ``res.head_means()``)."""
    plt = _pyplot()
    v = values.detach().cpu().double()
    per_layer = v.nanmean(dim=1).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), constrained_layout=True)
    for b, block in enumerate(BLOCKS):
        ax.plot(range(v.shape[0]), per_layer[:, b], marker="o", label=block)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean score over heads")
    ax.legend()
    ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sketch_vs_exact(exact: torch.Tensor, sketched: torch.Tensor, stderr: torch.Tensor, path: str | Path,
                         max_points: int = 2000, seed: int = 0, title: str = "") -> Path:
    """Scatter of sketched against exact scores with ±1.96·stderr bars (a random subset of points)."""
    plt = _pyplot()
    e, s, se = (t.detach().cpu().double().reshape(-1) for t in (exact, sketched, stderr))
    ok = torch.isfinite(e) & torch.isfinite(s)
    idx = ok.nonzero().flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_points]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    ax.errorbar(e[idx].numpy(), s[idx].numpy(), yerr=1.96 * se[idx].numpy(), fmt=".", ms=2, alpha=0.4, elinewidth=0.5)
    lo, hi = float(e[idx].min()), float(e[idx].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("exact score")
    ax.set_ylabel("sketched score (±95%)")
    ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_frontier(table, path: str | Path, x: str = "bytes_per_sample", y: str = "median_rel_err",
                  hue: str = "label", title: str = "") -> Path:
    """Accuracy-versus-memory frontier from a table (DataFrame) with one row per configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for label, group in table.groupby(hue):
        group = group.sort_values(x)
        ax.plot(group[x], group[y], marker="o", label=str(label))
    ax.set_xscale("log")
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.legend(fontsize=7)
    ax.set_title(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
