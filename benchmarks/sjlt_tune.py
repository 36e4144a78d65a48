"""Tune the CUDA sjlt kernel's tile sizes on one head block (524,288 entries), beside copy_.

    python benchmarks/sjlt_tune.py
"""

from __future__ import annotations

import itertools

import torch

from sketchfisher.compress.kernels import sjlt_cuda, sjlt_cuda_shared


def bench(fn, repeats=30):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    size, k, s = 524288, 256, 4
    print(f"# {torch.cuda.get_device_name()}, size {size}, k {k}, s {s}; median ms; ratio to copy_")
    print("(CUDA C++ kernel: BC = rows per block, programs = columns per block)")
    print("| n | dtype | variant | copy_ | best kernel | BC | programs | warps | x copy_ |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    def shared(x, key, k, s, block_cols, programs, num_warps):  # block_cols = rows per block, programs = span
        return sjlt_cuda_shared(x, key, k, s, span=programs, rows_per_block=block_cols, threads=32 * num_warps)

    variants = {"one-hot dot (Triton)": (sjlt_cuda, (16,), (528,), (8,)),
                "shared histogram (CUDA C++)": (shared, (16, 64), (512, 1024, 2048, 4096), (4, 8))}
    for (n, dtype), (variant, (fn, bcs, progs, warpss)) in itertools.product(
            itertools.product((4, 16, 64, 256), (torch.bfloat16, torch.float32)), variants.items()):
        x = torch.randn(n, size, device="cuda").to(dtype)
        buf = torch.empty_like(x)
        t_copy = bench(lambda: buf.copy_(x))
        ref = sjlt_cuda(x.float(), (123, 456), k, s)
        best = None
        for bc, programs, warps in itertools.product(bcs, progs, warpss):
            try:
                out = fn(x, (123, 456), k, s, block_cols=bc, programs=programs, num_warps=warps)
                err = float((out.float() - ref).norm() / ref.norm())
                assert err < 1e-2, err
                t = bench(lambda: fn(x, (123, 456), k, s, block_cols=bc, programs=programs, num_warps=warps))
            except (AssertionError, RuntimeError) as exc:  # a tile shape the compiler rejects (e.g. out of shared memory)
                print(f"  skip BC={bc} programs={programs} warps={warps}: {type(exc).__name__} {exc}"[:200])
                continue
            if best is None or t < best[0]:
                best = (t, bc, programs, warps)
        if best is None:
            print(f"| {n} | {dtype} | {variant} | no configuration ran |")
            continue
        t, bc, programs, warps = best
        print(f"| {n} | {str(dtype).split('.')[-1]} | {variant} | {t_copy:.4f} | {t:.4f} | {bc} | {programs} | {warps} "
              f"| {t / t_copy:.2f} |", flush=True)


if __name__ == "__main__":
    main()
