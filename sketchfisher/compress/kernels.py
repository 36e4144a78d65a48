"""Optional Triton kernel for sjlt on CUDA: one pass over x, no index tensors, no scatter.

Each program takes a tile of rows and a span of columns; per column tile it hashes the column
indices (same hash as :mod:`sketchfisher.compress.hashing`), builds the ±1 one-hot matrix
``[BC, k]`` in registers and accumulates ``x_tile @ onehot`` with ``tl.dot`` (fp32 accumulation;
exact for bf16/fp16 inputs, IEEE fp32 for fp32 inputs), then adds its ``[BR, k]`` partial sums
into the output with atomics. Used by ``SketchMap.apply`` when x is on CUDA and Triton imports.
"""

from __future__ import annotations

import functools
import math

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    try:
        import triton  # noqa: F401
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

    @triton.jit
    def sjlt_scatter_kernel(x_ptr, part_ptr, n, size, stride_x, lo, hi, span,
                            K: tl.constexpr, S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        # Each program scatters its column span into its own private [n, K] slice of part (no
        # contention between programs); partial slices are summed afterwards.
        BAND: tl.constexpr = K // S
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BR + tl.arange(0, BR)
        row_ok = rows < n
        lo32 = lo.to(tl.uint32)
        hi32 = hi.to(tl.uint32)
        base = part_ptr + pid_c.to(tl.int64) * n * K
        start = pid_c * span
        for c0 in range(start, start + span, BC):
            cols = c0 + tl.arange(0, BC)
            col_ok = cols < size
            ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=ok, other=0.0)
            x = x.to(tl.float32)
            for b in tl.static_range(S):
                h = _fmix32(_fmix32((cols.to(tl.uint32) * S + b) ^ lo32) ^ hi32)   # [BC]
                bucket = (h & 0x7FFFFFFF) & (BAND - 1)
                sign = 1.0 - 2.0 * (h >> 31).to(tl.float32)
                tl.atomic_add(base + rows[:, None] * K + (b * BAND + bucket)[None, :].to(tl.int32),
                              x * sign[None, :], mask=ok, sem="relaxed")

    return sjlt_kernel, sjlt_scatter_kernel


@functools.lru_cache(maxsize=1)
def _extension():
    """JIT-compile the CUDA C++ sjlt kernel once (cached by torch in ~/.cache/torch_extensions)."""
    import logging
    from pathlib import Path

    from torch.utils.cpp_extension import load

    logging.getLogger(__name__).info("compiling the CUDA sjlt kernel (first use only)")
    src = Path(__file__).with_name("sjlt_cuda.cu")
    return load(name="sketchfisher_sjlt", sources=[str(src)], extra_cuda_cflags=["-O3"], verbose=False)


def sjlt_cuda_shared(x: torch.Tensor, key: tuple[int, int], k: int, s: int, *, span: int | None = None,
                     rows_per_block: int = 32, threads: int = 256) -> torch.Tensor:
    """sjlt via the CUDA C++ shared-memory-histogram kernel; ``[n, k]`` in x's dtype, scaled by 1/√s."""
    n, size = x.shape
    if span is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        blocks_wanted = max(1, 8 * sms // max(1, -(-n // rows_per_block)))
        span = max(threads, -(-size // blocks_wanted))
    out = _extension().sjlt(x, k, s, key[0], key[1], span, rows_per_block, threads)
    return (out / math.sqrt(s)).to(x.dtype)


def supports(k: int, s: int) -> bool:
    """The kernel needs k and k/s to be powers of two (and k >= 16)."""
    pow2 = lambda v: v >= 1 and v & (v - 1) == 0  # noqa: E731
    return available() and k >= 16 and pow2(k) and pow2(s) and pow2(k // s)


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
    _kernel()[0][grid](x, out, n, size, x.stride(0), key[0], key[1], span, K=k, S=s, BR=BR, BC=BC,
                       IEEE=x.dtype == torch.float32, num_warps=num_warps)
    return (out / math.sqrt(s)).to(x.dtype)


def sjlt_cuda_scatter(x: torch.Tensor, key: tuple[int, int], k: int, s: int, *, block_cols: int = 128,
                      programs: int | None = None, num_warps: int = 4) -> torch.Tensor:
    """Variant of :func:`sjlt_cuda`: privatised atomic scatter instead of one-hot dots."""
    import triton

    n, size = x.shape
    x = x.contiguous()
    BR = triton.next_power_of_2(min(n, 16))
    row_tiles = triton.cdiv(n, BR)
    if programs is None:
        programs = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    col_tiles = max(1, programs // row_tiles)
    span = max(block_cols, triton.cdiv(triton.cdiv(size, col_tiles), block_cols) * block_cols)
    grid = (row_tiles, triton.cdiv(size, span))
    part = torch.zeros(grid[1], n, k, dtype=torch.float32, device=x.device)
    _kernel()[1][grid](x, part, n, size, x.stride(0), key[0], key[1], span, K=k, S=s, BR=BR, BC=block_cols,
                       num_warps=num_warps)
    return (part.sum(0) / math.sqrt(s)).to(x.dtype)
