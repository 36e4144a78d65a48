"""The sjlt map: a tiled-shift CountSketch drawn from a counter-based hash of the head block's key.

``k`` rows are split into ``s`` bands of height ``m = k/s``; every entry has one non-zero ±1/√s in
each band. Within band ``b`` the entries are cut into tiles of ``m`` consecutive entries; tile ``t``
is cyclically shifted by ``c_{b,t}`` so that its entry ``o`` lands in row
``b·m + (o + c_{b,t}) mod m``, and that row's sign is bit ``j mod 32`` of a hash word,
``j = (o + c_{b,t}) mod m``. The shifts and sign words come from

    H(ctr) = fmix32(fmix32(ctr XOR lo) XOR hi')

(MurmurHash3's 32-bit finaliser) with ``(lo, hi)`` two 31-bit halves of the block key and
``hi' = hi`` for signs (counter ``(b·T + t)·⌈m/32⌉ + j div 32``) or ``hi XOR SHIFT_TWEAK`` for shifts
(counter ``b·T + t``, ``c = H mod m``), ``T = ⌈size/m⌉`` tiles.

Why this structure: two entries of one tile never share a row and two entries of different tiles
share a row with probability exactly 1/m (the shifts are independent and uniform), signs are
independent per (band, entry), so ``⟨R x, R y⟩`` is unbiased with variance at most that of an
ordinary CountSketch. And a kernel computes every output row from one coalesced, rotated read of a
tile with no scatter and no atomics (:mod:`sketchfisher.kernels`). Nothing is stored or
drawn from a generator, so the CPU code here and the CUDA kernel give the same map.
"""

from __future__ import annotations

from typing import Optional

import torch

MASK32 = 0xFFFFFFFF
C1, C2 = 0x85EBCA6B, 0xC2B2AE35
SHIFT_TWEAK = 0x2545F491


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h · c) mod 2³² for int64 tensors holding values < 2³² (and c < 2³²): torch's int64 products wrap modulo
    2⁶⁴ on the CPU and on CUDA, so their low 32 bits are the product modulo 2³² (one multiply; tests compare the
    bits with a product formed from 16-bit halves, and CPU with CUDA)."""
    return (h * c) & MASK32


def fmix32(h):
    """MurmurHash3's 32-bit finaliser of an int64 tensor of values < 2³², or of one Python int."""
    h = h ^ (h >> 16)
    h = _mul32(h, C1)
    h = h ^ (h >> 13)
    h = _mul32(h, C2)
    return h ^ (h >> 16)


def fmix32_(h: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """:func:`fmix32` in place, ``tmp`` a scratch tensor shaped like ``h``: the same bits without a temporary per
    step, so a cache-sized slice stays in cache through all of them (the CPU's dither, many entries at once)."""
    for shift, c in ((16, C1), (13, C2), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        h.bitwise_xor_(tmp)
        if c is not None:
            h.mul_(c).bitwise_and_(MASK32)
    return h


def block_hash(ctr: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``H(ctr)`` for an int64 tensor of counters (< 2³²)."""
    return fmix32(fmix32((ctr & MASK32) ^ lo) ^ hi)


ROUNDING_WORDS = (0x3C6EF372, 0xA54FF53A)
"""The keys of the two hash words whose 16-bit halves round the plain sums (:func:`rounding_slots`)."""
PLAIN_SUM_ORDER = ("abs", "sum", "half")


def rounding_slots(sums: dict[str, Optional[torch.Tensor]], dtype: torch.dtype) -> dict[str, int]:
    """The random bits each plain sum of one update draws, for the sums that are rounded stochastically (bf16
    accumulators of wider statistics; ``sums``: ``{"abs" | "sum" | "half": accumulator or None}``): in the order
    Σ|g|, Σg, half sum they take slots 0, 1, 2, the low and the high 16 bits of hash word 0, then the low 16 bits of
    word 1. One hash serves two sums; their bits are distinct, so their roundings are independent."""
    rounded = [q for q in PLAIN_SUM_ORDER
               if sums.get(q) is not None and sums[q].dtype == torch.bfloat16 and dtype != torch.bfloat16]
    return {q: i for i, q in enumerate(rounded)}


def count_key(count: int, slot: int) -> int:
    """The key of hash word ``slot // 2`` for an update after ``count`` samples: ``fmix32(count XOR word key)``
    (mixed, so that no two entries see the same sequence of keys; a Python int, once per update and module)."""
    return fmix32((count & MASK32) ^ ROUNDING_WORDS[slot // 2])


def round_bf16_stochastic(v: torch.Tensor, first: int, count: int, slot: int = 0) -> torch.Tensor:
    """fp32 ``v`` (a flat run of entries ``first, first + 1, …`` of an accumulator) rounded to bf16 up or down
    at random, with the probability that makes the rounding unbiased: 16 random bits are added to the low half
    of each fp32 bit pattern before it is cut off. The bits are half of the word ``fmix32(entry XOR key)``, the
    key :func:`count_key` of ``count`` (the samples the accumulator held before this update) and of the sum's
    ``slot`` (:func:`rounding_slots`); the CUDA kernel draws the same ones, one word for two sums."""
    bits = v.float().contiguous().view(torch.int32).to(torch.int64) & MASK32
    entry = torch.arange(first, first + v.numel(), dtype=torch.int64, device=v.device).view(v.shape)
    noise = (fmix32((entry & MASK32) ^ count_key(count, slot)) >> (16 * (slot % 2))) & 0xFFFF
    cut = ((bits + noise) & 0xFFFF0000).to(torch.int32)  # (a carry past bit 31 is dropped, as in uint32)
    return cut.view(torch.float32).to(torch.bfloat16)


def sjlt_codes(key: tuple[int, int], size: int, s: int, k: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[s, size]`` (band b owns rows b·m … (b+1)·m − 1, m = k/s) and signs ±1 ``[s, size]``."""
    lo, hi = key
    m = k // s
    tiles = -(-size // m)
    words = -(-m // 32)
    e = torch.arange(size, dtype=torch.int64, device=device)
    t, o = e // m, e % m
    band = torch.arange(s, dtype=torch.int64, device=device)[:, None]
    shift = block_hash(band * tiles + t, lo, hi ^ SHIFT_TWEAK) % m        # [s, size]
    j = (o + shift) % m
    word = block_hash((band * tiles + t) * words + (j >> 5), lo, hi)
    signs = 1 - 2 * ((word >> (j & 31)) & 1)
    return band * m + j, signs
