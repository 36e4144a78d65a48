"""Sketched Stage 6 scores of one (layer, block), on plain tensors.

Pass 1 gives exact per-task statistics; :func:`prepare_block` turns them into the per-entry
quantities pass 2 needs (:class:`BlockPrep`): the denominator, the balancing weights and the task
centres. :func:`side_vector` forms a batch's balanced i-side (task A) or j-side (task B) vectors;
:class:`SketchBlock` scores sketched sides against each other with standard errors. The variant
(i-side and j-side transforms) comes from :attr:`ScoreConfig.spec`; nothing here is per variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..metric import ScoreConfig, i_side, shift
from .sketch import Sketch

Side = str  # "a": task A's i-side vectors, "b": task B's j-side vectors


@dataclass
class BlockPrep:
    """Pass-1 quantities of one (layer, block), all ``[H_b, S]`` except ``lam [H_b, 1]`` and ``e [H_b]``."""

    denom: torch.Tensor      # Î + ε + λ (normaliser)
    lam: torch.Tensor        # ε + λ
    fisher_a: Optional[torch.Tensor]  # task A's Î, kept only for leave-one-out (it is model-sized)
    balance: torch.Tensor    # √m, m = mean|g| over A ∪ B (ones without variance reduction)
    x_bar: torch.Tensor      # balanced i-side centre (zeros without variance reduction)
    y_bar: torch.Tensor      # balanced j-side centre
    e: torch.Tensor          # ⟨x̄', ȳ'⟩ (fp64)

    def centre(self, side: Side) -> torch.Tensor:
        return self.x_bar if side == "a" else self.y_bar

    def other(self, side: Side) -> torch.Tensor:
        return self.y_bar if side == "a" else self.x_bar

    def weight(self, side: Side) -> torch.Tensor:
        """Per-entry factor of the transformed gradient: balance/denominator (i-side), 1/balance (j-side)."""
        return self.balance / self.denom if side == "a" else self.balance.reciprocal()


def prepare_block(fisher: torch.Tensor, fisher_a: torch.Tensor, mean_i_a: torch.Tensor, mean_j_b: torch.Tensor,
                  abs_a: Optional[torch.Tensor], abs_b: Optional[torch.Tensor], n_a: int, n_b: int,
                  cfg: ScoreConfig, codec: Sketch) -> BlockPrep:
    """Pass-1 quantities of one (layer, block) from plain ``[H_b, S]`` statistics.

    ``fisher`` is the normaliser Î (A, or A ∪ B), ``fisher_a`` task A's; ``mean_i_a`` the mean of the
    i-side transform over task A and ``mean_j_b`` of the j-side transform over task B
    (:data:`sketchfisher.metric.MEAN_OF`); ``abs_a``/``abs_b`` the mean |g| per task (balancing).
    Without variance reduction only the denominator is used.
    """
    lam = shift(fisher, cfg)
    denom = fisher + lam
    kept_a = fisher_a if cfg.normalizer == "loo" else None
    if not codec.variance_reduction:
        zeros = torch.zeros_like(fisher)
        return _cast(BlockPrep(denom, lam, kept_a, torch.ones_like(fisher), zeros, zeros, zeros.sum(-1)), cfg)
    m = (abs_a * n_a + abs_b * n_b) / (n_a + n_b)
    balance = torch.where(m > 0, m.sqrt(), torch.ones_like(m))
    x_bar, y_bar = mean_i_a / denom * balance, mean_j_b / balance
    return _cast(BlockPrep(denom, lam, kept_a, balance, x_bar, y_bar, (x_bar * y_bar).sum(-1)), cfg)


def _cast(prep: BlockPrep, cfg: ScoreConfig) -> BlockPrep:
    """Side vectors are built in ``cfg.dtype``; the exact scalar e keeps fp64."""
    t = lambda x: None if x is None else x.to(cfg.dtype)  # noqa: E731
    return BlockPrep(t(prep.denom), t(prep.lam), t(prep.fisher_a), t(prep.balance), t(prep.x_bar), t(prep.y_bar),
                     prep.e.double())


def side_vector(g: torch.Tensor, prep: BlockPrep, side: Side, count: int, cfg: ScoreConfig) -> torch.Tensor:
    """Balanced i-side (``"a"``) or j-side (``"b"``) vectors ``[B, H_b, S]`` from block gradients.

    ``count`` is task A's sample count (leave-one-out needs it)."""
    g = g.to(cfg.dtype)  # fp32 by default: the CUDA sjlt kernels take fp32/bf16/fp16, not fp64
    if side == "b":
        return cfg.spec.j_side_of(g) / prep.balance
    if cfg.normalizer == "loo":
        return i_side(g, prep.fisher_a, prep.lam, count, cfg, weight=prep.balance)
    return cfg.spec.i_numerator(g) / prep.denom * prep.balance


def sketch_sides(v: torch.Tensor, prep: BlockPrep, side: Side, codec: Sketch, layer: int, block: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre side vectors ``v [B, H_b, S]`` and sketch them: ``(sketches [B, H_b, k], ‖ṽ‖² [B, H_b],
    cross [B, H_b])`` where cross is ``⟨v, other side's centre⟩``."""
    cross = (v * prep.other(side)).sum(-1)
    v = v - prep.centre(side)
    sk = torch.stack([codec.map(layer, block, h, v.shape[-1]).apply(v[:, h]) for h in range(v.shape[1])], 1)
    return sk, v.square().sum(-1), cross


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

    @property
    def n_a(self) -> int:
        return self.xa.shape[0]

    @property
    def row_bytes(self) -> int:
        return 8 * (self.xa.shape[1] * self.xa.shape[2] + 3 * self.yb.shape[0] * self.xa.shape[1])

    def rows(self, lo: int, hi: int):
        term = torch.einsum("ihk,jhk->ijh", self.xa[lo:hi], self.yb)
        scores = term + self.ca[lo:hi, None, :] + self.db[None, :, :] - self.e[None, None, :]
        var = (term.square() + self.na[lo:hi, None, :] * self.nb[None, :, :]) / self.k * self.fpc
        return scores, var.sqrt()


def finite_population_correction(codec: Sketch, size: int) -> float:
    """(P − k)/(P − 1) for srht (k of P rows without replacement), 1 otherwise."""
    if codec.kind != "srht":
        return 1.0
    P = codec.map(0, 0, 0, size).padded
    return max(P - codec.k, 0) / max(P - 1, 1)
