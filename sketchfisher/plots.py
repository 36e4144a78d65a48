"""Matplotlib figures from result tables only (no model access).

Every function returns the :class:`matplotlib.figure.Figure` (shown inline in a notebook when it is
a cell's value) and also writes it to ``path`` when one is given. The backend is never switched:
matplotlib picks a non-interactive one by itself where there is no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from .errors import InputError
from .layout import BLOCKS


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'sketchfisher[plots]'") from None
    return plt


def _finish(fig: Any, path: Optional[str | Path], title: str = "") -> Any:
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(Path(path), dpi=130)
    _pyplot().close(fig)  # no second copy from the notebook's automatic display; the returned figure shows
    return fig


def plot_block_heatmaps(values: torch.Tensor, path: Optional[str | Path] = None, title: str = "",
                        significant: Optional[torch.Tensor] = None, label: str = "score",
                        blocks: Optional[Sequence[str]] = None, unit: str = "head", diverging: bool = False) -> Any:
    """One layer × unit heatmap per block from ``values[L, units, blocks]`` on one shared colour scale:
    Q, K, V, O for heads (the default), or ``blocks=layout.block_names`` and ``unit="channel group"``
    for MLP units (``res.head_means()`` of an MLP result).

    Layers and units are integer ticks; NaN cells (not collected) are grey. Values of both signs get a
    diverging scale centred at 0 (``diverging=True``: always, with symmetric limits). ``significant`` (bool,
    same shape) marks cells with a dot."""
    blocks = tuple(blocks) if blocks is not None else BLOCKS
    if values.shape[-1] != len(blocks):
        raise ValueError(f"values have {values.shape[-1]} blocks on their last axis; name them with blocks=")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    v = values.detach().cpu().double()
    finite = v[torch.isfinite(v)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
    if lo < 0 < hi or diverging:
        lim = max(-lo, hi, 1e-300)
        cmap, lo, hi = "RdBu_r", -lim, lim
    else:
        cmap = "viridis"
    cm = plt.get_cmap(cmap).with_extremes(bad="0.85")
    L, H = v.shape[:2]
    fig, axes = plt.subplots(1, len(blocks), figsize=(3.2 * len(blocks) + 1.2, 0.28 * L + 2.2),
                             constrained_layout=True, sharey=True, squeeze=False)
    axes = list(axes[0])
    for ax, (b, block) in zip(axes, enumerate(blocks)):
        im = ax.imshow(v[:, :, b].numpy(), aspect="auto", cmap=cm, origin="lower", vmin=lo, vmax=hi,
                       extent=(-0.5, H - 0.5, -0.5, L - 0.5), interpolation="nearest")
        if significant is not None:
            ys, xs = significant[:, :, b].nonzero(as_tuple=True)
            ax.scatter(xs.numpy(), ys.numpy(), s=8, c="k", marker="o", label="significant")
        ax.set_title(block)
        ax.set_xlabel(unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), shrink=0.9, label=label)
    return _finish(fig, path, title)


def plot_head_conflicts(conflicts, layout: Any = None, path: Optional[str | Path] = None, title: str = "") -> Any:
    """The conflict answer at a glance: :meth:`InterferenceResult.head_conflicts`' alignment (cosine of the two
    tasks' Fisher-weighted mean gradients) per (layer, unit, block), on a diverging scale centred at 0 with
    symmetric limits (blue: the tasks pull apart), a dot on every flagged conflict. A K/V block shared by a
    group of query heads colours every head of the group. The grid is the one the table records (``layout``,
    the result's, may be given instead)."""
    if layout is not None:
        unit, blocks, shape = layout.unit_column, tuple(layout.block_names), (layout.num_layers, layout.num_heads)
    else:
        geometry = conflicts.attrs.get("geometry")
        if geometry is None:
            raise InputError("this conflict table records no geometry (made by an older version?): pass the "
                             "result's layout, plot_head_conflicts(table, res.layout)")
        unit, blocks, shape = geometry["unit"], tuple(geometry["blocks"]), (geometry["layers"], geometry["units"])
    align = torch.full((*shape, len(blocks)), float("nan"))
    marked = torch.zeros(align.shape, dtype=torch.bool)
    for r in conflicts.to_dict("records"):
        b = blocks.index(r["block"])
        heads = slice(r[unit], r[unit] + int(r.get("shared_by", 1)))
        align[r["layer"], heads, b] = r["alignment"]
        marked[r["layer"], heads, b] = bool(r["conflict"])
    level = conflicts.attrs.get("level", 0.05)
    title = f"{title}\n" if title else ""
    return plot_block_heatmaps(align, path, blocks=blocks, diverging=True, significant=marked,
                               unit="head" if unit == "head" else "channel group", label="alignment (cosine)",
                               title=f"{title}colour: alignment of the tasks' mean gradients (blue: opposed); "
                                     f"dots: conflict at q ≤ {level:g} ({int(marked.sum())} cells)")


def plot_task_matrix(matrix, path: Optional[str | Path] = None, title: str = "", total: Optional[int] = None) -> Any:
    """Which task pairs conflict: :meth:`TaskSet.matrix <sketchfisher.TaskSet.matrix>`'s N × N counts of flagged
    unit blocks (rows: task A, whose training is considered; columns: task B, whose loss it would raise), each
    cell printed, the diagonal blank. ``total`` (the unit blocks tested per pair; default: the matrix's own
    record) is named in the colour bar."""
    plt = _pyplot()
    values = matrix.to_numpy(dtype=float)
    n = len(matrix.index)
    fig, ax = plt.subplots(figsize=(1.1 * n + 2.6, 0.9 * n + 1.8), layout="constrained")
    im = ax.imshow(values, cmap="Reds", vmin=0, vmax=max(1.0, float(np.nanmax(values)) if np.isfinite(values).any() else 1))
    ax.set_xticks(range(n), [str(c) for c in matrix.columns], rotation=30, ha="right")
    ax.set_yticks(range(n), [str(r) for r in matrix.index])
    ax.set_xlabel("task B (its loss)")
    ax.set_ylabel("task A (trained on)")
    for i in range(n):
        for j in range(n):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{int(values[i, j])}", ha="center", va="center", fontsize=9)
    total = total or matrix.attrs.get("tested")
    label = "conflicting unit blocks" + (f" (of {total} per pair)" if total else "")
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    block = matrix.attrs.get("block")
    return _finish(fig, path, title or f"{block + ' blocks' if block else 'Unit blocks'} where training on A raises "
                                       f"B's loss (q ≤ {matrix.attrs.get('level', 0.05):g})")


def plot_block_comparison(values: torch.Tensor, path: Optional[str | Path] = None, title: str = "",
                          blocks: Optional[Sequence[str]] = None) -> Any:
    """Mean score per layer for each block (lines), from ``values[L, H, 4]`` (e.g. ``res.head_means()``;
    other blocks named by ``blocks``)."""
    blocks = tuple(blocks) if blocks is not None else BLOCKS
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    v = values.detach().cpu().double()
    per_layer = v.nanmean(dim=1).numpy()
    fig, ax = plt.subplots(figsize=(5.5, 3.5), constrained_layout=True)
    for b, block in enumerate(blocks):
        ax.plot(range(v.shape[0]), per_layer[:, b], marker="o", label=block)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("mean score over units")
    ax.legend(loc="best", fontsize=8)
    return _finish(fig, path, title)


def plot_sketch_vs_exact(exact: torch.Tensor, sketched: torch.Tensor, stderr: torch.Tensor,
                         path: Optional[str | Path] = None, max_points: int = 2000, seed: int = 0, title: str = "",
                         scale: str = "auto") -> Any:
    """Scatter of sketched against exact scores with ±1.96·stderr bars (a random subset of points). ``scale``
    ``"auto"`` draws symmetric-log axes when the exact scores span more than two decades (on linear axes the
    many small scores collapse into a corner and any sketch looks fine), linear up to the median error bar
    (shaded); else linear. Or ``"linear"``, ``"symlog"``."""
    plt = _pyplot()
    e, s, se = (t.detach().cpu().double().reshape(-1) for t in (exact, sketched, stderr))
    ok = torch.isfinite(e) & torch.isfinite(s)
    idx = ok.nonzero().flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_points]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5), constrained_layout=True)
    ax.errorbar(e[idx].numpy(), s[idx].numpy(), yerr=1.96 * se[idx].numpy(), fmt=".", ms=2, alpha=0.4, elinewidth=0.5)
    lo, hi = float(e[idx].min()), float(e[idx].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    mags = e[idx].abs()
    mags = mags[mags > 0]
    if scale == "auto":
        scale = "symlog" if len(mags) and float(mags.max() / mags.quantile(0.05)) > 100 else "linear"
    if scale == "symlog":  # linear up to the typical error bar (the sketch's noise floor), logarithmic beyond
        bars = 1.96 * se[idx]
        bars = bars[torch.isfinite(bars) & (bars > 0)]
        thresh = float(bars.median()) if len(bars) else (float(mags.median()) if len(mags) else 1.0)
        import math

        top = max(float(e[idx].abs().max()), float(s[idx].abs().max()), thresh)
        powers = [10.0 ** n for n in range(math.ceil(math.log10(thresh)), math.floor(math.log10(top)) + 1)]
        ticks = sorted({0.0, *powers, *(-p for p in powers)})
        for axis in (ax.xaxis, ax.yaxis):  # 0 and the powers of ten beyond the linear zone: no crowded labels
            (ax.set_xscale if axis is ax.xaxis else ax.set_yscale)("symlog", linthresh=thresh)
            axis.set_ticks(ticks)
        if float(e[idx].min()) >= 0:
            ax.set_xlim(left=0)
            ax.set_xticks([t for t in ticks if t >= 0])
        ax.axvspan(0 if float(e[idx].min()) >= 0 else -thresh, thresh, color="0.92", zorder=0,
                   label=f"exact score within a typical error bar ({thresh:.2g}; linear)")
        ax.legend(loc="upper left", fontsize=7)
    ax.set_xlabel("exact score" + (" (symmetric log)" if scale == "symlog" else ""))
    ax.set_ylabel("sketched score (±95%)")
    return _finish(fig, path, title)


def _readable_log_axis(axis) -> None:
    """Labels at 1, 2 and 5 of each decade where the data span under two decades (at 1 only over more), written
    short (20k, 1M); no labels on minor ticks, which overlap when matplotlib labels them."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    lo, hi = axis.get_view_interval()
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)))
    axis.set_major_formatter(EngFormatter(sep=""))
    axis.set_minor_formatter(NullFormatter())


def plot_frontier(table, path: Optional[str | Path] = None, x: str = "bytes_per_sample", y: str = "median_rel_err",
                  hue: str = "label", title: str = "") -> Any:
    """Accuracy-versus-memory frontier from a table (DataFrame) with one row per configuration; each
    family gets its own marker and line style, and a smaller marker than the one before, so overlapping
    lines and coinciding points stay visible; the legend sits below the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    styles = [("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", "-"), ("P", "--")]
    for n, (label, group) in enumerate(table.groupby(hue)):
        group = group.sort_values(x)
        marker, line = styles[n % len(styles)]
        # later families are drawn smaller, so a point that coincides with an earlier one shows as a ring
        ax.plot(group[x], group[y], marker=marker, linestyle=line, label=str(label), alpha=0.85,
                markersize=max(3.0, 10 - 0.8 * n))
    ax.set_xscale("log")
    _readable_log_axis(ax.xaxis)
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    # below the axes: a frontier runs corner to corner, so a legend inside covers some of its points
    fig.legend(loc="outside lower center", ncol=min(3, len(ax.get_lines())), fontsize=7, frameon=False)
    return _finish(fig, path, title)
