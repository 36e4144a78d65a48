"""sjlt throughput on one head block of 524,288 entries (128 x 4096), beside a plain copy.

Reports time and GB/s of input read for: a copy of the same tensor into a preallocated buffer
(``copy_``: one read and one write, no allocation), ``SketchMap.apply`` (the Triton kernel on GPUs,
the sign-folded ``index_add_`` on CPU), the ``index_add_`` path alone, and the same map as a CSR
sparse-dense matmul (an alternative). All in one run, best of ``--repeats``.

    python benchmarks/sketch_throughput.py [--rows 16] [--k 256] [--s 1] [--device cpu|cuda]
    python benchmarks/sketch_throughput.py --storage --vectors 64 288 --k 1024   # storing sketches: int4, rotation

``--storage`` instead times how sketched vectors are stored and read back (``Sketch.encode`` / ``decode``) for
``--vectors`` (samples × head blocks) of width ``k``: the int4 dither beside the one-expression form of the same
hash (what a GPU runs), and int4 encode and decode with and without the Hadamard rotation.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sketchfisher.compress.sketchmaps import SketchMap


def bench(fn, device: torch.device, repeats: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def storage(args) -> None:
    import sketchfisher as sf
    from sketchfisher.compress.sketch import dither
    from sketchfisher.kernels.hashing import fmix32

    device = torch.device(args.device)
    v = torch.randn(*args.vectors, args.k, device=device)
    scale = v.abs().amax(-1).float() / 7

    def one_expression():  # the dither's formula evaluated at once over every entry (the GPU's form)
        m = 0xFFFFFFFF
        base = fmix32(fmix32((scale.contiguous().view(torch.int32).to(torch.int64) & m) ^ 0) ^ 0x5BD1E995)
        coord = fmix32((torch.arange(args.k, device=device) + 0x9E3779B9) & m)
        return fmix32(base[..., None] ^ coord).double() * 2.0 ** -32 - 0.5

    rows = [("int4 dither, one expression (the GPU's form)", bench(one_expression, device, args.repeats)),
            ("int4 dither as stored (CPU: a cache-sized slice at a time)",
             bench(lambda: dither(scale, args.k, 0), device, args.repeats))]
    for rotate in (False, True):
        codec = sf.Sketch(k=args.k, dtype="int4", rotate=rotate)
        parts = codec.encode(v)
        label = "rotated" if rotate else "plain"
        rows += [(f"int4 encode, {label}", bench(lambda: codec.encode(v), device, args.repeats)),
                 (f"int4 decode, {label}", bench(lambda: codec.decode(parts), device, args.repeats))]
    print(f"# {' x '.join(map(str, args.vectors))} vectors of k = {args.k} on {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print("| operation | s |\n| --- | --- |")
    for label, sec in rows:
        print(f"| {label} | {sec:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--s", type=int, default=1)
    p.add_argument("--size", type=int, default=524288)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--storage", action="store_true", help="time storing sketches (int4, the rotation) instead")
    p.add_argument("--vectors", type=int, nargs="+", default=[64, 288], help="leading shape of --storage's vectors")
    args = p.parse_args()
    if args.storage:
        storage(args)
        return
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    x = torch.randn(args.rows, args.size, device=device).to(dtype)
    buf = torch.empty_like(x)
    m = SketchMap("sjlt", args.k, args.size, 0, (0, 0, 0), args.s)
    rows, signs = m.sjlt_indices()
    folded = (rows + args.k * (signs < 0)).to(device)

    def index_add():  # the CPU path: sign-folded index_add_ per band
        bins = torch.zeros(args.rows, 2 * args.k, device=device, dtype=dtype)
        for b in range(args.s):
            bins.index_add_(1, folded[b], x)
        return bins[:, :args.k] - bins[:, args.k:]

    csr = torch.sparse_coo_tensor(torch.stack([rows.flatten().cpu(), torch.arange(args.size).repeat(args.s)]),
                                  signs.flatten().double() / math.sqrt(args.s), (args.k, args.size),
                                  check_invariants=False).coalesce().to_sparse_csr().to(device=device, dtype=dtype)
    results = [("copy_ into a preallocated buffer", bench(lambda: buf.copy_(x), device, args.repeats)),
               ("sjlt SketchMap.apply (Triton kernel on GPU, index_add_ on CPU)",
                bench(lambda: m.apply(x), device, args.repeats)),
               ("sjlt sign-folded index_add_ per band", bench(index_add, device, args.repeats)),
               ("sjlt as CSR SpMM", bench(lambda: csr @ x.T, device, args.repeats))]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {args.rows} x {args.size} {args.dtype} on {device} ({name}), k={args.k}, s={args.s}, "
          f"torch {torch.__version__}, best of {args.repeats}")
    gb = x.numel() * x.element_size() / 1e9
    print("| operation | ms | GB/s of input read | x copy_ time |\n| --- | --- | --- | --- |")
    for label, sec in results:
        print(f"| {label} | {1000 * sec:.3f} | {gb / sec:.1f} | {sec / results[0][1]:.2f} |")


if __name__ == "__main__":
    main()
