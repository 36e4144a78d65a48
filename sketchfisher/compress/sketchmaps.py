"""Random sketch maps R_S ∈ R^{k×|S|}, one per head block, regenerated from (seed, layer, block, kv-head).

All maps are scaled so that ``E[⟨R x, R y⟩] = ⟨x, y⟩`` and preserve the input dtype. The random
choices are drawn on the CPU from a generator keyed by ``numpy.random.SeedSequence(seed,
spawn_key=(layer, block, head))`` and moved to the data's device, so CPU and CUDA give the same map.

* ``gaussian``: i.i.d. N(0, 1/k) entries (dense JL), generated in column chunks.
* ``sjlt``: sparse JL / CountSketch with ``s`` non-zeros per column (default 1), one in each of ``s``
  row bands of height k/s, signs ±1/√s, laid out as cyclically shifted tiles drawn from a
  counter-based hash of the block key (:mod:`sketchfisher.kernels.hashing`). Never materialised:
  ``index_add_`` on the CPU, a Triton gather kernel on GPUs (:mod:`sketchfisher.kernels`),
  identical maps on both.
* ``srht``: random signs, normalised Walsh–Hadamard transform over |S| padded to P = 2^⌈log2 |S|⌉,
  then k of the P rows sampled without replacement, scaled by √(P/k). k = P recovers x·y exactly.
"""

from __future__ import annotations

import collections
import functools
import os
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .. import kernels
from ..kernels.hashing import sjlt_codes

KINDS = ("gaussian", "sjlt", "srht")


@functools.lru_cache(maxsize=1 << 16)
def block_state(seed: int, layer: int, block: int, head: int) -> tuple[int, int]:
    """Two 32-bit words for one head block, independent across (layer, block, head) (cached:
    ``SeedSequence`` costs ~20 µs and pass 2 asks for every head block of every batch)."""
    state = np.random.SeedSequence(seed, spawn_key=(layer, block, head)).generate_state(2, dtype=np.uint32)
    return int(state[0]), int(state[1])


def block_generator(seed: int, layer: int, block: int, head: int) -> torch.Generator:
    """A CPU generator for one head block, independent across (layer, block, head)."""
    a, b = block_state(seed, layer, block, head)
    return torch.Generator().manual_seed(a << 32 | b)


def block_hash_key(seed: int, layer: int, block: int, head: int) -> tuple[int, int]:
    """The sjlt hash key of one head block: two 31-bit halves of its state."""
    a, b = block_state(seed, layer, block, head)
    return a & 0x7FFFFFFF, b & 0x7FFFFFFF


@dataclass(frozen=True)
class SketchMap:
    """The map of one head block of ``size`` entries; ``apply`` sketches ``x [..., size]`` → ``[..., k]``."""

    kind: str
    k: int
    size: int
    seed: int
    key: tuple[int, int, int]
    s: int = 1

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

    def hash_key(self) -> tuple[int, int]:
        """Two 31-bit halves of this block's key for the counter-based sjlt hash."""
        return block_hash_key(self.seed, *self.key)

    def sjlt_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[s, size]`` (band b holds rows b·k/s .. (b+1)·k/s − 1) and signs ±1 ``[s, size]``."""
        return sjlt_codes(self.hash_key(), self.size, self.s, self.k)

    def _sjlt(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype in kernels.DTYPES and kernels.available():
            return kernels.sjlt(x, self.hash_key(), self.k, self.s)
        # Signs are folded into the index (negative entries go to k extra bins) so that x is scattered
        # as is, with no signed temporary: out = (bins[:, :k] − bins[:, k:]) / √s.
        index = _sjlt_cached(self, x.device)
        bins = torch.zeros(x.shape[0], 2 * self.k, dtype=x.dtype, device=x.device)
        for b in range(self.s):
            bins.index_add_(1, index[b], x)
        return (bins[:, : self.k] - bins[:, self.k:]) / math.sqrt(self.s)

    def _srht(self, x: torch.Tensor) -> torch.Tensor:
        g = self._gen()
        P = self.padded
        signs = (torch.randint(0, 2, (self.size,), generator=g) * 2 - 1).to(device=x.device, dtype=x.dtype)
        rows = torch.randperm(P, generator=g)[: self.k].to(x.device)
        y = torch.zeros(x.shape[0], P, dtype=x.dtype, device=x.device)
        y[:, : self.size] = x * signs
        y = fwht(y) / math.sqrt(P)
        return y[:, rows] * math.sqrt(P / self.k)


class _IndexCache:
    """The sjlt scatter indices of recently used head blocks, up to ``budget`` bytes (int64: 8 bytes per
    entry and band). A model's every head block fits (GPT-2 small: 226 MB) so that pass 2 on the CPU
    hashes each block once per run, not once per batch (a 64-entry cache missed every lookup on a
    576-block model)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.entries: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()

    def get(self, m: SketchMap, device: torch.device) -> torch.Tensor:
        def make() -> torch.Tensor:
            rows, signs = m.sjlt_indices()
            return rows + m.k * (signs < 0)
        return self.get_or_make(m, device, make)

    def get_or_make(self, key: object, device: torch.device, make) -> torch.Tensor:
        key = (key, device)
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        index = make().to(device=device, dtype=torch.int64)  # index_add_ is ~20x slower with int32 on the CPU
        size = index.numel() * index.element_size()
        while self.entries and self.used + size > self.budget:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
        if size <= self.budget:
            self.entries[key] = index
            self.used += size
        return index


_INDEX_CACHE = _IndexCache(int(os.environ.get("SKETCHFISHER_SJLT_CACHE_MB", "512")) << 20)


def sjlt_block_index(codec, layer: int, block: int, heads: int, size: int, device: torch.device) -> torch.Tensor:
    """One scatter index ``[s, heads·size]`` for all heads of a (layer, block): head ``h``'s entries go to
    bins ``h·2k + row`` (``+ k`` for a negative sign), so one ``index_add_`` sketches every head."""
    key = ("block", codec.kind, codec.k, codec.seed, codec.s, layer, block, heads, size)
    def make() -> torch.Tensor:
        parts = []
        for h in range(heads):
            rows, signs = codec.map(layer, block, h, size).sjlt_indices()
            parts.append(rows + codec.k * (signs < 0) + h * 2 * codec.k)
        return torch.cat(parts, 1)
    return _INDEX_CACHE.get_or_make(key, device, make)


def _sjlt_cached(m: SketchMap, device: torch.device) -> torch.Tensor:
    """sjlt scatter index ``[s, size]`` (row + k for negative signs), from :data:`_INDEX_CACHE`."""
    return _INDEX_CACHE.get(m, device)


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
