"""The Stage 6 metric on plain tensors: the variant's i-side and j-side vectors, and their contraction.

For one (layer, block) with distinct head blocks ``H_b`` of ``S`` entries each, a score is
``M_ij = Σ_S x_i ⊙ y_j`` with ``x_i = f_i(g_i) / (Î + ε + λ_S)`` and ``y_j = f_j(g_j)``, where the
variant (:mod:`sketchfisher.metric.variants`) supplies ``f_i`` and ``f_j``.

``Î`` is task A's Fisher (``normalizer="a"``), the pooled A ∪ B Fisher (``"pooled"``), or task A's
Fisher without sample i (``"loo"``: Î₋ᵢ = (n Î − g_i²)/(n − 1)). The ridge
λ_S = max(λ_abs, λ_rel · median_S Î) is computed per head block from the (non-leave-one-out) Î.
No hooks, no models.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..errors import InputError
from .config import ScoreConfig


def ridge(fisher: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """λ_S per head block: ``[H_b, 1]`` from a Fisher block ``[H_b, S]``."""
    lam = torch.full((fisher.shape[0], 1), float(cfg.ridge_abs), dtype=fisher.dtype, device=fisher.device)
    if cfg.ridge_rel > 0:
        med = fisher.median(dim=-1, keepdim=True).values
        lam = torch.maximum(lam, cfg.ridge_rel * med)
    return lam


def shift(fisher: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """ε + λ_S: what is added to Î in the denominator, ``[H_b, 1]``."""
    return cfg.eps + ridge(fisher, cfg)


def loo_denominator(fisher_a: torch.Tensor, g: torch.Tensor, count: int, lam: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Leave-one-out denominator ``Î₋ᵢ + ε + λ`` of each sample's block ``g [n, H_b, S]``.

    The subtraction is in fp64: when sample i dominates an entry, n·Î − g_i² cancels."""
    if count < 2:
        raise InputError(f"normalizer='loo' needs at least 2 task-A samples, got {count}")
    loo = (count * fisher_a.double() - g.double().square()) / (count - 1)
    return loo.clamp_min(0).to(dtype) + lam


def i_side(g: torch.Tensor, fisher: torch.Tensor, lam: torch.Tensor, count: int, cfg: ScoreConfig,
           weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``f_i(g) / (Î + lam)`` (Î₋ᵢ under leave-one-out), times ``weight`` when given; ``[n, H_b, S]``.

    ``fisher`` is the normaliser Î ``[H_b, S]`` (task A's Fisher for leave-one-out), ``lam`` the
    shift ε + λ, ``count`` the number of samples Î averages. All in ``cfg.dtype``."""
    g = g.to(cfg.dtype)
    num = cfg.spec.i_numerator(g)
    if cfg.normalizer == "loo":
        denom = loo_denominator(fisher, g, count, lam, cfg.dtype)
    else:
        denom = fisher + lam
    x = num / denom
    return x if weight is None else x * weight


def x_side(ga: torch.Tensor, fisher: torch.Tensor, count: int, cfg: ScoreConfig) -> torch.Tensor:
    """The variant's i-side vectors ``x [nA, H_b, S]`` of task-A block gradients (Î ``[H_b, S]``)."""
    fisher = fisher.to(cfg.dtype)
    return i_side(ga, fisher, shift(fisher, cfg), count, cfg)


def y_side(gb: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """The variant's j-side vectors ``y [nB, H_b, S]``."""
    return cfg.spec.j_side_of(gb.to(cfg.dtype))


def contract(x: torch.Tensor, y: torch.Tensor, max_bytes: int = 1 << 28) -> torch.Tensor:
    """``Σ_s x[i,h,s] y[j,h,s]`` → ``[nA, nB, H_b]`` as batched matmuls, chunked over i."""
    n_a, heads, size = x.shape
    out = torch.empty((n_a, y.shape[0], heads), dtype=x.dtype, device=x.device)
    yt = y.permute(1, 2, 0)  # [H_b, S, nB]
    per_row = max(1, heads * size * x.element_size())
    step = max(1, min(n_a, max_bytes // per_row))
    for lo in range(0, n_a, step):
        xs = x[lo:lo + step].permute(1, 0, 2)  # [H_b, c, S]
        out[lo:lo + step] = torch.bmm(xs, yt).permute(1, 2, 0)
    return out


def block_scores(ga: torch.Tensor, gb: torch.Tensor, fisher: torch.Tensor, count: int,
                 cfg: ScoreConfig) -> torch.Tensor:
    """Scores ``[nA, nB, H_b]`` of one (layer, block) from exact per-sample gradients."""
    if ga.shape[1:] != gb.shape[1:] or ga.shape[1:] != fisher.shape:
        raise InputError(
            f"block shapes disagree: task A {tuple(ga.shape)}, task B {tuple(gb.shape)}, Fisher {tuple(fisher.shape)}"
        )
    return contract(x_side(ga, fisher, count, cfg), y_side(gb, cfg))
