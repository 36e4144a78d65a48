"""The fused pass-1 statistics kernel's launch: a batch of per-sample gradients folded into a Welford state of g²,
Σ|g|, Σg and the half sum in one pass (:func:`welford_update`; the kernel is
:func:`sketchfisher.kernels._triton.welford_kernel`)."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import Launches, _kernels, _on
from .hashing import count_key, rounding_slots


@functools.lru_cache(maxsize=1)
def _welford() -> Launches:
    return Launches(_kernels()[1])


def welford_update(g: torch.Tensor, mean: Optional[torch.Tensor], m2: Optional[torch.Tensor],
                   sum_abs: Optional[torch.Tensor], sum_g: Optional[torch.Tensor], count: int,
                   sum_half: Optional[torch.Tensor] = None, block: int = 1024,
                   dtype: Optional[torch.dtype] = None, num_warps: int = 4,
                   counts: Optional[torch.Tensor] = None) -> None:
    """Fold ``g [n, N]`` (rows at stride ``g.stride(0)``, each contiguous) into the state in place; ``count``
    samples came before, and ``sum_half`` sums the rows at even positions of the whole stream (``count + r``).

    Each state tensor may be None (not kept; ``m2`` needs ``mean``). One pass over the batch from
    memory: each program reads its slice of the n rows once, and a second time from cache for M2. ``dtype``: the
    statistics' precision (default: the first kept state's); a bf16 ``sum_abs``, ``sum_g`` or ``sum_half`` of wider
    statistics is rounded stochastically, with the random bits of
    :func:`~sketchfisher.kernels.hashing.round_bf16_stochastic` (one hash word for two sums,
    :func:`~sketchfisher.kernels.hashing.rounding_slots`). ``counts``: an int64 device tensor holding
    :func:`update_counts` of the update, read by the kernel in place of ``count`` (a launch that a CUDA graph records
    once and replays for every batch, :mod:`.graphs`)."""
    welford = _welford()
    n, N = g.shape
    state = (mean, m2, sum_abs, sum_g, sum_half)
    dtype = dtype or next(t for t in state if t is not None).dtype
    dummy = mean if mean is not None else _placeholder(dtype, g.device)  # (carries the dtype)
    slots = rounding_slots({"abs": sum_abs, "sum": sum_g, "half": sum_half}, dtype)  # (Σg, half sum: one dtype)
    from_memory = counts is not None
    count, key0, key1 = (0, 0, 0) if from_memory else update_counts(count)
    options = (block, mean is not None, m2 is not None, sum_abs is not None, sum_g is not None, sum_half is not None,
               tuple(slots.items()), num_warps, from_memory)
    with _on(g.device):
        welford((-(-N // block), 1, 1), (g, *(dummy if t is None else t for t in state), n, N, g.stride(0), count,
                                         key0, key1, counts if from_memory else dummy),
                functools.partial(_welford_constants, *options), options)


def update_counts(count: int) -> tuple[int, int, int]:
    """What the Welford kernel reads of an update after ``count`` samples: the count and its two hash words' keys
    (int32 bit patterns)."""
    return (count, *(_int32(count_key(count, slot)) for slot in (0, 2)))


def _welford_constants(block: int, has_mean: bool, has_m2: bool, has_abs: bool, has_sum: bool, has_half: bool,
                       slots: tuple, num_warps: int, from_memory: bool = False) -> dict:
    """The Welford kernel's constants (what :func:`welford_update` keys its launches by, spelled out)."""
    slots = dict(slots)
    return dict(BLOCK=block, HAS_MEAN=has_mean, HAS_M2=has_m2, HAS_ABS=has_abs, HAS_SUM=has_sum, HAS_HALF=has_half,
                ROUND_ABS="abs" in slots, ROUND_SIGNED="sum" in slots or "half" in slots,
                ABS_SLOT=slots.get("abs", 0), SUM_SLOT=slots.get("sum", 0), HALF_SLOT=slots.get("half", 0),
                WORDS=-(-len(slots) // 2), FROM_MEMORY=from_memory, num_warps=num_warps)


@functools.lru_cache(maxsize=None)
def _placeholder(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A one-element tensor that stands for a statistic not kept (the kernel reads its dtype, never its values)."""
    return torch.empty(1, dtype=dtype, device=device)


def _int32(word: int) -> int:
    """A 32-bit word as the int32 with its bits (a kernel argument of one type whatever its value)."""
    return word - (1 << 32) if word >= 1 << 31 else word
