"""The precision a collection keeps its statistics in: the plain sums' accumulators, and what each kept
statistic weighs while it accumulates and once final (the store's disk plan and the device planner read it)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

PLAIN_SUMS = ("abs", "sum", "half")
"""Σ|g|, Σg and the half sum: the statistics that accumulate as plain sums (the Fisher is a Welford mean)."""


def accumulator_dtype(stats_dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype a collection accumulates its plain sums (Σ|g|, Σg and the half sum) in: bf16, stochastically
    rounded, where the statistics are fp32 (the GPU setting, where each is a model-sized tensor), else the
    statistics' own (None). Σ|g| balances and centres the sketches, where any value keeps them exact; it and Σg
    give task means (MLP units' pair means, the conflict test's T and weights), where each entry's rounding is
    unbiased and independent of every other entry's, so it averages out over a unit block's entries."""
    return torch.bfloat16 if stats_dtype == torch.float32 else None


def kept_dtypes(quantities: Iterable[str], dtype: torch.dtype, compacted: Iterable[str] = ()
                ) -> list[tuple[torch.dtype, torch.dtype]]:
    """Per kept statistic of a collection in ``dtype``: ``(its dtype while it accumulates, as a pass-1 checkpoint
    holds it; its dtype once final)``: the plain sums in :func:`accumulator_dtype`, and those in ``compacted``
    rounded to bf16 once final (:meth:`FisherStats.compact`)."""
    running = {q: accumulator_dtype(dtype) or dtype for q in PLAIN_SUMS}
    compacted = set(compacted)
    return [(running.get(q, dtype), torch.bfloat16 if q in compacted else running.get(q, dtype)) for q in quantities]
