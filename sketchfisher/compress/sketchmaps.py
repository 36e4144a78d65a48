"""Random sketch maps R_S ∈ R^{k×|S|}, one per head block, regenerated from (seed, layer, block, kv-head).

All maps are scaled so that ``E[⟨R x, R y⟩] = ⟨x, y⟩`` and preserve the input dtype. The random
choices are drawn on the CPU from a generator keyed by ``numpy.random.SeedSequence(seed,
spawn_key=(layer, block, head))`` and moved to the data's device, so CPU and CUDA give the same map.

* ``gaussian``: i.i.d. N(0, 1/k) entries (dense JL), generated in column chunks.
* ``sjlt``: sparse JL / CountSketch with ``s`` non-zeros per column, one in each of ``s`` row bands
  of height k/s, signs ±1/√s. Never materialised: applied with ``index_add_``.
* ``srht``: random signs, normalised Walsh–Hadamard transform over |S| padded to P = 2^⌈log2 |S|⌉,
  then k of the P rows sampled without replacement, scaled by √(P/k). k = P recovers x·y exactly.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError

KINDS = ("gaussian", "sjlt", "srht")


def block_generator(seed: int, layer: int, block: int, head: int) -> torch.Generator:
    """A CPU generator for one head block, independent across (layer, block, head)."""
    state = np.random.SeedSequence(seed, spawn_key=(layer, block, head)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@dataclass(frozen=True)
class SketchMap:
    """The map of one head block of ``size`` entries; ``apply`` sketches ``x [..., size]`` → ``[..., k]``."""

    kind: str
    k: int
    size: int
    seed: int
    key: tuple[int, int, int]
    s: int = 4

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"sketch kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "sjlt" and self.k % self.s:
            raise InputError(f"sjlt needs k divisible by s; got k={self.k}, s={self.s}")
        if self.kind == "srht" and self.k > self.padded:
            raise InputError(f"srht needs k <= {self.padded} (|S|={self.size} padded to a power of 2), got k={self.k}")

    @property
    def padded(self) -> int:
        return 1 << max(0, math.ceil(math.log2(self.size)))

    def _gen(self) -> torch.Generator:
        return block_generator(self.seed, *self.key)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size:
            raise InputError(f"sketch of head block {self.key} expects {self.size} entries, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.size)
        out = getattr(self, "_" + self.kind)(flat)
        return out.reshape(*lead, self.k)

    def _gaussian(self, x: torch.Tensor, chunk: int = 1 << 16) -> torch.Tensor:
        g = self._gen()
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        for lo in range(0, self.size, chunk):
            hi = min(self.size, lo + chunk)
            r = torch.randn(hi - lo, self.k, generator=g).to(device=x.device, dtype=x.dtype)
            out += x[:, lo:hi] @ r
        return out / math.sqrt(self.k)

    def sjlt_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[s, size]`` (band b holds rows b·k/s .. (b+1)·k/s − 1) and signs ``[s, size]``."""
        g = self._gen()
        band = self.k // self.s
        rows = torch.randint(0, band, (self.s, self.size), generator=g) + band * torch.arange(self.s)[:, None]
        signs = torch.randint(0, 2, (self.s, self.size), generator=g) * 2 - 1
        return rows, signs

    def _sjlt(self, x: torch.Tensor) -> torch.Tensor:
        rows, signs = _sjlt_cached(self, x.device, x.dtype)
        out = torch.zeros(x.shape[0], self.k, dtype=x.dtype, device=x.device)
        for b in range(self.s):
            out.index_add_(1, rows[b], x * signs[b])
        return out

    def _srht(self, x: torch.Tensor) -> torch.Tensor:
        g = self._gen()
        P = self.padded
        signs = (torch.randint(0, 2, (self.size,), generator=g) * 2 - 1).to(device=x.device, dtype=x.dtype)
        rows = torch.randperm(P, generator=g)[: self.k].to(x.device)
        y = torch.zeros(x.shape[0], P, dtype=x.dtype, device=x.device)
        y[:, : self.size] = x * signs
        y = fwht(y) / math.sqrt(P)
        return y[:, rows] * math.sqrt(P / self.k)


@functools.lru_cache(maxsize=64)
def _sjlt_cached(m: SketchMap, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The sjlt rows and scaled signs (±1/√s) on the data's device, cached for recent head blocks."""
    rows, signs = m.sjlt_indices()
    return rows.to(device), (signs.to(torch.float64) / math.sqrt(m.s)).to(device=device, dtype=dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform along the last axis (length a power of 2)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    y = x
    while h < n:
        y = y.reshape(*lead, n // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return y.reshape(*lead, n)
