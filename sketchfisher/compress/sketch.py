"""``sf.Sketch``: per-head randomized sketches of the variant's i-side and j-side vectors.

For one head block S and the chosen variant, task-A samples keep ``x_i`` and task-B samples keep
``y_j`` (docs/semantics.md; ``paper``: x = g²/(Î+ε+λ), y = |g|). With variance reduction (default):

* balancing: x' = x·√m, y' = y/√m with m = mean|g| over A ∪ B from pass 1 (r = m^(−1/2));
  ⟨x', y'⟩ = ⟨x, y⟩ entry by entry.
* centering: sketch x̃ = x' − x̄' and ỹ = y' − ȳ', with x̄, ȳ the task means known from pass 1,
  and keep the exact scalars c_i = ⟨x'_i, ȳ'⟩, d_j = ⟨x̄', y'_j⟩, e = ⟨x̄', ȳ'⟩. Then
  ⟨x_i, y_j⟩ = ⟨x̃_i, ỹ_j⟩ + c_i + d_j − e, and only the first term is estimated.

Estimate: ⟨R x̃_i, R ỹ_j⟩ + c_i + d_j − e. Standard error: the JL variance of the sketched term with
exact norms, √((t̂² + ‖x̃_i‖²‖ỹ_j‖²)/k) (× (P−k)/(P−1) for srht, sampling without replacement), where
t̂ is the sketched term. This is exact for Gaussian maps and an upper bound for sjlt/CountSketch
(whose variance lacks the ``−2Σ x̃²ỹ²`` term only); it needs no extra sketches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from .. import kernels
from ..errors import InputError
from ..kernels.hashing import fmix32, fmix32_
from ..layout import BLOCKS
from .base import SideCodec
from .sketchmaps import KINDS, SketchMap, sjlt_block_index

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}
CENTRINGS = ("scaled", "mean")  # scaled: each sample less its best multiple of the centre; mean: less the centre
INT4_LEVELS = 7  # int4 stores q in [-7, 7] (two per byte, as q + 8) with a per-vector scale max|v| / 7


@dataclass(frozen=True)
class Sketch(SideCodec):
    """Per-head-block sketch of width ``k`` (``kind`` in gaussian/sjlt/srht, ``s`` non-zeros for sjlt),
    stored as ``dtype``: fp32/fp16/bf16, int8 with a per-vector scale, or int4 (two values per byte, a
    per-vector scale and a subtractive dither, so its rounding error is uniform, independent of the data and
    part of every score's standard error: :func:`quantize`). With ``variance_reduction`` each side is centred
    before it is sketched and the centre's part is added back exactly: ``centring="scaled"`` takes away each
    sample's best multiple of the centre (one more stored number per vector), ``"mean"`` the centre itself.
    ``rotate=True`` (k a power of two) stores each vector turned by a random-sign Hadamard rotation, which
    spreads a vector's largest entries over all coordinates before it is rounded (a smaller per-vector scale
    for int8/int4); decoding turns it back, so scores, their error bars and the bytes are as without it."""

    k: int = 1024
    kind: str = "sjlt"
    seed: int = 0
    dtype: str = "int4"
    variance_reduction: bool = True
    s: int = 1
    centring: str = "scaled"
    rotate: bool = False
    name: ClassVar[str] = "sketch"
    source: ClassVar[str] = "factors"
    summary: ClassVar[str] = "per-head randomized sketches with standard errors (any model size)"

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"Sketch.k must be a positive int, got {self.k!r}")
        if self.kind not in KINDS:
            raise InputError(f"Sketch.kind must be one of {KINDS}, got {self.kind!r}")
        if self.dtype not in DTYPES:
            raise InputError(f"Sketch.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"Sketch.seed must be an int >= 0, got {self.seed!r}")
        if self.dtype == "int4" and self.k % 2:
            raise InputError(f"Sketch(dtype='int4') packs two values per byte and needs an even k; got k={self.k}")
        if self.centring not in CENTRINGS:
            raise InputError(f"Sketch.centring must be one of {CENTRINGS}, got {self.centring!r}")
        if self.kind == "sjlt" and (self.s < 1 or self.k % self.s):
            raise InputError(f"Sketch(kind='sjlt') needs k divisible by s >= 1; got k={self.k}, s={self.s}")
        if not isinstance(self.rotate, bool) or (self.rotate and self.k & (self.k - 1)):
            raise InputError(f"Sketch(rotate=True) needs a power-of-two k (a Hadamard rotation), and rotate must be "
                             f"a bool; got k={self.k}, rotate={self.rotate!r}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        if not self.rotate:  # (recorded only when on: stores written before the option read as they were)
            out.pop("rotate")
        return out

    def describe(self) -> str:
        return f"Sketch(k={self.k}, {self.dtype})"

    def width(self, size: int) -> int:
        return self.k

    def stored_width(self, size: int) -> int:
        return self.k // 2 if self.dtype == "int4" else self.k

    def check_layout(self, layout) -> None:
        """A sketch must be smaller than the head blocks it sketches (else it stores more than the data).

        The one exception is srht at its full width k = P (the block size padded to a power of two), which
        recovers exact scores and is how sketches are checked against the exact answer."""
        smallest, block = min((hb.numel, block) for layer, block in layout.groups()
                              for hb in layout.head_blocks(layer, block))
        what = "head block" if block in BLOCKS else "MLP channel-group block"
        full = 1 << (smallest - 1).bit_length()
        if self.k >= smallest and not (self.kind == "srht" and self.k <= full):
            raise InputError(f"Sketch(k={self.k}) is not smaller than the smallest {what} ({smallest:,} entries): "
                             f"the sketch would be larger than the data; use k < {smallest:,}, or sf.Factors() for "
                             "exact scores")

    def encode(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.rotate:
            vectors = rotate(vectors, self.seed)
        q, scale = quantize(vectors, self.dtype, self.seed)
        return {"vec": q} if scale is None else {"vec": q, "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.dtype == "int4":
            out = dequantize_int4(parts["vec"], parts["scale"], self.seed)
        else:
            out = dequantize(parts["vec"], parts.get("scale"))
        return rotate(out, self.seed, inverse=True) if self.rotate else out

    def noise_variance(self, parts: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Per stored vector ``[..]``, the variance of each coordinate's rounding error when it is known: int4's
        subtractive dither makes it uniform on ±scale/2, so s²/12 (None for the other dtypes)."""
        if self.dtype != "int4":
            return None
        return parts["scale"].double().square() / 12.0

    def block_scores(self, a: tuple, b: tuple, e: torch.Tensor, size: int, residual: Optional[tuple] = None):
        from .sketch_block import SketchBlock, finite_population_correction

        noise = [getattr(side, "noise", None) for side in (a, b)]
        gamma = [getattr(side, "gamma", None) for side in (a, b)]
        e, fpc = e.double().to(a[0].device), finite_population_correction(self, size)
        if residual is not None:
            return SketchBlock.recentred(a, b, e, self.k, fpc, *noise, gamma[0], residual)
        return SketchBlock(*a, *b, e, self.k, fpc, *noise, *gamma)

    def fused_sides(self, layout, cfg, side: str):
        from .fused import FusedSides

        fused = FusedSides(layout, self, cfg, side)
        return fused if fused.enabled else None

    def map(self, layer: int, block: int, head: int, size: int) -> SketchMap:
        return SketchMap(self.kind, self.k, size, self.seed, (layer, block, head), self.s)

    def apply_heads(self, layer: int, block: int, v: torch.Tensor) -> torch.Tensor:
        """Sketch every head of one (layer, block): ``v [n, H, size]`` → ``[n, H, k]``, head ``h`` by its own
        map (exactly ``map(layer, block, h, size).apply(v[:, h])``). sjlt off the GPU does all heads in one
        scatter (one index for the block, cached), 20× faster than a call per head; on a CUDA device with
        Triton, fp32/bf16/fp16 vectors take one fused kernel launch for all heads (fp32 accumulation, as
        :meth:`SketchMap.apply <sketchfisher.compress.sketchmaps.SketchMap.apply>` there)."""
        n, H, size = v.shape
        if self.kind == "sjlt" and v.is_cuda and v.dtype in kernels.DTYPES and kernels.available():
            keys = torch.tensor([self.map(layer, block, h, size).hash_key() for h in range(H)], dtype=torch.int64)
            offsets = torch.arange(H, dtype=torch.int64) * size
            sk, *_ = kernels.sketch_heads(v.reshape(n, H * size), keys, offsets, size, size, size, self.k, self.s)
            return sk.to(v.dtype)
        if self.kind == "sjlt" and not v.is_cuda:
            index = sjlt_block_index(self, layer, block, H, size, v.device)
            flat = v.reshape(n, H * size)
            bins = torch.zeros(n, H * 2 * self.k, dtype=v.dtype, device=v.device)
            for band in range(self.s):
                bins.index_add_(1, index[band], flat)
            bins = bins.view(n, H, 2 * self.k)
            return (bins[..., : self.k] - bins[..., self.k:]) / math.sqrt(self.s)
        return torch.stack([self.map(layer, block, h, size).apply(v[:, h]) for h in range(H)], 1)

    def bytes_per_vector(self) -> int:
        """Stored bytes of one sketched head-block vector (+ 4 for the int4, int8 and fp16 scales)."""
        if self.dtype == "int4":
            return self.k // 2 + 4
        size = torch.empty((), dtype=DTYPES[self.dtype]).element_size()
        return self.k * size + (4 if self.dtype in SCALED else 0)

    @property
    def stores_gamma(self) -> bool:
        """Whether each stored vector carries scaled centring's γ (fp32)."""
        return self.variance_reduction and self.centring == "scaled"

    def bytes_per_block(self, size: int | None = None) -> int:
        """Stored bytes of one sample's head block (of any size): the sketched vector, its two exact fp64
        scalars (‖x̃‖² and the cross term) and, with scaled centring, its fp32 γ."""
        return self.bytes_per_vector() + 16 + 4 * self.stores_gamma


SCALED = ("int4", "int8", "fp16")  # storage dtypes that keep a per-vector scale
FP16_HEADROOM = 2.0 ** 14  # fp16 vectors are scaled so that their largest entry is at most this (max 65504)


_M32 = 0xFFFFFFFF


CPU_SLICE = 1 << 17  # entries a step of the CPU's dither and rotation takes (1 MiB of int64: in cache through its passes)
_mix32 = fmix32  # murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2³²): the same bits everywhere


def _rows_per_step(rows: int, k: int, device: torch.device) -> int:
    """Vectors of width ``k`` per step of an elementwise chain: a cache-sized slice on the CPU, all on a GPU (at
    least 1, so that an empty batch still steps)."""
    return max(1, rows if device.type != "cpu" else min(rows, CPU_SLICE // max(k, 1)))


def rotation_signs(k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The random signs ``[k]`` (±1, fp64) of :func:`rotate`: a hash of the seed and the coordinate, the same for
    every vector, so both sides of a score turn alike."""
    h = _mix32(_mix32((torch.arange(k, device=device, dtype=torch.int64) + 0x7F4A7C15) & _M32) ^ (seed & _M32))
    return 1.0 - 2.0 * (h & 1).double()


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh-Hadamard transform along the last axis (a power of two), by ``log2 k`` butterflies
    of additions and subtractions: elementwise, so the same bits on every device (on the CPU a cache-sized slice
    of vectors at a time, in place)."""
    k = x.shape[-1]
    out = x.reshape(-1, k).clone()
    step = _rows_per_step(out.shape[0], k, out.device)
    tmp = torch.empty(step, k // 2, dtype=out.dtype, device=out.device)
    for lo in range(0, out.shape[0], step):
        rows = out[lo:lo + step]
        h = 1
        while h < k:  # (a, b) -> (a + b, a - b) on pairs h apart
            y = rows.view(-1, k // (2 * h), 2, h)
            a, b, t = y[:, :, 0], y[:, :, 1], tmp[:rows.shape[0]].view(-1, k // (2 * h), h)
            torch.sub(a, b, out=t)
            a.add_(b)
            b.copy_(t)
            h *= 2
    return out.view(x.shape)


def rotate(v: torch.Tensor, seed: int, inverse: bool = False) -> torch.Tensor:
    """``H D v / √k`` (``inverse``: ``D H v / √k``, its inverse: H is symmetric and H H = k I) for vectors
    ``[..., k]``, D the random signs of :func:`rotation_signs`; an orthogonal map, so inner products and norms
    are kept. Computed in fp64, scaled by multiplying (a true product on every device, so the same bits)."""
    k = v.shape[-1]
    signs, norm = rotation_signs(k, seed, v.device), 1.0 / math.sqrt(k)
    x = v.double()
    return hadamard(x) * (signs * norm) if inverse else hadamard(x * signs) * norm


def dither(scale: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The subtractive dither ``[..., k]`` (fp64, uniform on [−½, ½)) of vectors with per-vector ``scale [...]``:
    a counter-based hash of (seed, the scale's bits, coordinate). The scale stands for the vector (it is its
    sketch's largest entry over 7, so two vectors share a dither only if their largest entries are equal to the
    last bit), which lets the decoder regenerate the dither from what is stored, however vectors are batched
    or concatenated, with no sample id; CPU and GPU give the same bits."""
    bits = scale.float().contiguous().view(torch.int32).to(torch.int64) & _M32
    base = _mix32(_mix32(bits ^ (seed & _M32)) ^ 0x5BD1E995)
    coord = _mix32((torch.arange(k, device=scale.device, dtype=torch.int64) + 0x9E3779B9) & _M32)
    if scale.device.type != "cpu":
        return _mix32(base[..., None] ^ coord).double() * 2.0 ** -32 - 0.5
    # on the CPU a slice of vectors at a time, hashed in place: the int64 passes stay in cache (6x faster at
    # MiniLM's sizes; the same operations in the same order, so the same bits)
    flat = base.reshape(-1)
    out = torch.empty(flat.numel(), k, dtype=torch.float64)
    rows = _rows_per_step(flat.numel(), k, flat.device)
    h, tmp = torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, k, dtype=torch.int64)
    for lo in range(0, flat.numel(), rows):
        n = min(rows, flat.numel() - lo)
        torch.bitwise_xor(flat[lo:lo + n, None], coord, out=h[:n])
        out[lo:lo + n].copy_(fmix32_(h[:n], tmp[:n])).mul_(2.0 ** -32).sub_(0.5)
    return out.view(*scale.shape, k)


def quantize(v: torch.Tensor, dtype: str, seed: int = 0) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Cast sketched vectors ``[..., k]``; int8 uses a per-vector scale max|v|/127. fp16 (whose largest
    value is 65504) divides each vector whose largest entry exceeds 2¹⁴ by a power of two (exact, so a
    vector within range is stored bit for bit as before) and keeps that scale: any finite vector fits.
    int4 (``[..., H, k]`` vectors, H heads of a block) keeps ``q = round(v/s + d)`` in [−7, 7], s = max|v|/7,
    d the :func:`dither`, packed two per byte; decoding gives ``(q − d)·s``, whose error is uniform on
    ±s/2 whatever ``v`` is."""
    if dtype == "int4":
        peak = v.abs().amax(-1).float().clamp_min(torch.finfo(torch.float32).tiny)
        scale = peak / torch.full_like(peak, INT4_LEVELS)  # a true division on every device (CUDA multiplies by
        # the reciprocal of a Python scalar divisor, which can differ in the last bit and so change the dither)
        scale = torch.nextafter(scale, torch.full_like(scale, float("inf")))  # |v| / s <= 7 after rounding
        q = v.double().div_(scale.double()[..., None]).add_(dither(scale, v.shape[-1], seed))  # (in place: the
        nibbles = q.round_().clamp_(-INT4_LEVELS, INT4_LEVELS).add_(8).to(torch.uint8)  # same arithmetic, no copies)
        return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale
    if dtype == "fp16":
        peak = v.abs().amax(-1, keepdim=True).float()
        shift = torch.where(peak > FP16_HEADROOM, torch.ceil(torch.log2(peak / FP16_HEADROOM)), torch.zeros_like(peak))
        scale = torch.exp2(shift)
        return (v / scale.to(v.dtype)).to(torch.float16), scale.squeeze(-1)
    if dtype != "int8":
        return v.to(DTYPES[dtype]), None
    scale = v.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
    return torch.round(v / scale).to(torch.int8), scale.squeeze(-1).float()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of int4 :func:`quantize`, in fp64: ``(q − d)·s``."""
    q = torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2).double().sub_(8)  # (uint8 until the last step)
    return q.sub_(dither(scale, q.shape[-1], seed)).mul_(scale.double()[..., None])


def dequantize(q: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    v = q.to(torch.float64)
    return v if scale is None else v * scale.to(torch.float64)[..., None]
