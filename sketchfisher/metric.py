"""The Stage 6 metric on plain tensors (SEMANTICS §4). No hooks, no models.

For one (layer, block) with distinct head blocks ``H_b`` of ``S`` entries each:

* ``paper``:     M_ij = Σ_S g_i² / (Î + ε + λ_S) · |g_j|
* ``signed``:    M_ij = Σ_S g_i g_j / (Î + ε + λ_S)       (> 0 synergy, < 0 conflict)
* ``symmetric``: M_ij = Σ_S |g_i| |g_j| / (Î + ε + λ_S)

``Î`` is task A's Fisher (``normalizer="a"``), the pooled A ∪ B Fisher (``"pooled"``), or task A's
Fisher without sample i (``"loo"``: Î₋ᵢ = (n Î − g_i²)/(n − 1)). The ridge
λ_S = max(λ_abs, λ_rel · median_S Î) is computed per head block from the (non-leave-one-out) Î.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError

VARIANTS = ("paper", "signed", "symmetric")
NORMALIZERS = ("a", "pooled", "loo")


@dataclass(frozen=True)
class ScoreConfig:
    """Validated Stage 6 options. ``dtype`` is the precision of the side vectors and contractions:
    fp32 by default (SEMANTICS §1 asks for fp32 or wider; per-sample gradients are fp32), fp64 on
    request for reference computations (about 3× slower on CPU)."""

    variant: str = "paper"
    normalizer: str = "a"
    eps: float = 1e-10
    ridge_abs: float = 0.0
    ridge_rel: float = 0.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InputError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.normalizer not in NORMALIZERS:
            raise InputError(f"normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}")
        for name in ("eps", "ridge_abs", "ridge_rel"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
                raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise InputError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")

    @property
    def slice_relative(self) -> bool:
        """True when λ depends on the slice, which breaks head additivity."""
        return self.ridge_rel > 0


def ridge(fisher: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """λ_S per head block: ``[H_b, 1]`` from a Fisher block ``[H_b, S]``."""
    lam = torch.full((fisher.shape[0], 1), float(cfg.ridge_abs), dtype=fisher.dtype, device=fisher.device)
    if cfg.ridge_rel > 0:
        med = fisher.median(dim=-1, keepdim=True).values
        lam = torch.maximum(lam, cfg.ridge_rel * med)
    return lam


def x_side(ga: torch.Tensor, fisher: torch.Tensor, count: int, cfg: ScoreConfig) -> torch.Tensor:
    """The variant's i-side vectors ``x [nA, H_b, S]`` of task-A block gradients.

    ``fisher`` is the normaliser Î ``[H_b, S]``; ``count`` the number of samples it averages
    (needed for leave-one-out, where Î₋ᵢ = (n Î − g_i²)/(n − 1)).
    """
    ga, fisher = ga.to(cfg.dtype), fisher.to(cfg.dtype)
    lam = cfg.eps + ridge(fisher, cfg)
    denom = fisher + lam
    if cfg.normalizer == "loo":
        if count < 2:
            raise InputError(f"normalizer='loo' needs at least 2 task-A samples, got {count}")
        # subtract in fp64: when sample i dominates an entry, n·Î − g_i² cancels
        loo = (count * fisher.double() - ga.double().square()) / (count - 1)
        denom = loo.clamp_min(0).to(cfg.dtype) + lam
    num = {"paper": ga.square(), "signed": ga, "symmetric": ga.abs()}[cfg.variant]
    return num / denom


def y_side(gb: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """The variant's j-side vectors ``y [nB, H_b, S]``: ``g_j`` for signed, else ``|g_j|``."""
    gb = gb.to(cfg.dtype)
    return gb if cfg.variant == "signed" else gb.abs()


def side_vectors(ga: torch.Tensor, gb: torch.Tensor, fisher: torch.Tensor, count: int, cfg: ScoreConfig,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sides at once: ``(x_side(ga, ...), y_side(gb, ...))``."""
    return x_side(ga, fisher, count, cfg), y_side(gb, cfg)


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
    x, y = side_vectors(ga, gb, fisher, count, cfg)
    return contract(x, y)
