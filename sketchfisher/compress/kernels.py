"""sjlt on CUDA: the same hashed map as :mod:`sketchfisher.compress.hashing`, without index tensors.

Two kernels, chosen by :func:`sjlt_on_cuda` (see docs/benchmarks.md for the measurements):

* ``sjlt_cuda.cu`` (CUDA C++, JIT-compiled by ``torch.utils.cpp_extension`` on first use, needs
  nvcc): each thread block accumulates a shared-memory histogram ``[rows, k]`` of its column span
  with shared atomics, then adds it to the output. The fastest: 2–3.4× a ``copy_`` of x on an H100.
* Triton (ships with CUDA builds of torch): per column tile, a ±1 one-hot matrix ``[BC, k]`` built
  in registers and ``tl.dot`` (exact for bf16/fp16 inputs, IEEE fp32 for fp32). Used, with a
  logged warning, when the C++ extension cannot be built.
"""

from __future__ import annotations

import functools
import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import triton  # noqa: F401  (availability check only)
    except ImportError:
        return False
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _fmix32(h):  # h: uint32; multiplications wrap modulo 2**32
        h = h ^ (h >> 16)
        h = h * tl.full(h.shape, 0x85EBCA6B, tl.uint32)
        h = h ^ (h >> 13)
        h = h * tl.full(h.shape, 0xC2B2AE35, tl.uint32)
        return h ^ (h >> 16)

    @triton.jit
    def sjlt_kernel(x_ptr, out_ptr, n, size, stride_x, lo, hi, span,
                    K: tl.constexpr, S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                    IEEE: tl.constexpr):
        BAND: tl.constexpr = K // S
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        row_ok = rows < n
        bins = tl.arange(0, K)
        local_bin = (bins % BAND).to(tl.uint32)
        bands = tl.arange(0, S).to(tl.uint32)
        lo32 = lo.to(tl.uint32)
        hi32 = hi.to(tl.uint32)
        acc = tl.zeros((BR, K), dtype=tl.float32)
        start = pid_c * span
        for c0 in range(start, start + span, BC):
            cols = c0 + tl.arange(0, BC)
            col_ok = cols < size
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            h = _fmix32(_fmix32((cols.to(tl.uint32)[:, None] * S + bands[None, :]) ^ lo32) ^ hi32)  # [BC, S]
            h = tl.reshape(tl.broadcast_to(h[:, :, None], (BC, S, BAND)), (BC, K), can_reorder=False)
            hit = ((h & 0x7FFFFFFF) & (BAND - 1)) == local_bin[None, :]
            sign = 1.0 - 2.0 * (h >> 31).to(tl.float32)
            onehot = tl.where(hit & col_ok[:, None], sign, 0.0).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, onehot, input_precision="ieee")
            else:
                acc += tl.dot(x, onehot)
        tl.atomic_add(out_ptr + rows[:, None] * K + bins[None, :], acc, mask=row_ok[:, None])

    return sjlt_kernel


@functools.lru_cache(maxsize=1)
def _extension():
    """JIT-compile the CUDA C++ sjlt kernel once (cached by torch in ~/.cache/torch_extensions)."""
    import logging
    from pathlib import Path

    from torch.utils.cpp_extension import load

    logging.getLogger(__name__).info("compiling the CUDA sjlt kernel (first use only)")
    src = Path(__file__).with_name("sjlt_cuda.cu")
    return load(name="sketchfisher_sjlt", sources=[str(src)], extra_cuda_cflags=["-O3"], verbose=False)


def sjlt_cuda_shared(x: torch.Tensor, key: tuple[int, int], k: int, s: int, *, span: int = 1024,
                     rows_per_block: int = 16, threads: int = 256) -> torch.Tensor:
    """sjlt via the CUDA C++ shared-memory-histogram kernel; ``[n, k]`` in x's dtype, scaled by 1/√s.

    Defaults (1024 columns and 16 rows per 256-thread block) are the best of
    ``benchmarks/sjlt_tune.py`` on an H100 for n ≤ 256 rows.
    """
    out = _extension().sjlt(x, k, s, key[0], key[1], span, rows_per_block, threads)
    return (out / math.sqrt(s)).to(x.dtype)


def supports(k: int, s: int) -> bool:
    """The Triton kernel needs k and k/s to be powers of two (and k >= 16)."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    return available() and k >= 16 and pow2(k) and pow2(s) and pow2(k // s)


@functools.lru_cache(maxsize=1)
def extension_available() -> bool:
    """Whether the CUDA C++ kernel builds here (tried once per process; a failure is logged)."""
    import logging

    if not torch.cuda.is_available():
        return False
    try:
        _extension()
    except Exception as exc:  # no nvcc or no compiler: the Triton kernel computes the same map
        logging.getLogger(__name__).warning("CUDA sjlt kernel unavailable (%s); using the Triton kernel", exc)
        return False
    return True


def sjlt_on_cuda(x: torch.Tensor, key: tuple[int, int], k: int, s: int, backend: str = "auto") -> torch.Tensor | None:
    """sjlt of a CUDA ``x`` by the fastest available kernel, or None when neither applies."""
    if x.dtype not in DTYPES or backend not in ("auto", "cuda", "triton"):
        return None
    if backend in ("auto", "cuda") and extension_available():
        return sjlt_cuda_shared(x, key, k, s)
    if backend in ("auto", "triton") and supports(k, s):
        return sjlt_cuda(x, key, k, s)
    return None


def sjlt_cuda(x: torch.Tensor, key: tuple[int, int], k: int, s: int, *, block_rows: int | None = None,
              block_cols: int = 32, programs: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """sjlt of ``x [n, size]`` on CUDA; returns ``[n, k]`` in x's dtype, scaled by 1/√s.

    The column range is split so that about ``programs`` programs run (default 4 per SM).
    """
    import triton

    n, size = x.shape
    x = x.contiguous()
    out = torch.zeros(n, k, dtype=torch.float32, device=x.device)
    BR = block_rows or (16 if n <= 16 else 32 if n <= 32 else 64)
    BC = block_cols
    row_tiles = triton.cdiv(n, BR)
    if programs is None:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    col_tiles = max(1, programs // row_tiles)
    span = max(BC, triton.cdiv(triton.cdiv(size, col_tiles), BC) * BC)
    grid = (row_tiles, triton.cdiv(size, span))
    _kernel()[grid](x, out, n, size, x.stride(0), key[0], key[1], span, K=k, S=s, BR=BR, BC=BC,
                    IEEE=x.dtype == torch.float32, num_warps=num_warps)
    return (out / math.sqrt(s)).to(x.dtype)
