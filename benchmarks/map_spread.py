"""Is the sketch's standard error right over maps, and how far does one map's per-block coverage swing?

Each head block's per-sample gradients are taken out of the model (``sketchfisher.capture.oracle``) and turned into
the default variant's side vectors outside the library, in fp64: ``x_i = g_i² · b / (Î + ε)`` and ``y_j = |g_j| / b``
with ``b = √mean|g|`` over both tasks, each side scaled-centred by its own mean. They are sketched by ``--maps``
independent count-sketch maps (one bucket and a random sign per coordinate) of width ``--k``. Per block: the coverage
of the library's interval ``1.96 √((t̂² + ‖x̃‖²‖ỹ‖²)/k)`` averaged over the maps and its standard deviation over maps,
the two sides' participation ratios (what ``res.shared_errors()`` estimates from a run's sketches) and the share of
the x side's energy in its top 64 coordinates.

With ``--single-pass`` task B is treated as the default order treats it (one pass, centred during it by its best
multiple of A's mean side vector x̄', then its mean residual m taken away): the coverage over maps with the norm
``‖ŷ_j‖²`` the library estimates from the sketches (``SketchBlock.recentred``) beside the same intervals with the
exact norm, which tells whether that estimate is what the intervals miss.

    python benchmarks/map_spread.py --model gpt2 --train-steps 36 --maps 20
    python benchmarks/map_spread.py --model gpt2 --train-steps 36 --maps 40 --single-pass
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf
from sketchfisher.compress.sketchmaps import SketchMap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_vs_memory import model_and_tasks  # noqa: E402
from block_errors import block_gradients, model_arguments  # noqa: E402


def scaled(v: torch.Tensor) -> torch.Tensor:
    m = v.mean(0)
    return v - ((v @ m) / m.square().sum().clamp_min(1e-300))[:, None] * m


def count_sketch(r: int, size: int, k: int):
    """The ``r``-th fully random count sketch ``[n, size] -> [n, k]`` (one bucket and a random sign per coordinate)."""
    g = torch.Generator().manual_seed(1000 + r)
    bucket = torch.randint(0, k, (size,), generator=g)
    sign = torch.randint(0, 2, (size,), generator=g).double() * 2 - 1
    return lambda v: torch.zeros(len(v), k, dtype=v.dtype).index_add_(1, bucket, v * sign)


def participation(v: torch.Tensor) -> float:
    n2 = v.square().sum(1)
    u = v[n2 > 0] / n2[n2 > 0].sqrt()[:, None]
    g = u @ u.T
    return float(g.trace() ** 2 / g.square().sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(p)
    p.add_argument("--maps", type=int, default=20)
    p.add_argument("--eps", type=float, default=1e-10)
    p.add_argument("--single-pass", action="store_true", help="task B as its single pass centres it (see above)")
    p.add_argument("--balance", default="pooled", choices=["pooled", "a", "fisher"],
                   help="b = √mean|g| over both tasks (two passes), over task A's (single pass, store formats 9–10), "
                        "or (Î+ε)^¼ (single pass today)")
    p.add_argument("--maps-kind", default="random", choices=["random", "library"],
                   help="with --single-pass: fully random count sketches, or the library's sjlt maps (tiled shifts)")
    args = p.parse_args()
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    layout = sf.analyze(model, loss, ta[:1], tb[:1], codec=sf.Factors()).layout
    blocks = {(layer, block, h): hb for layer, block in layout.groups() for h, hb in enumerate(layout.head_blocks(layer, block))}
    ga, gb = block_gradients(model, loss, ta, blocks), block_gradients(model, loss, tb, blocks)
    rows = []
    for key in blocks:
        a, b = ga[key], gb[key]
        balance = {"pooled": lambda: ((a.abs().sum(0) + b.abs().sum(0)) / (len(a) + len(b))).sqrt(),
                   "a": lambda: a.abs().mean(0).sqrt(),
                   "fisher": lambda: (a.square().mean(0) + args.eps).sqrt().sqrt()}[args.balance]().clamp_min(1e-300)
        x_raw = a.square() / (a.square().mean(0) + args.eps) * balance
        x, y = scaled(x_raw), scaled(b.abs() / balance)
        if args.single_pass:
            rows.append((key, participation(x) * participation(y),
                         *single_pass_coverage(x, b.abs() / balance, x_raw.mean(0), args.k, args.maps,
                                               args.maps_kind == "library")))
            continue
        t = x @ y.T
        se = ((t.square() + x.square().sum(1)[:, None] * y.square().sum(1)[None]) / args.k).sqrt()
        live = se > 0
        covered = []
        for r in range(args.maps):
            sk = count_sketch(r, x.shape[1], args.k)
            err = sk(x) @ sk(y).T - t
            covered.append(float((err.abs() <= 1.959964 * se)[live].double().mean()))
        c = torch.tensor(covered)
        energy = x.square().sum(0)
        top = float(energy.topk(min(64, len(energy))).values.sum() / energy.sum().clamp_min(1e-300))
        rows.append((key, participation(x) * participation(y), float(c.mean()), float(c.std()) if len(c) > 1 else 0.0,
                     float((c < 0.93).double().mean()), top))
    rows.sort(key=lambda r: r[1])
    if args.single_pass:
        print(f"# {args.model} ({args.layers} layers, {args.train_steps} training steps), {args.samples} x "
              f"{args.samples}, k = {args.k}, {args.maps} maps per block, task B in one pass, balance "
              f"{args.balance}, {args.maps_kind} maps")
        print("| block | rank_a x rank_b | coverage, estimated ‖ŷ‖² | coverage, exact ‖ŷ‖² | maps below 0.93 (estimated, "
              "exact) |\n| --- | --- | --- | --- | --- |")
        for (layer, block, h), n, est, ex, below_est, below_ex in sorted(rows, key=lambda r: r[2])[:10]:
            print(f"| layer {layer} {block} head {h} | {n:.1f} | {est:.3f} | {ex:.3f} | {below_est:.0%}, {below_ex:.0%} |")
        est, ex = torch.tensor([r[2] for r in rows]), torch.tensor([r[3] for r in rows])
        print(f"\n{len(rows)} blocks: mean coverage {float(est.mean()):.3f} with the estimated norm, {float(ex.mean()):.3f} "
              f"with the exact one; lowest {float(est.min()):.3f} and {float(ex.min()):.3f}")
        return
    print(f"# {args.model} ({args.layers} layers, {args.train_steps} training steps), {args.samples} x {args.samples}, "
          f"k = {args.k}, {args.maps} independent maps per block")
    print("| block | rank_a x rank_b | coverage over maps | sd over maps | maps below 0.93 | top-64 energy (x) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (layer, block, h), n, mean, sd, below, top in rows[:8] + rows[-3:]:
        print(f"| layer {layer} {block} head {h} | {n:.1f} | {mean:.3f} | {sd:.3f} | {below:.0%} | {top:.2f} |")
    means = torch.tensor([r[2] for r in rows])
    n, sd = torch.tensor([r[1] for r in rows]), torch.tensor([r[3] for r in rows])
    print(f"\n{len(rows)} blocks: coverage over maps {float(means.min()):.3f}–{float(means.max()):.3f} (mean "
          f"{float(means.mean()):.3f}); top-64 energy at most {max(r[5] for r in rows):.2f}")
    if len(rows) > 2 and args.maps > 1:
        corr = torch.corrcoef(torch.stack([n.log(), sd]))[0, 1]
        print(f"correlation of log(rank_a x rank_b) with the sd over maps: {float(corr):+.2f}; sd over predicted "
              f"√(0.95·0.05/(rank_a x rank_b)), median {float((sd / (0.0475 / n).sqrt()).median()):.2f}")


def single_pass_coverage(x: torch.Tensor, y_raw: torch.Tensor, x_mean: torch.Tensor, k: int, maps: int,
                         library: bool = False) -> tuple[float, float, float, float]:
    """Coverage over ``maps`` count sketches of B's single-pass scores: ``ỹ_j = y'_j − (⟨y'_j, x̄'⟩/‖x̄'‖²) x̄'``
    stored, ``m`` their mean, the sketched term ``⟨R x̃_i, R ỹ_j − R m⟩`` against its exact value; intervals
    ``1.96 √((t̂² + ‖x̃_i‖² N_j)/k)`` with ``N_j`` the library's estimate of ``‖ŷ_j‖²`` and with the exact norm.
    ``library``: the maps are the library's sjlt maps (:class:`~sketchfisher.compress.sketchmaps.SketchMap`, seeds
    0, 1, ...) instead of fully random ones. Returns (mean coverage estimated, exact; share of maps below 0.93
    estimated, exact)."""
    y = y_raw - ((y_raw @ x_mean) / x_mean.square().sum().clamp_min(1e-300))[:, None] * x_mean
    m = y.mean(0)
    t = x @ (y - m).T
    na, nb, m2 = x.square().sum(1), y.square().sum(1), m.square().sum()
    exact_norm = (y - m).square().sum(1)
    covered = []
    for r in range(maps):
        sk = SketchMap("sjlt", k, x.shape[1], r, (0, 0, 0)).apply if library else count_sketch(r, x.shape[1], k)
        rx, ry, rm = sk(x), sk(y), sk(m[None])[0]
        term = rx @ (ry - rm).T
        cross = ry @ rm
        spread = 2 * ((nb.clamp_min(0) * m2 + cross.square()) / k).sqrt()
        estimated = torch.hypot((nb - 2 * cross + m2).clamp_min(0), spread)
        hit = []
        for norm in (estimated, exact_norm):
            se = ((term.square() + na[:, None] * norm[None]) / k).sqrt()
            live = se > 0
            hit.append(float(((term - t).abs() <= 1.959964 * se)[live].double().mean()))
        covered.append(hit)
    c = torch.tensor(covered)
    return float(c[:, 0].mean()), float(c[:, 1].mean()), float((c[:, 0] < 0.93).double().mean()), \
        float((c[:, 1] < 0.93).double().mean())


if __name__ == "__main__":
    main()
