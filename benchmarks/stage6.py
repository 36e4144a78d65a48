"""Stage 6 speed on CPU, and sketch-then-verify on real MiniLM gradients.

Part 1 (GPT-2-small layout: 12 layers x 12 heads x 4 blocks, head blocks of 64 x 768 entries):
  * exact engine (what sf.Exact / sf.Factors feed): 100 x 100 samples, fp64 and fp32 contractions;
  * sketch engine, k = 256: 100 x 100 samples;
  * a faithful re-implementation of the predecessor's per-pair Python loop (slice full C_i, g_j, Î
    per (pair, layer, head, block) and sum) on 10 x 10 samples, beside our engine on the same 10 x 10.
  Per-sample block gradients are random (the arithmetic does not depend on their values); one
  set of tensors is reused for every (layer, block) to keep memory at ~1 GB.
Part 2 (``--minilm``): exact scores (sf.Factors) and sketched scores (sf.Sketch k=256 sjlt) of 48 x 48
  MiniLM samples; ``verify_top(100, budget=1000)`` recomputes the candidates' gradients and we
  report the fraction of the exact top-100 it recovers.

    python benchmarks/stage6.py [--minilm]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
import transformers as hf

import sketchfisher as sf
from sketchfisher.interference import ExactBlock, InterferenceResult, ScoreConfig
from sketchfisher.compress.sketch_block import SketchBlock


def gpt2_layout() -> sf.Layout:
    config = hf.GPT2Config(vocab_size=8)  # full-size attention, tiny embeddings
    return sf.layout_for(hf.GPT2Model(config))


def exact_result(layout, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hb, size = layout.num_heads, layout.head_blocks(0, "Q")[0].numel
    ga, gb = torch.randn(n, hb, size, generator=g), torch.randn(n, hb, size, generator=g)
    fisher = ga.square().mean(0)
    cfg = ScoreConfig(dtype=dtype)
    provider = lambda layer, block: ExactBlock.build(ga, gb, fisher, n, cfg)  # noqa: E731
    return InterferenceResult(layout, n, n, provider, cfg), (ga, gb, fisher)


def sketch_result(layout, n, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    hb = layout.num_heads
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    blk = SketchBlock(r(n, hb, k), r(n, hb).abs(), r(n, hb), r(n, hb, k), r(n, hb).abs(), r(n, hb), r(hb), k, 1.0)
    return InterferenceResult(layout, n, n, lambda layer, block: blk, ScoreConfig(dtype=torch.float64))


def predecessor_loop(layout, full_a, full_b, fisher, eps=1e-10):
    """Per pair, per layer, head and block: slice the full-shape tensors and reduce (the old Stage 6)."""
    out = {}
    for i, ca in enumerate(full_a):
        for j, gb in enumerate(full_b):
            for layer in range(layout.num_layers):
                for head in range(layout.num_heads):
                    for block in sf.BLOCKS:
                        hb = layout.head_block(layer, block, head)
                        c = hb.select(ca[hb.param_name])
                        g = hb.select(gb[hb.param_name])
                        f = hb.select(fisher[hb.param_name])
                        out[(i, j, layer, head, block)] = (c / (f + eps) * g.abs()).sum().item()
    return out


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def part1(n: int = 100, n_old: int = 10) -> None:
    layout = gpt2_layout()
    print(f"# Stage 6 on CPU ({torch.get_num_threads()} threads), GPT-2-small layout, torch {torch.__version__}")
    print("| what | samples | seconds | per pair (ms) |\n| --- | --- | --- | --- |")
    rows = []
    for label, dtype in (("exact engine, fp64 contraction", torch.float64),
                         ("exact engine, fp32 contraction", torch.float32)):
        res, _ = exact_result(layout, n, dtype)
        sec, _ = timed(lambda: res.materialize())
        rows.append((label, f"{n} x {n}", sec, 1000 * sec / n**2))
    res = sketch_result(layout, n)
    sec, _ = timed(lambda: res.materialize())
    rows.append(("sketch engine, k = 256", f"{n} x {n}", sec, 1000 * sec / n**2))
    # predecessor vs ours on 10 x 10: full-shape per-sample tensors of every attention weight
    g = torch.Generator().manual_seed(1)
    shapes = {hb.param_name: hb.param_shape for layer in range(layout.num_layers) for block in sf.BLOCKS
              for hb in layout.head_blocks(layer, block)}
    full_a = [{p: torch.randn(s, generator=g).square() for p, s in shapes.items()} for _ in range(n_old)]
    full_b = [{p: torch.randn(s, generator=g) for p, s in shapes.items()} for _ in range(n_old)]
    fisher = {p: torch.stack([fa[p] for fa in full_a]).mean(0) for p in shapes}
    sec_old, _ = timed(lambda: predecessor_loop(layout, full_a, full_b, fisher))
    small = f"{n_old} x {n_old}"
    rows.append(("predecessor per-pair Python loop", small, sec_old, 1000 * sec_old / n_old**2))
    for label, dtype in (("exact engine, fp64 contraction", torch.float64),
                         ("exact engine, fp32 contraction", torch.float32)):
        res10, _ = exact_result(layout, n_old, dtype)
        sec_new, _ = timed(lambda: res10.materialize())
        rows.append((label, small, sec_new, 1000 * sec_new / n_old**2))
    for label, size, sec, pp in rows:
        print(f"| {label} | {size} | {sec:.2f} | {pp:.3f} |")
    per_pair = {(label, size): pp for label, size, _, pp in rows}
    old, big = per_pair[("predecessor per-pair Python loop", small)], f"{n} x {n}"
    print(f"\nper-pair cost of the predecessor ({small}) over: exact fp32 engine at {small} "
          f"{old / per_pair[('exact engine, fp32 contraction', small)]:.1f}x, at {big} "
          f"{old / per_pair[('exact engine, fp32 contraction', big)]:.0f}x; sketch engine at {big} "
          f"{old / per_pair[('sketch engine, k = 256', big)]:.0f}x")


def part2() -> None:
    from sketchfisher.demo import load_minilm, load_task, make_batches, masked_token_loss

    model, tok = load_minilm()
    ta, tb = make_batches(load_task("math"), tok), make_batches(load_task("code"), tok)
    exact = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Factors())
    truth = exact.top_conflicts(100)
    print(f"\n# verify_top on MiniLM, {exact.n_a} x {exact.n_b} samples")
    print("| sketch | budget | held fraction (sketched top-100) | exact top-100 recovered | seconds |\n"
          "| --- | --- | --- | --- | --- |")
    key = lambda df: set(map(tuple, df[["block", "layer", "head", "sample_i", "sample_j"]].values.tolist()))  # noqa
    for codec in (sf.Sketch(k=256, kind="sjlt", seed=0), sf.Sketch(k=64, kind="sjlt", seed=0)):
        sk = sf.analyze(model, masked_token_loss, ta, tb, codec=codec)
        for budget in (200, 1000):
            sec, v = timed(lambda: sk.verify_top(100, budget, model=model, loss_fn=masked_token_loss,
                                                 task_a=ta, task_b=tb))
            recovered = len(key(v.head(100)) & key(truth)) / 100
            print(f"| {codec.kind} k={codec.k} | {budget} | {v.attrs['held_fraction']:.2f} | {recovered:.2f} "
                  f"| {sec:.1f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minilm", action="store_true", help="also run the MiniLM verify_top part")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--samples", type=int, default=100, help="samples per task of the engine timings")
    p.add_argument("--old-samples", type=int, default=10, help="samples per task of the predecessor comparison")
    args = p.parse_args()
    if not args.skip_speed:
        part1(args.samples, args.old_samples)
    if args.minilm:
        part2()


if __name__ == "__main__":
    main()
