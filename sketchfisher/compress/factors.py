"""``sf.Factors(rank=None)``: per-sample gradient factors ``(A_i, D_i)`` per linear module.

Lossless by default: ``g_i = D_iᵀ A_i`` with one row per real token. With ``rank=r`` each sample's
gradient is replaced by its best rank-r approximation (Eckart–Young), computed from the factors
without forming ``g_i``: QR of ``D_iᵀ`` and ``A_iᵀ``, SVD of the small core ``R_D R_Aᵀ``. The result is
again a factor pair with r pseudo-tokens, so every consumer treats both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch.nn.utils.rnn import pad_sequence

from ..errors import InputError
from ..layout import Layout


@dataclass(frozen=True)
class Factors:
    """Store per-sample factors; ``rank=None`` is lossless, ``rank=r`` keeps the best rank-r gradient."""

    rank: Optional[int] = None
    name: ClassVar[str] = "factors"
    source: ClassVar[str] = "factors"
    two_pass: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise InputError(f"Factors.rank must be None or a positive int, got {self.rank!r}")

    def to_dict(self) -> dict:
        return {"codec": self.name, "rank": self.rank}

    def representation(self) -> "FactorContributions":
        return FactorContributions(rank=self.rank)


def truncate(A: torch.Tensor, D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of each ``g_b = D_bᵀ A_b`` as factors ``(A' [B, r, in], D' [B, r, out])``.

    Rows beyond a sample's true rank come out zero. ``rank >= T`` returns the inputs unchanged.
    """
    if rank >= A.shape[-2]:
        return A, D
    q_d, r_d = torch.linalg.qr(D.transpose(-1, -2).double())  # [B, out, k1], [B, k1, T]
    q_a, r_a = torch.linalg.qr(A.transpose(-1, -2).double())  # [B, in, k2],  [B, k2, T]
    u, s, vh = torch.linalg.svd(r_d @ r_a.transpose(-1, -2), full_matrices=False)
    r = min(rank, s.shape[-1])
    d_new = (q_d @ u[..., :r] * s[..., None, :r]).transpose(-1, -2)  # [B, r, out]
    a_new = vh[..., :r, :] @ q_a.transpose(-1, -2)                   # [B, r, in]
    return a_new.to(A.dtype), d_new.to(D.dtype)


@dataclass
class FactorContributions:
    """Per-module factor pairs of n samples. Samples keep their own token counts (ragged)."""

    rank: Optional[int] = None
    A: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    D: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    n: int = 0

    def add(self, captured: Any) -> None:
        """Add one captured batch (a ``BatchFactors``: ``A``, ``D`` and ``lengths``)."""
        self.append(captured.A, captured.D, captured.lengths)

    def append(self, A: dict[str, torch.Tensor], D: dict[str, torch.Tensor], lengths: torch.Tensor) -> None:
        """Add a batch: ``A[m] [B, T, in]``, ``D[m] [B, T, out]``; real tokens are kept, padding dropped."""
        pairs = {m: (A[m], D[m]) if self.rank is None else truncate(A[m], D[m], self.rank) for m in A}
        keeps = {m: (a.abs().sum(-1) > 0) & (d.abs().sum(-1) > 0) for m, (a, d) in pairs.items()}  # rows that count
        # one device sync for the whole batch: samples with no zero row are kept as views, without indexing
        here = next(iter(keeps.values())).device if keeps else None  # modules may sit on several cards
        full = torch.stack([k.all(-1).to(here) for k in keeps.values()]).cpu() if keeps else None
        for i, (module, (a, d)) in enumerate(pairs.items()):
            keep = keeps[module]
            self.A.setdefault(module, []).extend(a[b] if full[i, b] else a[b][keep[b]] for b in range(a.shape[0]))
            self.D.setdefault(module, []).extend(d[b] if full[i, b] else d[b][keep[b]] for b in range(d.shape[0]))
        self.n += int(lengths.shape[0])

    def __len__(self) -> int:
        return self.n

    def padded(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``A [n, T_max, in]``, ``D [n, T_max, out]`` with zero rows for missing tokens."""
        return pad_sequence(self.A[module], batch_first=True), pad_sequence(self.D[module], batch_first=True)

    def block(self, layout: Layout, layer: int, block: str) -> torch.Tensor | None:
        """Per-sample gradients of the distinct head blocks ``[n, H_b, S]``, formed block by block."""
        hbs = layout.head_blocks(layer, block)
        module = hbs[0].module_name
        if module not in self.A:
            return None
        A, D = self.padded(module)
        return torch.stack([hb.grad_from_factors(A, D).flatten(-2) for hb in hbs], dim=-2)

    def nbytes_per_sample(self) -> float:
        """Mean stored bytes per sample (real rows × (in + out) × element size), over all modules."""
        if self.n == 0:
            raise InputError("no samples collected")
        total = sum(t.numel() * t.element_size() for side in (self.A, self.D) for ts in side.values() for t in ts)
        return total / self.n
