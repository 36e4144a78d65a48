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
from .base import Codec


@dataclass(frozen=True)
class Factors(Codec):
    """Store per-sample factors; ``rank=None`` is lossless, ``rank=r`` keeps the best rank-r gradient."""

    rank: Optional[int] = None
    name: ClassVar[str] = "factors"
    source: ClassVar[str] = "factors"
    summary: ClassVar[str] = "per-sample token factors (lossless), or their best rank-r gradient"

    def __post_init__(self) -> None:
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise InputError(f"Factors.rank must be None or a positive int, got {self.rank!r}")

    def bytes_per_sample(self, head_block_sizes: list[int], factor_width: int, tokens: int) -> float:
        """fp32 factor rows (one per token, or ``rank`` pseudo-tokens) of width Σ (in + out)."""
        return 4.0 * (self.rank or tokens) * factor_width

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
        pairs = {m: (A[m].float(), D[m].float()) for m in A}  # (a half-precision model's factors, exact in fp32)
        pairs = {m: p if self.rank is None else truncate(*p, self.rank) for m, p in pairs.items()}
        keeps = {m: (a.abs().sum(-1) > 0) & (d.abs().sum(-1) > 0) for m, (a, d) in pairs.items()}  # rows that count
        # one device sync for the whole batch (every module's row mask to the host at once); then each sample
        # keeps a view of its leading rows (right padding, a last token without loss) or, rarely, gathers
        # scattered rows with an index sent ahead asynchronously
        here = next(iter(keeps.values())).device if keeps else None  # modules may sit on several cards
        flat = torch.cat([k.reshape(-1).to(here) for k in keeps.values()]).cpu() if keeps else None
        offset = 0
        for module, (a, d) in pairs.items():
            B, T = keeps[module].shape
            mask = flat[offset:offset + B * T].view(B, T)
            offset += B * T
            rows = [_rows(mask[b], a.device) for b in range(B)]
            self.A.setdefault(module, []).extend(_take(a[b], r) for b, r in enumerate(rows))
            self.D.setdefault(module, []).extend(_take(d[b], r) for b, r in enumerate(rows))
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


def _rows(mask: torch.Tensor, device: torch.device) -> int | torch.Tensor:
    """The kept rows of one sample from its host mask: a count when they are the leading rows, else an
    index tensor on ``device`` (sent from pinned memory, without a device sync)."""
    count = int(mask.sum())
    if bool(mask[:count].all()):
        return count
    idx = mask.nonzero().flatten()
    return idx.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else idx


def _take(t: torch.Tensor, rows: int | torch.Tensor) -> torch.Tensor:
    return t[:rows] if isinstance(rows, int) else t.index_select(0, rows)
