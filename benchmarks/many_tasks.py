"""Many tasks collected once against dedicated pairwise runs, on real MiniLM gradients.

Three tasks (the shipped math questions split in two halves, and code snippets): ``sf.analyze_tasks`` collects
each once; every ordered pair is also run on its own (``sf.analyze`` with the same sketch, its default order)
and exactly (``sf.Factors``). The table gives each pair's accuracy (median relative error, Spearman, coverage
of the nominal 95% intervals) for both, and the passes each took.

    python benchmarks/many_tasks.py [--samples 24] [--k 1024] [--dtype int4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf
from sketchfisher.demo import load_minilm, load_task, make_batches, masked_token_loss
from sketchfisher.evaluation import compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=24, help="samples per task")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--dtype", default="int4")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tok = load_minilm()
    n = args.samples
    math = load_task("math", 2 * n)
    tasks = {"math-1": make_batches(math[:n], tok), "math-2": make_batches(math[n:2 * n], tok),
             "code": make_batches(load_task("code", n), tok)}
    codec = sf.Sketch(k=args.k, dtype=args.dtype, seed=args.seed)
    start = time.perf_counter()
    many = sf.analyze_tasks(model, masked_token_loss, tasks, codec=codec)
    many_s = time.perf_counter() - start
    print(f"# MiniLM, {n} samples per task, {codec}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# sf.analyze_tasks: {len(tasks)} tasks, {2 * len(tasks)} passes, {many_s:.1f} s")
    print("| pair | collection | passes | median rel err | Spearman | coverage95 | coverage95 top 1% |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    pair_s, ratios = 0.0, []
    for a in tasks:
        for b in tasks:
            if a == b:
                continue
            exact = sf.analyze(model, masked_token_loss, tasks[a], tasks[b], codec=sf.Factors())
            start = time.perf_counter()
            own = sf.analyze(model, masked_token_loss, tasks[a], tasks[b], codec=codec)
            pair_s += time.perf_counter() - start
            mine = many.pair(a, b)
            rows = {"each task once": compare(exact.scores, mine.scores, mine.stderr),
                    "dedicated pair": compare(exact.scores, own.scores, own.stderr)}
            for label, m in rows.items():
                passes = "shared" if label == "each task once" else "3"
                print(f"| {a} x {b} | {label} | {passes} | {m['median_rel_err']:.4f} | {m['spearman']:.4f} | "
                      f"{m['coverage95']:.3f} | {m['coverage95_top1pct']:.3f} |")
            ratios.append(rows["each task once"]["median_rel_err"] / rows["dedicated pair"]["median_rel_err"])
    print(f"# dedicated pairs: {len(ratios)} collections, {3 * len(ratios)} passes, {pair_s:.1f} s; median relative "
          f"error of each task once / dedicated: median {sorted(ratios)[len(ratios) // 2]:.3f}, worst {max(ratios):.3f}")


if __name__ == "__main__":
    main()
