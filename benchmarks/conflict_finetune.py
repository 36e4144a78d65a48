"""The practical question: does freezing the blocks the conflict map ranks most conflicting protect task B while
fine-tuning on task A?

The conflict table is computed on samples of both tasks (exact gradients); then, for each seed, three short
fine-tunes on task A's training samples with Adam: all weights; the ``--k`` head blocks of most negative T
frozen (their gradient entries zeroed, so Adam never moves them); ``--k`` random head blocks frozen. Reported:
task A's loss drop on its training samples and task B's loss rise on held-out samples, mean ± standard
deviation over seeds. Pairs (``--pair``):

* ``copy-reverse``: the tiny GQA Llama of ``examples/tiny_gqa.py`` trained here on copy (A) and reverse (B);
* ``math-code``: real MiniLM, math (A) and code (B) sentences, masked-token loss;
* ``contradicting``: real MiniLM, math (A) and the same sentences with every masked target swapped for another's.

    python benchmarks/conflict_finetune.py --pair copy-reverse --steps 50 --k 8 --seeds 5 --lr 1e-3
    python benchmarks/conflict_finetune.py --pair math-code --steps 50 --k 24 --seeds 3
    python benchmarks/conflict_finetune.py --steps 2 --k 2 --seeds 1 --samples 8     # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import numpy as np
import torch

import sketchfisher as sf
from sketchfisher.demo import load_minilm, load_task
from sketchfisher.evaluation import contradicting_targets, finetune_frozen

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))


def tasks(pair: str, samples: int):
    """(model, loss, description, rank_a, rank_b, train_a, eval_b)."""
    half = samples // 2
    if pair == "copy-reverse":
        import tiny_gqa

        model = tiny_gqa.train(steps=150, seed=0)
        make = lambda task, n, seed: tiny_gqa.batches(tiny_gqa.make_task(task, n, seed), 16)  # noqa: E731
        return (model, tiny_gqa.answer_loss, "tiny GQA Llama: fine-tune on copy, reverse held out",
                make("copy", samples, 1), make("reverse", samples, 2), make("copy", 2 * samples, 11),
                make("reverse", 2 * samples, 12))
    model, tok = load_minilm()
    texts = {t: load_task(t, samples) for t in ("math", "code")}
    batches = lambda part: sf.tasks.from_texts(part, tok, loss="mlm", batch_size=4)  # noqa: E731
    rank_a, train_a = batches(texts["math"][:half]), batches(texts["math"][half:])
    if pair == "math-code":
        return (model, sf.tasks.masked_token_loss, "MiniLM: fine-tune on math, code held out", rank_a,
                batches(texts["code"][:half]), train_a, batches(texts["code"][half:]))
    return (model, sf.tasks.masked_token_loss, "MiniLM: fine-tune on math, its contradicting-target twins held out",
            rank_a, contradicting_targets(rank_a, seed=1), train_a, contradicting_targets(train_a, seed=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="math-code", choices=["copy-reverse", "math-code", "contradicting"])
    p.add_argument("--samples", type=int, default=48, help="samples per task to rank the blocks (MiniLM: half "
                                                           "rank, half train/evaluate)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--k", type=int, default=24, help="head blocks frozen")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, loss, what, rank_a, rank_b, train_a, eval_b = tasks(args.pair, args.samples)

    def mean_loss(batches) -> float:
        with torch.no_grad():
            return float(torch.cat([loss(model, b) for b in batches]).mean())

    table = sf.analyze(model, loss, rank_a, rank_b, codec=sf.Exact()).head_conflicts()
    layout = sf.layout_for(model)
    blocks = [layout.head_block(r["layer"], r["block"], r["head"]) for r in table.to_dict("records")]
    worst = [blocks[i] for i in np.argsort(table["T"].to_numpy())[:args.k]]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = mean_loss(train_a), mean_loss(eval_b)
    results = {name: [] for name in ("all weights", f"{args.k} most negative T frozen", f"{args.k} random frozen")}
    for seed in range(args.seeds):
        random = [blocks[i] for i in np.random.default_rng(1000 + seed).choice(len(blocks), args.k, replace=False)]
        for name, frozen in zip(results, ([], worst, random)):
            model.load_state_dict(state)
            finetune_frozen(model, loss, train_a, frozen, args.steps, args.lr, seed)
            results[name].append((before[0] - mean_loss(train_a), mean_loss(eval_b) - before[1]))
    model.load_state_dict(state)
    count = lambda batches: sum(len(next(iter(b.values()))) for b in batches)  # noqa: E731
    print(f"{what}; {args.steps} Adam steps, lr {args.lr:g}, {count(train_a)} training and {count(eval_b)} held-out "
          f"samples; blocks ranked on {count(rank_a)} + {count(rank_b)} other samples ({int(table.conflict.sum())} of "
          f"{len(table)} flagged; most negative alignment {table.alignment.min():+.2f}); {args.seeds} seeds; "
          f"{time.perf_counter() - start:.0f} s")
    print(f"before: A loss {before[0]:.4f}, B loss {before[1]:.4f}")
    print("| setting | A loss drop | B loss rise |\n| --- | --- | --- |")
    for name, rows in results.items():
        a, b = np.array(rows).T
        sd = lambda x: f" ± {x.std(ddof=1):.4f}" if len(x) > 1 else ""  # noqa: E731
        print(f"| {name} | {a.mean():.4f}{sd(a)} | {b.mean():.4f}{sd(b)} |")


if __name__ == "__main__":
    main()
