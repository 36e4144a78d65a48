"""sjlt throughput on one head block of 524,288 entries (128 x 4096), beside a plain copy.

Reports GB/s of input read for: a plain copy (clone) of the same tensor, ``SketchMap.apply``
(``index_add_`` per band, indices cached after first use), the bare scatter loop, and the same map as
a CSR sparse-dense matmul (an alternative that was measured and not adopted on CPU).

    python benchmarks/sketch_throughput.py [--rows 16] [--k 256] [--s 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sketchfisher.compress.sketchmaps import SketchMap


def bench(fn, device, repeats=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--s", type=int, default=4)
    p.add_argument("--size", type=int, default=524288)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    x = torch.randn(args.rows, args.size, device=device)
    m = SketchMap("sjlt", args.k, args.size, 0, (0, 0, 0), args.s)
    rows, signs = m.sjlt_indices()
    rows, signs = rows.to(device), signs.to(device=device, dtype=x.dtype)

    def cached():
        out = torch.zeros(args.rows, args.k, device=device)
        for b in range(args.s):
            out.index_add_(1, rows[b], x * signs[b])
        return out / math.sqrt(args.s)

    gb = x.numel() * x.element_size() / 1e9
    csr = torch.sparse_coo_tensor(torch.stack([rows.flatten().cpu(), torch.arange(args.size).repeat(args.s)]),
                                  signs.flatten().cpu() / math.sqrt(args.s), (args.k, args.size),
                                  check_invariants=False).coalesce().to_sparse_csr().to(device)
    results = [("copy (clone)", bench(lambda: x.clone(), device)),
               ("sjlt SketchMap.apply (index_add_, indices cached)", bench(lambda: m.apply(x), device)),
               ("sjlt index_add_ loop alone", bench(cached, device)),
               ("sjlt as CSR SpMM (alternative)", bench(lambda: csr @ x.T, device))]
    print(f"# {args.rows} x {args.size} fp32 on {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"k={args.k}, s={args.s}, torch {torch.__version__}")
    print("| operation | ms | GB/s of input | x copy time |\n| --- | --- | --- | --- |")
    for name, sec in results:
        print(f"| {name} | {1000 * sec:.2f} | {gb / sec:.1f} | {sec / results[0][1]:.1f} |")


if __name__ == "__main__":
    main()
