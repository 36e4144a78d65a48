"""The Stage 6 variants, defined once: a table of what each one does to the two samples' gradients.

Every variant scores a task-A sample i against a task-B sample j over a head block S as

    M_ij = Σ_S f_i(g_i) / (Î + ε + λ_S) · f_j(g_j)

and differs only in the entry-wise functions ``f_i`` (the *i-side*) and ``f_j`` (the *j-side*) and
in which sign means conflict. The exact engine, the sketch path (torch and Triton), the statistics,
verification and the result all read this table; adding a variant is one entry (plus its tests).

The mean of ``f(g)`` over a task comes from a pass-1 statistic (``MEAN_OF``): the Fisher Î (``fisher``)
for ``square``, Σ|g| (``abs``) for ``abs``, Σg (``sum``) for ``identity``. Sketch centering uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..errors import InputError

Transform = Literal["identity", "square", "abs"]
TRANSFORM_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda g: g, "square": torch.square, "abs": torch.abs}
MEAN_OF: dict[str, str] = {"square": "fisher", "abs": "abs", "identity": "sum"}


@dataclass(frozen=True)
class Variant:
    """One Stage 6 variant: i-side and j-side transforms, and the sign of a conflict.

    ``conflict_sign`` is +1 when a large score is a conflict and −1 when a negative score is
    (``signed``: positive is synergy). ``conflict_key(s) = conflict_sign · s`` orders scores from the
    strongest conflict down; ``formula`` is the per-pair formula in words for docs and tables.
    """

    name: str
    i_side: Transform
    j_side: Transform
    conflict_sign: Literal[1, -1]
    formula: str
    conflict: str

    def i_numerator(self, g: torch.Tensor) -> torch.Tensor:
        """``f_i(g)``: the i-side before the Fisher normalisation."""
        return TRANSFORM_FNS[self.i_side](g)

    def j_side_of(self, g: torch.Tensor) -> torch.Tensor:
        """``f_j(g)``: the j-side vector."""
        return TRANSFORM_FNS[self.j_side](g)

    def conflict_key(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores turned so that larger means a stronger conflict."""
        return scores * self.conflict_sign

    def at_least_as_extreme(self, null: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
        """Permutation-test comparison: ``null`` is at least as conflicting as ``observed``."""
        return self.conflict_key(null) >= self.conflict_key(observed)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("paper", "square", "abs", 1, "Σ_S g_i² / (Î + ε + λ) · |g_j|",
            "a large score: sample i's Fisher-normalised importance meets sample j's gradient mass"),
    Variant("signed", "identity", "identity", -1, "Σ_S g_i g_j / (Î + ε + λ)",
            "a negative score: the two gradients point against each other (positive is synergy)"),
    Variant("symmetric", "abs", "abs", 1, "Σ_S |g_i| |g_j| / (Î + ε + λ)",
            "a large score: both samples put gradient mass on the same Fisher-normalised entries"),
)}


def variant_of(name: str) -> Variant:
    """The table entry of ``name``; an unknown name raises with the supported list."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise InputError(f"variant must be one of {tuple(VARIANTS)}, got {name!r} "
                         "(a new variant is one entry of sketchfisher.metric.variants.VARIANTS)") from None
