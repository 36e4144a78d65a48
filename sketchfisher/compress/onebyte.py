"""Model-sized per-entry quantities in one byte: fp8 (e4m3) codes with one scale per head block.

A collection's preparations hold several model-sized tensors on the device through its side passes: task B's
balance ``w_b``, the two centres ``x̄'`` and ``ȳ'`` and the conflict test's weights ``u = ḡ/(Î+ε+λ)``. None of them
needs many bits:

- any positive balance and any centre leave the sketched scores exact, as long as every use reads the same
  rounded values (task A's weight is then formed from the rounded balance, so the product of the two weights is
  the denominator to fp32 precision);
- the conflict weights only make each sample's conflict scalar, which feeds the test's variance; the test's
  statistic T itself is formed from the two tasks' exact means.

What they need is range: a centre's entries follow the block's gradient scale, which varies from head block to
head block by orders of magnitude. So each head block's values are divided by its own scale
(its largest magnitude over 448, fp8 e4m3's largest finite value) before rounding to the nearest fp8 value, and a
reader multiplies the fp8 value by the scale in fp32, on the CPU as in the GPU kernel (bitwise alike). A positive
quantity (a balance) is kept at least the smallest positive code, so it never becomes 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_TINY = 2.0 ** -9  # the smallest positive (subnormal) e4m3 value


@dataclass(frozen=True)
class OneByte:
    """``values = codes · scale``: ``codes`` fp8 e4m3 ``[..., H, S]``, ``scale`` fp32 ``[..., H]`` (one per head block)."""

    codes: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def encode(cls, x: torch.Tensor, positive: bool = False) -> "OneByte":
        """``x [..., H, S]`` rounded to the nearest code of its head block's scale (computed in fp64, so that a CPU and
        a GPU round alike); ``positive``: every value at least the smallest positive code (for balances)."""
        amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1).double()  # (the largest |x|: exact in any dtype)
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).float()
        y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        torch.div(x, scale.double()[..., None], out=y)  # the fp64 quotient, rounded once to fp32 in the same kernel
        y.clamp_(FP8_TINY if positive else -FP8_MAX, FP8_MAX)  # (bounds exact in fp32: clamping commutes with rounding)
        return cls(y.to(FP8), scale)

    def decode(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The values: the fp32 product of code and scale (what the kernel reads), then cast to ``dtype``."""
        return (self.codes.float() * self.scale[..., None]).to(dtype)

    def to(self, device: Union[torch.device, str], non_blocking: bool = False) -> "OneByte":
        return OneByte(self.codes.to(device, non_blocking=non_blocking), self.scale.to(device, non_blocking=non_blocking))

    def __getitem__(self, index) -> "OneByte":
        """Index the leading (non-entry) dimensions only, e.g. ``u[None]`` or ``u[0]``: codes and scales alike."""
        return OneByte(self.codes[index], self.scale[index])

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def nbytes(self) -> int:
        return self.codes.numel() + self.scale.numel() * 4


Coded = Union[torch.Tensor, OneByte]


def values(t: Optional[Coded], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A plain tensor of ``t``'s values (decoded where it is :class:`OneByte`), in ``dtype`` where given."""
    if isinstance(t, OneByte):
        return t.decode(dtype or torch.float32)
    return t if t is None or dtype is None else t.to(dtype)


def nbytes(t: Optional[Coded]) -> int:
    if t is None:
        return 0
    return t.nbytes() if isinstance(t, OneByte) else t.numel() * t.element_size()


def narrower(t: torch.Tensor, dtype: Union[torch.dtype, str, None], positive: bool = False) -> Coded:
    """``t`` kept in ``dtype``: ``"fp8"`` for :class:`OneByte`, a torch dtype for a cast."""
    if dtype == "fp8":
        return OneByte.encode(t, positive=positive)
    return t if dtype is None else t.to(dtype)


__all__ = ["FP8", "FP8_MAX", "Coded", "OneByte", "narrower", "nbytes", "values"]
