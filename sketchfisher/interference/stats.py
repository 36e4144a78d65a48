"""Statistics for Stage 6: permutation nulls, Benjamini–Hochberg q-values, bootstrap intervals.

The cell statistic is the mean score over all (i, j) pairs of a (layer, head, block) cell:
``T = Σ_S mean_{i∈A} x_i ⊙ mean_{j∈B} y_j``. The permutation null pools A ∪ B and re-deals the
labels (same sizes), recomputing the normaliser from the permuted task A (``normalizer="a"``) or
keeping the pooled one (``"pooled"``), so it breaks exactly the A/B structure. p-values are
``(1 + #{T_perm ⪰ T_obs}) / (1 + P)`` where ⪰ is "at least as conflicting" in the variant's sense
(:meth:`Variant.at_least_as_extreme`: ≥, or ≤ for ``signed``, where conflicts are negative).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import bootstrap, false_discovery_control

from ..errors import InputError
from ..layout import Layout
from ..metric import ScoreConfig, ridge, y_side
from ..progress import progress as progress_bar

BlockGrads = Callable[[int, str], Optional[tuple[torch.Tensor, torch.Tensor]]]


def _cell_statistic(num_a: torch.Tensor, sq_a: torch.Tensor, y_b: torch.Tensor, fisher_pool: torch.Tensor,
                    cfg: ScoreConfig) -> torch.Tensor:
    """T for stacked label sets: means ``[P, H_b, S]`` → ``[P, H_b]``."""
    fisher = fisher_pool.expand_as(sq_a) if cfg.normalizer == "pooled" else sq_a
    lam = cfg.eps + torch.stack([ridge(f, cfg) for f in fisher]) if cfg.ridge_rel else cfg.eps + cfg.ridge_abs
    return (num_a / (fisher + lam) * y_b).sum(-1)


def permutation_test(layout: Layout, grads: BlockGrads, cfg: ScoreConfig, n_permutations: int = 999,
                     seed: int = 0, chunk: int = 64, alignment: bool = False, progress: bool = False) -> pd.DataFrame:
    """Permutation p-values and BH q-values for every (layer, head, block) cell.

    ``grads(layer, block)`` returns exact block gradients ``(g_A [nA, H_b, S], g_B [nB, H_b, S])`` or
    None. Returns a tidy frame: layer, head, block, statistic, p_value, q_value (BH over all cells,
    ``scipy.stats.false_discovery_control`` over the distinct storage head blocks). K/V rows of
    query heads that share a kv head repeat that head block's single test. ``alignment=True`` adds the
    cosine of the two tasks' mean gradients under the normaliser's metric (:func:`distributions_differ`).
    """
    if cfg.normalizer not in ("a", "pooled"):
        raise InputError(f"permutation_test supports normalizer 'a' or 'pooled', got {cfg.normalizer!r}")
    if n_permutations < 1:
        raise InputError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = np.random.default_rng(seed)
    rows = []
    labels = None
    unit = layout.unit_column
    blocks = [(layer, block) for layer in range(layout.num_layers) for block in layout.block_names]
    for layer, block in progress_bar(blocks, desc="permutation test", enabled=progress):
        pair = grads(layer, block)
        if pair is None:
            continue
        ga, gb = (g.to("cpu", cfg.dtype) for g in pair)  # (the label matrices are host tensors)
        n_a, n_b = ga.shape[0], gb.shape[0]
        if labels is None:  # the same permutations for every cell
            labels = np.stack([rng.permutation(n_a + n_b) for _ in range(n_permutations)])
        g = torch.cat([ga, gb]).flatten(1)                       # [N, H_b·S]
        num, sq, y = cfg.spec.i_numerator(g), g.square(), y_side(g, cfg)
        fisher_pool = sq.mean(0).view(ga.shape[1:])
        shape = ga.shape[1:]

        def stat(idx: np.ndarray) -> torch.Tensor:
            P = idx.shape[0]
            wa = torch.zeros(P, n_a + n_b, dtype=cfg.dtype)
            wb = torch.zeros(P, n_a + n_b, dtype=cfg.dtype)
            wa.scatter_(1, torch.as_tensor(idx[:, :n_a]), 1.0 / n_a)
            wb.scatter_(1, torch.as_tensor(idx[:, n_a:]), 1.0 / n_b)
            return _cell_statistic((wa @ num).view(P, *shape), (wa @ sq).view(P, *shape),
                                   (wb @ y).view(P, *shape), fisher_pool, cfg)

        observed = stat(np.arange(n_a + n_b)[None, :])[0]
        null = torch.cat([stat(labels[lo:lo + chunk]) for lo in range(0, n_permutations, chunk)])
        extreme = cfg.spec.at_least_as_extreme(null, observed)
        p = (1 + extreme.sum(0)).double() / (1 + n_permutations)
        cosine = _alignment(ga, gb, fisher_pool, cfg) if alignment else None
        for head in range(layout.num_heads):
            h = int(layout.head_index(block)[head])
            rows.append({"layer": layer, unit: head, "block": block, "statistic": float(observed[h]),
                         "p_value": float(p[h]), "test": f"{layer}.{block}.{h}",
                         **({} if cosine is None else {"alignment": float(cosine[h])})})
    if not rows:
        raise InputError("no collected blocks to test")
    df = pd.DataFrame(rows)
    # one hypothesis per storage head block: query heads sharing a K/V block share its test
    distinct = df.drop_duplicates("test")
    q = pd.Series(false_discovery_control(distinct["p_value"].to_numpy(), method="bh"), index=distinct["test"])
    df["q_value"] = df["test"].map(q).to_numpy()
    return df.drop(columns="test")


def _alignment(ga: torch.Tensor, gb: torch.Tensor, fisher_pool: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """``[H_b]``: cosine of the tasks' mean gradients with weights 1/(Î + ε + λ) (NaN for a zero mean)."""
    fisher = (ga.double().square().mean(0) if cfg.normalizer == "a" else fisher_pool.double())
    w = 1.0 / (fisher + cfg.eps + ridge(fisher, cfg))
    ma, mb = ga.double().mean(0), gb.double().mean(0)
    norm = ((ma.square() * w).sum(-1) * (mb.square() * w).sum(-1)).sqrt()
    return torch.where(norm > 0, (ma * mb * w).sum(-1) / norm, torch.full_like(norm, float("nan")))


def distributions_differ(result: Any, n_permutations: int = 999, seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Do the two tasks' gradients differ on each head block? The statistic is the mean ``signed`` score
    ``T = Σ_S ḡ_A ḡ_B / (Î + ε + λ)`` with the alignment (cosine) beside it, and the null re-deals the A/B
    labels over the pooled samples: a small p says the two tasks' gradient distributions differ, which
    agreeing tasks with different loss scales also do. It is **not** a conflict test; that is
    :func:`sketchfisher.interference.conflicts.conflict_table` (``res.head_conflicts()``). Needs an exact
    codec; ``progress`` shows a bar over the blocks."""
    cfg = replace(result.cfg, variant="signed", normalizer="a" if result.cfg.normalizer == "loo" else result.cfg.normalizer)
    df = permutation_test(result.layout, result_grads(result), cfg, n_permutations, seed, alignment=True,
                          progress=progress)
    unit = result.layout.unit_column
    df = df[["layer", unit, "block", "alignment", "statistic", "p_value", "q_value"]]
    return df.sort_values(["q_value", "layer", unit]).reset_index(drop=True)


def result_grads(result: Any) -> BlockGrads:
    """Exact block gradients of a result computed with ``sf.Exact()`` or ``sf.Factors()``."""
    ctx = result.context
    if ctx is None or ctx.exact is None:
        raise InputError("statistics need exact per-sample gradients: analyze with codec=sf.Exact() or sf.Factors() "
                         "(a sketch keeps only the i-side of A and the j-side of B, which cannot be permuted)")

    def grads(layer: int, block: str):
        ga, gb = ctx.rep_a.block(result.layout, layer, block), ctx.rep_b.block(result.layout, layer, block)
        return None if ga is None or gb is None else (ga, gb)
    return grads


def bootstrap_ci(result: Any, confidence_level: float = 0.95, n_resamples: int = 999, seed: int = 0,
                 method: str = "percentile") -> pd.DataFrame:
    """Bootstrap intervals of each cell's mean score, resampling task-A and task-B samples independently.

    Uses ``scipy.stats.bootstrap`` with the two index vectors as independent samples
    (``paired=False``). Returns layer, head, block, mean, low, high.
    """
    scores = result.scores.double()
    n_a, n_b, L, H, B = scores.shape
    flat = scores.reshape(n_a, n_b, -1).numpy()

    def statistic(ia: np.ndarray, ib: np.ndarray, axis: int = -1) -> np.ndarray:
        ia, ib = np.asarray(ia, dtype=int), np.asarray(ib, dtype=int)
        if ia.ndim == 1:
            return np.nanmean(flat[ia][:, ib], axis=(0, 1))
        return np.stack([np.nanmean(flat[a][:, b], axis=(0, 1)) for a, b in zip(ia, ib)], axis=-1)

    res = bootstrap((np.arange(n_a), np.arange(n_b)), statistic, paired=False, vectorized=True,
                    confidence_level=confidence_level, n_resamples=n_resamples, method=method,
                    rng=np.random.default_rng(seed))
    idx = np.indices((L, H, B)).reshape(3, -1)
    return pd.DataFrame({"layer": idx[0], result.layout.unit_column: idx[1],
                         "block": [result.layout.block_names[b] for b in idx[2]],
                         "mean": statistic(np.arange(n_a), np.arange(n_b)),
                         "low": res.confidence_interval.low, "high": res.confidence_interval.high})
