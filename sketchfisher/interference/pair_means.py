"""Mean scores over all sample pairs at any unit granularity, single MLP neurons included, from pass-1
statistics alone.

Every variant scores a pair as ``M_ij = Σ_e x_i[e] · y_j[e] / (Î[e] + ε + λ)`` with ``x = f(g_i)`` and
``y = h(g_j)`` transforms of each sample's own gradient. When the denominator does not depend on i
(normaliser ``a`` or ``pooled``, λ not relative to the slice), the mean over all (i, j) pairs is
``Σ_e mean_i x_i[e] · mean_j y_j[e] / (Î[e] + ε + λ)``, and both task means are pass-1 statistics
(Î for ``g²``, Σ|g|/n for ``|g|``, Σg/n for ``g``). So the pair-averaged score of every single neuron
costs one model-sized pass of arithmetic and no per-sample storage: what "which neurons do the
tasks fight over on average" needs at 7B, where per-neuron scores of every pair (32 layers × 11,008
neurons × 3 blocks per pair) cannot be kept. Pair-level questions (which samples, with error bars)
stay with the unit groups' sketches and factors.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from ..fisher import MEAN_ACCESSOR
from ..metric import MEAN_OF
from ..metric.sides import shift


def pair_means_from_statistics(result: Any, group_size: int = 1) -> torch.Tensor:
    """``[L, units, blocks]``: the exact mean over all (i, j) pairs of each unit's score, for units of
    ``group_size`` consecutive channels (MLP) or rows/columns, from the statistics of ``result``'s
    collection. ``group_size`` must divide the result's own unit width; for an MLP result, 1 gives
    single neurons. Equals ``head_means()`` of a collection at that group size, up to rounding: with fp32
    statistics (the GPU setting) Σ|g| is accumulated in bf16 with stochastic rounding, which moves a single
    neuron's mean by about 0.1%."""
    ctx = getattr(result, "context", None)
    if ctx is None:
        raise InputError("this result carries no statistics (it was built from a bare score provider)")
    cfg, layout = ctx.cfg, result.layout
    if cfg.normalizer not in ("a", "pooled") or cfg.slice_relative:
        raise InputError("pair means from statistics need a denominator shared by all pairs: normalizer 'a' or "
                         f"'pooled' without ridge_rel; got normalizer={cfg.normalizer!r}, ridge_rel={cfg.ridge_rel}")
    width = layout.head_dim if layout.unit != "head" else None
    if not isinstance(group_size, int) or group_size < 1 or (width is not None and width % group_size):
        raise InputError(f"group_size must be a positive divisor of the result's unit width {width}, got {group_size!r}")
    spec = cfg.spec
    means = {"a": MEAN_OF[spec.i_side], "b": MEAN_OF[spec.j_side]}
    stats = {"a": ctx.stats_a, "b": ctx.stats_b}
    missing = [f"task {t.upper()}'s {q}" for t, q in means.items() if q not in stats[t].quantities]
    if missing:
        raise InputError(f"the collection did not keep {', '.join(missing)}: a heads-only collection frees the "
                         "task means once its side vectors are prepared; collect with units including 'mlp' or "
                         "'linear' (units='all'), whose collections keep both tasks' means")
    norm = ctx.normalizer_stats()
    blocks = layout.block_names
    units = None
    out = None
    for layer in range(layout.num_layers):
        for b, block in enumerate(blocks):
            hbs = layout.head_blocks(layer, block)
            hb = hbs[0]
            name = hb.param_name
            f = norm.fisher(name).double()
            x = getattr(stats["a"], MEAN_ACCESSOR[means["a"]])(name).double()
            y = getattr(stats["b"], MEAN_ACCESSOR[means["b"]])(name).double()
            entry = x * y / (f + shift(f, cfg))
            # one value per logical channel of the axis the units index (rows for "out", columns for "in")
            per_channel = entry.sum(1 - hb.storage_axis)
            lo, hi = hbs[0].start, hbs[-1].stop
            if [h.start for h in hbs] != list(range(lo, hi, hb.width)):
                raise InputError(f"({layer}, {block}): units are not contiguous; pair means need contiguous units")
            grouped = per_channel[lo:hi].reshape(-1, group_size).sum(1)
            if out is None:
                units = grouped.numel()
                out = torch.full((layout.num_layers, units, len(blocks)), float("nan"), dtype=torch.float64)
            if grouped.numel() != units:
                raise InputError(f"({layer}, {block}) has {grouped.numel()} units of {group_size} channel(s), other "
                                 f"blocks {units}: the blocks of this {layout.unit} result differ in width (K/V under "
                                 "grouped-query attention), so they share no unit grid at this granularity; single "
                                 "neurons are an MLP result's: res.units('mlp').pair_means_from_statistics()")
            out[layer, :, b] = grouped.cpu()
    return out
