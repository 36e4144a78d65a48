"""Counter-based hashing for sjlt: bucket and sign of every (band, entry) from a 62-bit map key.

``h = fmix32(fmix32((e·s + b) XOR lo) XOR hi)`` with MurmurHash3's 32-bit finaliser, where
``(lo, hi)`` are two 31-bit halves of the head block's key. Bucket = (h & 0x7fffffff) mod (k/s),
sign = − when bit 31 of h is set. Nothing is stored or drawn from a generator, so the CPU code here
and the CUDA kernel in :mod:`sketchfisher.compress.kernels` compute the same map.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
C1, C2 = 0x85EBCA6B, 0xC2B2AE35


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h · c) mod 2³² for int64 tensors holding values < 2³², without int64 overflow."""
    lo, hi = h & 0xFFFF, h >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, C1)
    h = h ^ (h >> 13)
    h = _mul32(h, C2)
    return h ^ (h >> 16)


def sjlt_hash(key: tuple[int, int], size: int, s: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[s, size]`` int64 hashes of every (band, entry) of one head block."""
    lo, hi = key
    e = torch.arange(size, dtype=torch.int64, device=device)
    b = torch.arange(s, dtype=torch.int64, device=device)[:, None]
    h = fmix32(((e[None, :] * s + b) & MASK32) ^ lo)
    return fmix32(h ^ hi)


def sjlt_codes(key: tuple[int, int], size: int, s: int, k: int, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[s, size]`` (band b owns rows b·k/s … (b+1)·k/s − 1) and signs ±1 ``[s, size]``."""
    band = k // s
    h = sjlt_hash(key, size, s, device)
    rows = (h & 0x7FFFFFFF) % band + band * torch.arange(s, device=h.device)[:, None]
    signs = 1 - 2 * (h >> 31)
    return rows, signs
