"""Fewer bits per entry for a wider sketch at the same bytes: the inner product's error after dithered codes.

A count sketch of two Gaussian vectors (correlation ρ) of ``--dim`` entries at width k, each sketched vector coded
with ``L`` levels each side of 0 (scale max|v|/L, subtractive dither as ``Sketch(dtype="int4")`` stores, L = 7 there),
at the byte budget of int4 at k = 1024 (512 bytes): k = 4096 / bits. Prints the RMS error of the estimated inner
product over ``--maps`` independent maps and dithers, divided by the dimension, beside the uncoded sketch.

    python benchmarks/code_bits.py [--dim 4000] [--maps 2000] [--rho 0 0.5]
"""

from __future__ import annotations

import argparse
import math

import torch

from sketchfisher.compress.sketch import INT4_LEVELS

CODES = (("uncoded fp64", None, None), ("int4 (today)", 4, INT4_LEVELS), ("3 bits", 3, 3), ("2 bits", 2, 1))


def coded(v: torch.Tensor, levels: int, gen: torch.Generator) -> torch.Tensor:
    """``v`` through a dithered uniform code with ``levels`` steps each side of 0, decoded."""
    scale = v.abs().max() / levels
    dither = torch.rand(v.shape, dtype=v.dtype, generator=gen) - 0.5
    return ((v / scale + dither).round().clamp(-levels, levels) - dither) * scale


def rms_error(dim: int, k: int, levels, rho: float, maps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    errs = torch.empty(maps, dtype=torch.float64)
    for t in range(maps):
        x = torch.randn(dim, dtype=torch.float64, generator=gen)
        y = rho * x + math.sqrt(1 - rho ** 2) * torch.randn(dim, dtype=torch.float64, generator=gen)
        bucket = torch.randint(0, k, (dim,), generator=gen)
        sign = torch.randint(0, 2, (dim,), generator=gen).double() * 2 - 1
        rx, ry = (torch.zeros(k, dtype=torch.float64).index_add_(0, bucket, sign * v) for v in (x, y))
        if levels is not None:
            rx, ry = coded(rx, levels, gen), coded(ry, levels, gen)
        errs[t] = rx @ ry - x @ y
    return float(errs.square().mean().sqrt()) / dim


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=4000)
    p.add_argument("--maps", type=int, default=2000)
    p.add_argument("--rho", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(f"## RMS error / dim of a sketched inner product at 512 bytes a vector ({args.maps} maps, dim {args.dim})")
    print("| code | k | " + " | ".join(f"ρ = {r:g}" for r in args.rho) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in args.rho) + " |")
    for name, bits, levels in CODES:
        k = 1024 if bits is None else 4096 // bits
        row = [f"{rms_error(args.dim, k, levels, r, args.maps, args.seed):.4f}" for r in args.rho]
        print(f"| {name} | {k} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
