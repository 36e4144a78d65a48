"""The sketched scores of one (layer, block) and their standard errors (:class:`SketchBlock`).

Each side's vectors arrive sketched and centred (:mod:`sketchfisher.compress.sketch_scores` prepares and makes
them), with their exact squared norms and the exact scalars the centring takes away; a score is the sketched inner
product plus those scalars, its standard error the Johnson–Lindenstrauss variance of that inner product (plus the
storage's known rounding noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .sketch import Sketch


@dataclass
class SketchBlock:
    """Sketched scores of one (layer, block): ⟨R x̃_i, R ỹ_j⟩ + c_i + d_j − e with JL standard errors."""

    xa: torch.Tensor   # [nA, H_b, k]
    na: torch.Tensor   # ‖x̃_i‖² [nA, H_b]
    ca: torch.Tensor   # ⟨x'_i, ȳ'⟩ [nA, H_b]
    yb: torch.Tensor   # [nB, H_b, k]
    nb: torch.Tensor
    db: torch.Tensor
    e: torch.Tensor    # [H_b]
    k: int
    fpc: float         # finite-population correction (srht), else 1
    qa: Optional[torch.Tensor] = None  # known storage-error variance per coordinate [nA, H_b] (int4), else None
    qb: Optional[torch.Tensor] = None
    ga: Optional[torch.Tensor] = None  # scaled centring's γ_i [nA, H_b] (x̃_i = x'_i − (1 + γ_i) x̄'); None: 0
    gb: Optional[torch.Tensor] = None  # γ_j [nB, H_b]

    @classmethod
    def recentred(cls, a: tuple, b: tuple, e: torch.Tensor, k: int, fpc: float, qa, qb, ga,
                  residual: tuple[torch.Tensor, torch.Tensor]) -> "SketchBlock":
        """Scores of task B's single pass with scaled centring, its mean residual ``m`` taken away
        (:func:`residual_centre`). B was stored as ``ỹ_j = y'_j − β_j x̄'``; with ``ŷ_j = ỹ_j − m``,
        ``y'_j = ŷ_j + (β_j − b) x̄' + ȳ'``, and as x̃_i ⊥ x̄' (scaled centring of A) ``⟨x'_i, y'_j⟩ = ⟨x̃_i, ŷ_j⟩ +
        ⟨x'_i, ȳ'⟩ + α_i (⟨x̄', y'_j⟩ − e)``: the mean-centred form with β = 1. ‖ŷ_j‖² (error bars only) takes
        ⟨ỹ_j, m⟩ from the sketches, and is taken in quadrature with that term's own standard
        deviation (the error bars never rest on a cancelled norm)."""
        rm, m2 = residual
        yb, nb, db = b[0], b[1], b[2]
        rm = rm.to(yb.device, yb.dtype)
        cross = torch.einsum("jhk,hk->jh", yb, rm)
        m2 = m2.to(nb.device, nb.dtype)
        # ⟨ỹ_j, m⟩ is sketched, and twice its error (sd ≈ √((‖ỹ_j‖²‖m‖² + ⟨ỹ_j, m⟩²)/k)) can be as large as ‖ŷ_j‖²
        # itself where B's samples lie along m; the error bars take ‖ŷ_j‖² and that sd in quadrature (never a
        # cancelled norm; next to nothing added where ‖ŷ_j‖² is well above the sd)
        spread = 2 * ((nb.clamp_min(0) * m2 + cross.square()) / k).sqrt()
        nb = torch.hypot((nb - 2 * cross + m2).clamp_min(0), spread)
        return cls(*a, yb - rm, nb, db, e, k, fpc, qa, qb, ga, None)

    @property
    def n_a(self) -> int:
        return self.xa.shape[0]

    @property
    def row_bytes(self) -> int:
        return 8 * (self.xa.shape[1] * self.xa.shape[2] + 3 * self.yb.shape[0] * self.xa.shape[1])

    def mean_stderr(self) -> torch.Tensor:
        """Standard error ``[H_b]`` of the mean score over all pairs. By linearity that mean's sketched term is
        ⟨R X̄, R Ȳ⟩ of the sides' mean centred vectors, one JL inner product (the pairs' errors are not
        independent, so it is not the pairs' stderr over √(nA·nB)); with variance reduction X̄ ≈ 0 and the
        mean is exact up to rounding."""
        xm, ym = self.xa.double().mean(0), self.yb.double().mean(0)
        term = (xm * ym).sum(-1)
        var = (term.square() + xm.square().sum(-1) * ym.square().sum(-1)) / self.k * self.fpc
        if self.qa is not None or self.qb is not None:  # the means' storage errors (independent per sample)
            qa = torch.zeros_like(self.na) if self.qa is None else self.qa
            qb = torch.zeros_like(self.nb) if self.qb is None else self.qb
            sa, sb = qa.sum(0) / self.n_a ** 2, qb.sum(0) / self.yb.shape[0] ** 2
            var = var + ym.square().sum(-1) * sa + xm.square().sum(-1) * sb + self.k * sa * sb
        return var.sqrt()

    def shared_error_ranks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side's effective rank ``[H_b]`` in this block: the participation ratio ``n² / ‖Ĝ‖²_F`` of the
        sketched vectors' cosine matrix Ĝ (unit diagonal, from the exact norms; each cosine's sketch and storage
        noise removed from its square on average). Under one map a pair's error is ``x̃_iᵀ(RᵀR − I)ỹ_j``: when
        the vectors of a side span few directions, the block's pairs share few random terms, and their product
        ``rank_a · rank_b`` is about the number of independent errors among the block's pairs."""
        return _participation(self.xa, self.na, self.qa, self.k), _participation(self.yb, self.nb, self.qb, self.k)

    def rows(self, lo: int, hi: int):
        term = torch.einsum("ihk,jhk->ijh", self.xa[lo:hi], self.yb)
        if self.ga is None and self.gb is None:  # centred by the means: α = β = 1
            scores = term + self.ca[lo:hi, None, :] + self.db[None, :, :] - self.e[None, None, :]
        else:  # x' = x̃ + α x̄', y' = ỹ + β ȳ': ⟨x', y'⟩ = ⟨x̃, ỹ⟩ + β⟨x', ȳ'⟩ + α⟨x̄', y'⟩ − αβ⟨x̄', ȳ'⟩
            alpha = 1.0 + (torch.zeros_like(self.ca) if self.ga is None else self.ga.double())[lo:hi, None, :]
            beta = 1.0 + (torch.zeros_like(self.db) if self.gb is None else self.gb.double())[None, :, :]
            scores = term + beta * self.ca[lo:hi, None, :] + alpha * (self.db[None, :, :] - beta * self.e[None, None, :])
        var = (term.square() + self.na[lo:hi, None, :] * self.nb[None, :, :]) / self.k * self.fpc
        if self.qa is not None or self.qb is not None:
            # the stored vectors' dithered rounding: ⟨a + ε, b + δ⟩ adds ‖a‖²σ_δ² + ‖b‖²σ_ε² + k σ_ε² σ_δ²
            qa = torch.zeros_like(self.na[lo:hi]) if self.qa is None else self.qa[lo:hi]
            qb = torch.zeros_like(self.nb) if self.qb is None else self.qb
            var = var + (self.na[lo:hi, None, :] * qb[None] + qa[:, None, :] * self.nb[None] + self.k * qa[:, None, :] * qb[None])
        return scores, var.sqrt()


def _participation(v: torch.Tensor, norm2: torch.Tensor, noise: Optional[torch.Tensor], k: int) -> torch.Tensor:
    """``n² / ‖Ĝ‖²_F`` per head of sketched vectors ``v [n, H, k]`` with exact squared norms ``norm2 [n, H]`` and
    known per-coordinate storage noise (or None). Ĝ is the cosine matrix, diagonal 1; the sum of its sketched
    off-diagonal squares loses their expected noise ``(1 + c²)/k`` plus the storage's, so it is unbiased on
    average, and the sum is kept within [0, n(n − 1)]. ``Σ ĉ²`` is ``‖V̂ᵀV̂‖²_F`` through whichever of ``n × n`` and ``k × k`` is smaller, so many samples cost
    no ``n²`` memory. Samples whose vector is zero in the block (no error in any of their pairs) are left out; NaN
    where none is left."""
    norm2 = norm2.double()
    live = norm2 > 0  # [n, H]
    unit = torch.where(live[..., None], v.double() / norm2.clamp_min(torch.finfo(torch.float64).tiny).sqrt()[..., None], 0.0)
    unit = unit.transpose(0, 1)  # [H, n, k]
    gram = unit @ unit.transpose(1, 2) if unit.shape[1] <= unit.shape[2] else unit.transpose(1, 2) @ unit
    n = live.sum(0).double()
    diagonal = unit.square().sum(-1).square().sum(-1)  # Σ_i ĉ_ii² (the sketched norms' ratios, squared)
    q = torch.where(live, (torch.zeros_like(norm2) if noise is None else noise.double()) / norm2.clamp_min(
        torch.finfo(torch.float64).tiny), 0.0)  # storage noise per norm², per sample [n, H]
    qs, q2 = q.sum(0), q.square().sum(0)
    noise2 = (n * (n - 1)) / k + 2 * (n - 1) * qs + k * (qs.square() - q2)  # Σ_{i≠j} (1/k + q_i + q_j + k q_i q_j)
    off = ((gram.square().sum((1, 2)) - diagonal - noise2) / (1 + 1 / k)).clamp(min=0)
    off = torch.minimum(off, n * (n - 1))  # (each cosine² ≤ 1: the rank lies in [1, n])
    return torch.where(n > 0, n.square() / (n + off), float("nan"))


def finite_population_correction(codec: Sketch, size: int) -> float:
    """(P − k)/(P − 1) for srht (k of P rows without replacement), 1 otherwise."""
    if codec.kind != "srht":
        return 1.0
    P = codec.map(0, 0, 0, size).padded
    return max(P - codec.k, 0) / max(P - 1, 1)
