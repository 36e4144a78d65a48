"""Is a head block's low 95% coverage systematic or chance? The default sketch over several seeds on MiniLM.

Per seed: the overall coverage of the nominal 95% intervals, the lowest coverage of any (layer, head, block) over
its pairs and where it is, and how many blocks fall below 0.93. Then the per-block coverage averaged over the
seeds, and how much one seed's per-block coverage predicts another's (their correlation): a block whose error
bars are too narrow stays low under every seed, a chance low moves.

    python benchmarks/block_coverage.py --samples 48 --seeds 4
    python benchmarks/block_coverage.py --model gpt2 --train-steps 36 --seeds 4   # a briefly trained causal LM
    python benchmarks/block_coverage.py --model gpt2 --train-steps 36 --seeds 16 --first-seed 8   # more maps
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import sys

import numpy as np
import torch

import sketchfisher as sf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy_vs_memory import MODELS, model_and_tasks  # noqa: E402  (the same models, tasks and training)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, first-seed + 1, ... (to extend a run)")
    p.add_argument("--watch", nargs="*", default=[], metavar="LAYER:HEAD:BLOCK",
                   help="blocks to list in the per-block table whatever their rank, e.g. 1:11:K")
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--layers", type=int, default=2, help="depth of the random causal LMs")
    p.add_argument("--train-steps", type=int, default=0, help="Adam steps on both tasks' texts first (causal LMs)")
    args = p.parse_args()
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    exact = sf.analyze(model, loss, ta, tb, codec=sf.Factors())
    print(f"# {args.model}, math vs code, {args.samples} x {args.samples}, {sf.Sketch().describe()} (the default)")
    print("| seed | overall coverage | worst block | worst block's position | blocks below 0.93 |")
    print("| --- | --- | --- | --- | --- |")
    per_block, independent = [], []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        res = sf.analyze(model, loss, ta, tb, codec=sf.Sketch(seed=seed))
        inside = ((res.scores - exact.scores).abs() <= 1.959964 * res.stderr).double().flatten(0, 1)
        cov = inside.mean(0)  # [layers, heads, blocks]
        per_block.append(cov.flatten())
        independent.append(independent_errors(res, cov.shape).flatten())
        worst = int(cov.flatten().argmin())
        layer, head, block = (int(i) for i in torch.unravel_index(torch.tensor(worst), cov.shape))
        print(f"| {seed} | {float(inside.mean()):.3f} | {float(cov.min()):.3f} | layer {layer} head {head} "
              f"{res.layout.block_names[block]} | {int((cov < 0.93).sum())} of {cov.numel()} |", flush=True)
    stacked = torch.stack(per_block)
    mean = stacked.mean(0)
    print(f"\nper-block coverage averaged over {args.seeds} seeds: lowest {float(mean.min()):.3f}, "
          f"{int((mean < 0.93).sum())} blocks below 0.93")
    if args.seeds > 1:
        corr = torch.corrcoef(stacked)[~torch.eye(args.seeds, dtype=torch.bool)].mean()
        print(f"mean correlation of per-block coverage between two seeds: {float(corr):+.3f}")
        print("\n| block (lowest over the seeds' mean) | mean coverage | lowest seed | highest seed | seeds below 0.93 |")
        print("| --- | --- | --- | --- | --- |")
        lowest = mean.argsort()[:5].tolist()
        watched = [int(np.ravel_multi_index((int(l), int(h), res.layout.block_names.index(b)), tuple(cov.shape)))
                   for l, h, b in (w.split(":") for w in args.watch)]
        for flat in lowest + [f for f in watched if f not in lowest]:
            layer, head, block = (int(i) for i in torch.unravel_index(torch.tensor(flat), cov.shape))
            c = stacked[:, flat]
            print(f"| layer {layer} head {head} {res.layout.block_names[block]} | {float(c.mean()):.3f} | "
                  f"{float(c.min()):.3f} | {float(c.max()):.3f} | {int((c < 0.93).sum())} of {args.seeds} |")
    shared_error_table(stacked, torch.stack(independent).mean(0))
    # by block type: is one type's coverage lower on average (error bars too narrow there), or only more variable
    # from map to map (a family whose lowest blocks are lowest by chance more often)?
    by_type = stacked.view(args.seeds, *cov.shape)  # [seeds, layers, heads, blocks]
    print("\n| block | mean coverage | spread over blocks and seeds (sd) | lowest | below 0.93 (block x seed) |")
    print("| --- | --- | --- | --- | --- |")
    for b, name in enumerate(res.layout.block_names):
        c = by_type[..., b]
        print(f"| {name} | {float(c.mean()):.4f} | {float(c.std()):.4f} | {float(c.min()):.3f} | "
              f"{int((c < 0.93).sum())} of {c.numel()} |")


def independent_errors(res, shape) -> torch.Tensor:
    """``res.shared_errors()``'s independent errors per (layer, head, block), a shared K/V block's under each of
    its query heads."""
    out = torch.full(shape, float("nan"), dtype=torch.float64)
    names = res.layout.block_names
    for row in res.shared_errors().itertuples():
        index = res.layout.head_index(row.block)
        heads = (index == index[row.head]).nonzero().flatten()
        out[row.layer, heads, names.index(row.block)] = row.independent_errors
    return out


def shared_error_table(stacked: torch.Tensor, independent: torch.Tensor) -> None:
    """Blocks grouped by how many independent errors their pairs have (``res.shared_errors()``, averaged over the
    seeds): each group's coverage averaged over seeds and blocks, how far one seed's block coverage swings (the
    standard deviation over seeds, averaged over the group's blocks) against the spread ``shared_errors`` predicts,
    and how often a block falls below 0.93 under one map."""
    print("\n| independent errors (shared_errors) | blocks | mean coverage | sd over seeds | predicted sd | "
          "block x seed below 0.93 |\n| --- | --- | --- | --- | --- | --- |")
    sd = stacked.std(0)
    for lo, hi in ((0, 10), (10, 30), (30, 100), (100, float("inf"))):
        sel = (independent >= lo) & (independent < hi)
        if not sel.any():
            continue
        below = (stacked[:, sel] < 0.93).double().mean()
        predicted = (0.95 * 0.05 / independent[sel]).sqrt().mean()
        print(f"| {lo:g}–{hi:g} | {int(sel.sum())} | {float(stacked[:, sel].mean()):.3f} | {float(sd[sel].mean()):.3f} | "
              f"{float(predicted):.3f} | {float(below):.1%} |")


if __name__ == "__main__":
    main()
