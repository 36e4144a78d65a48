"""The practical question: does freezing the blocks the conflict map ranks most conflicting protect task B while
fine-tuning on task A?

Real trained MiniLM (the demo's model and tasks, masked-token loss). The conflict table is computed on held-out
samples of both tasks (exact gradients); then, for each seed, three short fine-tunes on task A's training
samples with Adam: all weights; the ``--k`` head blocks of most negative T frozen (their gradient entries zeroed,
so Adam never moves them); ``--k`` random head blocks frozen. Reported: task B's loss rise and task A's loss drop
on the training and evaluation samples, mean ± standard deviation over seeds.

    python benchmarks/conflict_finetune.py --steps 50 --k 24 --seeds 3
    python benchmarks/conflict_finetune.py --steps 50 --k 24 --seeds 3 --pair contradicting   # a real conflict
    python benchmarks/conflict_finetune.py --steps 2 --k 2 --seeds 1 --samples 8     # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import numpy as np
import torch

import sketchfisher as sf
from sketchfisher.demo import load_minilm, load_task
from sketchfisher.evaluation import contradicting_targets, finetune_frozen


def mean_loss(model, batches) -> float:
    with torch.no_grad():
        return float(torch.cat([sf.tasks.masked_token_loss(model, b) for b in batches]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48, help="samples per task (half to rank blocks, half to train)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--k", type=int, default=24, help="head blocks frozen")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pair", default="math-code", choices=["math-code", "contradicting"],
                   help="task B: code snippets, or task A's own sentences with every masked target swapped for "
                        "another's (a pair that conflicts by construction)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = load_minilm()
    half = args.samples // 2
    texts = {t: load_task(t, args.samples) for t in ("math", "code")}
    batches = lambda part: sf.tasks.from_texts(part, tok, loss="mlm", batch_size=4)  # noqa: E731
    rank_a, train_a = batches(texts["math"][:half]), batches(texts["math"][half:])
    if args.pair == "math-code":
        rank_b, eval_b = batches(texts["code"][:half]), batches(texts["code"][half:])
    else:  # the held-out B samples are the contradicting twins of the training samples
        rank_b, eval_b = contradicting_targets(rank_a, seed=1), contradicting_targets(train_a, seed=2)
    table = sf.analyze(model, sf.tasks.masked_token_loss, rank_a, rank_b, codec=sf.Exact()).head_conflicts()
    layout = sf.layout_for(model)
    blocks = [layout.head_block(r["layer"], r["block"], r["head"]) for r in table.to_dict("records")]
    worst = [blocks[i] for i in np.argsort(table["T"].to_numpy())[:args.k]]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = {"A": mean_loss(model, train_a), "B": mean_loss(model, eval_b), "B (ranking samples)": mean_loss(model, rank_b)}
    results = {name: [] for name in ("all weights", f"{args.k} most conflicting frozen", f"{args.k} random frozen")}
    for seed in range(args.seeds):
        random = [blocks[i] for i in np.random.default_rng(1000 + seed).choice(len(blocks), args.k, replace=False)]
        for name, frozen in zip(results, ([], worst, random)):
            model.load_state_dict(state)
            finetune_frozen(model, sf.tasks.masked_token_loss, train_a, frozen, args.steps, args.lr, seed)
            results[name].append((before["A"] - mean_loss(model, train_a), mean_loss(model, eval_b) - before["B"]))
    model.load_state_dict(state)
    b_name = "code" if args.pair == "math-code" else "contradicting-target"
    print(f"MiniLM: fine-tune on math ({len(texts['math'][half:])} samples, {args.steps} Adam steps, lr {args.lr:g}); "
          f"{b_name} loss on {sum(len(b['labels']) for b in eval_b)} held-out samples; blocks ranked on {half} + {half} other samples "
          f"({int(table.conflict.sum())} of {len(table)} flagged; most negative alignment "
          f"{table.alignment.min():+.2f}); {args.seeds} seeds; {time.perf_counter() - start:.0f} s")
    print(f"before: math loss {before['A']:.4f}, {b_name} loss {before['B']:.4f}")
    print(f"| setting | math loss drop | {b_name} loss rise |\n| --- | --- | --- |")
    for name, rows in results.items():
        a, b = np.array(rows).T
        sd = lambda x: f" ± {x.std(ddof=1):.4f}" if len(x) > 1 else ""  # noqa: E731
        print(f"| {name} | {a.mean():.4f}{sd(a)} | {b.mean():.4f}{sd(b)} |")


if __name__ == "__main__":
    main()
