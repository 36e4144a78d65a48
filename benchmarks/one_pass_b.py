"""Accuracy and error bars of the 1.5-pass order (task B collected in one pass) against the two-pass order,
on real MiniLM gradients: both against the exact scores (lossless factors), over several seeds.

    python benchmarks/one_pass_b.py [--samples 32] [--ks 64,256] [--seeds 5] [--threads 2]

Per order and k: median relative error, Spearman over all scores, top-50 recall and the coverage of the
nominal 95% intervals (mean over seeds), and the collection time (median over seeds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

import sketchfisher as sf
from sketchfisher.demo import load_minilm, load_task
from sketchfisher.evaluation import compare
from sketchfisher.tasks import make_batches, masked_token_loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--ks", default="64,256")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variant", default="paper")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_minilm()
    ta = make_batches(load_task("math", args.samples), tok)
    tb = make_batches(load_task("code", args.samples), tok)
    exact = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Factors(), variant=args.variant)
    print(f"# MiniLM, {exact.n_a} x {exact.n_b} samples, variant {args.variant}, {args.seeds} seeds, "
          f"{args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| k | order | median rel. error | Spearman | top-50 recall | 95% coverage | collection s |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    for k in map(int, args.ks.split(",")):
        for passes in (2, 1.5):
            rows, times = [], []
            for seed in range(args.seeds):
                start = time.perf_counter()
                res = sf.analyze(model, masked_token_loss, ta, tb, codec=sf.Sketch(k=k, seed=seed),
                                 variant=args.variant, passes=passes)
                times.append(time.perf_counter() - start)
                rows.append(compare(exact.scores, res.scores, res.stderr, top=50))
            mean = {key: statistics.fmean(r[key] for r in rows) for key in rows[0]}
            order = "two passes per task" if passes == 2 else "task B once (1.5 passes)"
            print(f"| {k} | {order} | {mean['median_rel_err']:.4f} | {mean['spearman']:.4f} | "
                  f"{mean['top50_recall']:.2f} | {mean['coverage95']:.3f} | {statistics.median(times):.1f} |")


if __name__ == "__main__":
    main()
