"""Welford states (count, mean, M2) merged with Chan et al.'s exact pairwise formula, and the in-place batch
update that :class:`~sketchfisher.fisher.stats.FisherStats` runs on every parameter (mean and M2 of g², Σ|g|,
Σg), a cache-sized slice at a time on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import InputError
from ..kernels.hashing import round_bf16_stochastic, rounding_slots

QUANTITIES = ("fisher", "m2", "abs", "sum", "half")
"""``fisher``: Welford mean of g² (Î); ``m2``: its Welford M2 (variance across samples); ``abs``: Σ|g|;
``sum``: Σg; ``half``: Σg over the samples at even positions of the task's stream (a fixed split of the task
in two halves, for the conflict test's variance). The sample count is always kept."""
CHUNK_ENTRIES = 1 << 19
"""Entries of a batch (samples x parameter entries) that one slice of a CPU statistics update converts at a
time: 4 MB in fp64, within a core's cache."""
MEAN_ACCESSOR = {"fisher": "fisher", "abs": "mean_abs", "sum": "mean_grad"}
"""The :class:`FisherStats` method that gives the task mean a quantity provides (mean g², |g|, g)."""


@dataclass
class Welford:
    """Elementwise (count, mean, M2) of a stream of equally shaped tensors. ``mean`` and ``m2`` may be
    left out (None): then only the count (and the mean) are tracked."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, dtype: torch.dtype = torch.float64, moments: int = 2) -> None:
        """Add a batch ``x [B, *shape]``; ``moments`` 2 tracks mean and M2, 1 the mean, 0 the count."""
        n = x.shape[0]
        if n == 0:
            return
        if moments == 0:
            self.add(n, None, None)
            return
        x = x.to(dtype)
        mean = x.mean(0)
        self.add(n, mean, (x - mean).square().sum(0) if moments == 2 else None)

    def add(self, n: int, mean: Optional[torch.Tensor], m2: Optional[torch.Tensor] = None) -> None:
        """Merge a batch of ``n`` samples given as its mean and M2 (None where not tracked)."""
        if self.count == 0:
            self.count = n
            self.mean = None if mean is None else mean.clone()
            self.m2 = None if m2 is None else m2.clone()
            return
        total = self.count + n
        if mean is not None:
            delta = mean - self.mean
            if m2 is not None:
                self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
            self.mean = self.mean + delta * (n / total)
        self.count = total

    def merged(self, other: "Welford") -> "Welford":
        out = Welford(self.count, None if self.mean is None else self.mean.clone(),
                      None if self.m2 is None else self.m2.clone())
        if other.count:
            out.add(other.count, other.mean, other.m2)
        return out

    def variance(self) -> torch.Tensor:
        """Unbiased variance across samples, ``M2 / (n − 1)``."""
        if self.count < 2:
            raise InputError(f"variance needs at least 2 samples, have {self.count}")
        if self.m2 is None:
            raise InputError("this Welford state keeps no M2 (collected without the 'm2' quantity)")
        return self.m2 / (self.count - 1)


def add_sum_(acc: torch.Tensor, batch_sum: torch.Tensor, first: int, count: int, slot: int = 0) -> None:
    """``acc += batch_sum`` in place; a bf16 accumulator of wider sums is rounded stochastically (unbiased:
    :func:`~sketchfisher.kernels.hashing.round_bf16_stochastic`, entries ``first, …`` of the flat accumulator,
    ``count`` samples before this batch, the sum's random-bit ``slot``), where rounding to nearest would drop
    increments below half a unit in the last place of a large sum."""
    if acc.dtype == torch.bfloat16 and batch_sum.dtype != torch.bfloat16:
        acc.copy_(round_bf16_stochastic(acc.float() + batch_sum.float(), first, count, slot))
    else:
        acc += batch_sum.to(acc)


def update_in_chunks(g: torch.Tensor, count: int, dtype: torch.dtype, mean: Optional[torch.Tensor], m2: Optional[torch.Tensor],
                      sum_abs: Optional[torch.Tensor], sum_g: Optional[torch.Tensor],
                      sum_half: Optional[torch.Tensor] = None) -> None:
    """Merge the batch ``g [B, *shape]`` into the state in place (Chan's formula), in ``dtype``: the Welford mean
    and M2 of ``g²``, Σ|g|, Σg and Σg over the samples at even positions of the stream (each None where not
    kept) of ``count`` samples so far.

    On the CPU the batch is taken a cache-sized slice of entries at a time: converting and squaring the
    whole batch in fp64 cost three times the gradients' formation, a slice at a time it costs less than
    fp32 over the whole batch (``benchmarks/cpu_e2e.py --micro``). fp32 gradients square exactly in fp64."""
    n = g.shape[0]
    flat = g.reshape(n, -1)
    total = count + n
    step = max(4096, CHUNK_ENTRIES // n) if g.device.type == "cpu" else flat.shape[1]
    state = [None if t is None else t.view(-1) for t in (mean, m2, sum_abs, sum_g, sum_half)]
    slots = rounding_slots(dict(zip(("abs", "sum", "half"), state[2:])), dtype)
    slots = {q: slots.get(q, 0) for q in ("abs", "sum", "half")}  # (an unrounded sum's slot is not read)
    for lo in range(0, flat.shape[1], step):
        x = flat[:, lo:lo + step].to(dtype)
        mean_, m2_, abs_, sum_, half_ = (None if t is None else t[lo:lo + step] for t in state)
        if half_ is not None:  # a strided view: no mask copy
            add_sum_(half_, x[count % 2::2].sum(0), lo, count, slots["half"])
        if abs_ is not None:
            add_sum_(abs_, x.abs().sum(0), lo, count, slots["abs"])
        if sum_ is not None:
            add_sum_(sum_, x.sum(0), lo, count, slots["sum"])
        if mean_ is not None:
            square = x.square()
            batch_mean = square.mean(0)
            delta = batch_mean.to(mean_) - mean_
            if m2_ is not None:
                m2_ += (square - batch_mean).square_().sum(0).to(m2_) + delta.square() * (count * n / total)
            mean_ += delta.mul_(n / total)
