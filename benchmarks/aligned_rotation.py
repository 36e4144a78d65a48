"""Would an sjlt whose tile rotations are multiples of A entries be as accurate as today's? The exact variance of
each pair's sketched score under both, from real side vectors, per head block.

The library's sjlt (s = 1) sends entry ``o`` of tile ``t`` (``m = k`` consecutive entries of a head block, flattened
row-major) to bucket ``(o + c_t) mod m`` with an independent random sign; ``c_t`` is uniform on ``0 … m−1``. The GPU
kernel then loads each tile rotated, element by element (``benchmarks/sjlt_rotation.py``: aligned, pipelined loads
would be 1.3–2.0x faster). With ``c_t`` uniform on the multiples of ``A`` the loads would be aligned, but two entries
of different tiles then collide with probability ``A/m`` when their offsets agree modulo ``A`` and never otherwise
(``1/m`` for every pair today). For independent signs the sketched inner product's variance is

    Σ_{e≠e'} P(e, e' collide) · (x_e² y_e'² + x_e y_e x_e' y_e'),

so the two maps differ only in which pairs they weight. Where the side vectors' energy sits in a few columns shared by
the samples (an input feature that is large for every sample), the aligned map's variance grows, by up to A.

Per head block: the side vectors of the default variant as ``benchmarks/map_spread.py`` forms them (fp64,
scaled-centred), every pair (i in task A, j in task B), the ratio of the mean variance over pairs, aligned against
uniform. The variance is exact, with no sampled maps.

    python benchmarks/aligned_rotation.py --model minilm --samples 32 --k 256
    python benchmarks/aligned_rotation.py --model gpt2 --train-steps 36 --samples 32 --k 256
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_vs_memory import model_and_tasks  # noqa: E402
from block_errors import block_gradients, model_arguments  # noqa: E402
from map_spread import scaled  # noqa: E402


def pair_variance(x: torch.Tensor, y: torch.Tensor, m: int, align: int) -> torch.Tensor:
    """``[n_a, n_b]``: the variance of each pair's sketched inner product under the tiled-shift sjlt with tiles of
    ``m`` entries and rotations uniform on the multiples of ``align`` (1: today's map).

    Two entries collide, with probability ``align/m``, when they lie in different tiles and their offsets agree
    modulo ``align`` (their class). With ``u = x²``, ``v = y²``, ``p = xy`` summed per class (``U_r``, ...) and per
    tile and class (``U_tr``, ...): ``(align/m)·[Σ_r (U_r V_r + P_r²) − Σ_tr (U_tr V_tr + P_tr²)]``, the second sum
    taking out the pairs within a tile and each entry with itself."""
    pad = -x.shape[1] % m
    x, y = (torch.nn.functional.pad(v, (0, pad)).reshape(len(v), -1, m // align, align) for v in (x, y))
    u, v = x.square().sum(2), y.square().sum(2)  # [n, tiles, align]: per tile and class
    p_tr = torch.einsum("itqr,jtqr->ijtr", x, y)
    every = torch.einsum("ir,jr->ij", u.sum(1), v.sum(1)) + p_tr.sum(2).square().sum(-1)
    within = torch.einsum("itr,jtr->ij", u, v) + p_tr.square().sum((2, 3))
    return (align / m) * (every - within)


def check() -> None:
    """:func:`pair_variance` against the variance over many sampled maps of both kinds, on random vectors with a few
    large columns (where the two maps differ)."""
    gen = torch.Generator().manual_seed(0)
    m, size, align = 16, 96, 4
    x = torch.randn(2, size, dtype=torch.float64, generator=gen)
    y = torch.randn(2, size, dtype=torch.float64, generator=gen)
    x[:, ::8] *= 6
    y[:, ::8] *= 6
    tiles, offset = torch.arange(size) // m, torch.arange(size) % m
    for a in (1, align):
        est = []
        for _ in range(20000):
            c = torch.randint(0, m // a, (size // m,), generator=gen) * a
            bucket = (offset + c[tiles]) % m
            sign = torch.randint(0, 2, (size,), generator=gen).double() * 2 - 1
            sk = lambda v: torch.zeros(len(v), m, dtype=v.dtype).index_add_(1, bucket, v * sign)  # noqa: E731
            est.append(sk(x) @ sk(y).T)
        sampled = torch.stack(est).var(0)
        exact = pair_variance(x, y, m, a)
        assert torch.allclose(sampled, exact, rtol=0.06), (a, sampled, exact)
    print("| check | result |\n| --- | --- |\n| exact variance against 20,000 sampled maps, A = 1 and 4 | within 6% |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(p)
    p.add_argument("--aligns", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--eps", type=float, default=1e-10)
    p.add_argument("--check", action="store_true", help="only check the exact variance against sampled maps")
    args = p.parse_args()
    if args.check:
        check()
        return
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    layout = sf.analyze(model, loss, ta[:1], tb[:1], codec=sf.Factors()).layout
    blocks = {(layer, block, h): hb for layer, block in layout.groups()
              for h, hb in enumerate(layout.head_blocks(layer, block))}
    ga, gb = block_gradients(model, loss, ta, blocks), block_gradients(model, loss, tb, blocks)
    ratios = {a: [] for a in args.aligns}
    for key in blocks:
        a, b = ga[key], gb[key]
        fisher = a.square().mean(0) + args.eps
        balance = fisher.sqrt().sqrt().clamp_min(1e-300)  # the single pass's balance, (Î+ε)^¼
        x, y = scaled(a.square() / fisher * balance), scaled(b.abs() / balance)
        base = pair_variance(x, y, args.k, 1).mean()
        for align in args.aligns:
            ratios[align].append(float(pair_variance(x, y, args.k, align).mean() / base.clamp_min(1e-300)))
    what = ("minilm (the trained package)" if args.model == "minilm"
            else f"{args.model} ({args.layers} layers, {args.train_steps} training steps)")
    print(f"# {what}, {args.samples} x "
          f"{args.samples}, k = m = {args.k}, {len(blocks)} head blocks; the mean variance of a pair's sketched score, "
          "rotations in multiples of A against today's (uniform)")
    print("| A | median over blocks | 90th percentile | largest | blocks above 1.5 |\n| --- | --- | --- | --- | --- |")
    for align, r in ratios.items():
        t = torch.tensor(r)
        print(f"| {align} | {float(t.median()):.3f} | {float(t.quantile(0.9)):.3f} | {float(t.max()):.3f} "
              f"| {int((t > 1.5).sum())} of {len(t)} |")


if __name__ == "__main__":
    main()
