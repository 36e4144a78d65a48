"""The preparation recipes side by side: how the balance is formed and how precisely it and the centres are kept.

Where the statistics are fp32 (the GPU setting) a collection keeps the balance ``w_b``, the centres ``x̄'`` and
``ȳ'`` and the conflict weights in one byte (fp8 e4m3 codes with a scale per head block,
``sketchfisher.compress.onebyte``); stores of format 9-10 kept the balance and centres in bf16. Any values keep
the scores exact, as long as every use reads the same ones, so what the recipe moves is the sketch's variance.
Where task B runs once, the balance is a power of task A's normaliser ((Î+ε+λ)^¼ for ``paper``), so that pass 1
keeps no Σ|g| of task A's; stores of format 10 and before balanced by √mean|g| of task A. This script runs the
library's own preparation under each recipe (``collect.sketches.RECIPE``; the √mean|g| rule also has task A keep
its Σ|g|) and prints the accuracy against the exact codec in both pass orders, for a few sketch seeds:

    python benchmarks/one_byte_sides.py                                    # MiniLM, paper: bf16 and fp8 sides
    python benchmarks/one_byte_sides.py --variant signed
    python benchmarks/one_byte_sides.py --model gpt2 --train-steps 36     # a briefly trained GPT-2-wide LM
    python benchmarks/one_byte_sides.py --sides fp8 --balance abs,fisher --seeds 1

Two passes per task balance by both tasks' √mean|g| under either ``--balance`` (the recipe's rule is for task
B's single pass).
"""

from __future__ import annotations

import argparse
import itertools
import os
from dataclasses import replace

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import torch

import sketchfisher as sf
from sketchfisher.collect import sketches as collect_sketches
from sketchfisher.compress.base import SideCodec

from accuracy_vs_memory import MODELS, metrics, model_and_tasks

SIDES = {"bf16": torch.bfloat16, "fp8": "fp8"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--variant", default="paper", choices=list(sf.VARIANTS))
    p.add_argument("--seeds", type=int, default=2, help="sketch seeds per setting")
    p.add_argument("--k", type=int, default=None, help="the sketch's k (default: the default sketch's)")
    p.add_argument("--sides", default="bf16,fp8", help="balance and centres: bf16 (format 9-10) or fp8 (today's)")
    p.add_argument("--balance", default="fisher", help="task B once: fisher (today's (Î+ε+λ)^power), abs (√mean|g|)")
    args = p.parse_args()
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    exact = sf.analyze(model, loss, ta, tb, codec=sf.Factors(), variant=args.variant)
    codec = sf.Sketch() if args.k is None else sf.Sketch(k=args.k)
    print(f"# {args.model}{f' trained {args.train_steps} steps' if args.train_steps else ''}, {args.variant}, "
          f"{exact.n_a}x{exact.n_b} samples, {codec!r}, fp32 statistics; torch {torch.__version__}")
    print("| passes | balance and centres | balance (task B once) | seed | Spearman | median rel err | 95% coverage "
          "| worst head block |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    today, statistics = collect_sketches.RECIPE, SideCodec.statistics

    def with_abs(self, cfg, passes):  # the √mean|g| rule: task A keeps its Σ|g| in the single-pass order too
        out = statistics(self, cfg, passes)
        return {"a": out["a"] | ({"abs"} if self.variance_reduction else set()), "b": out["b"]}

    try:
        for passes, balance, sides, seed in itertools.product((1.5, 2), args.balance.split(","),
                                                             args.sides.split(","), range(args.seeds)):
            collect_sketches.RECIPE = collect_sketches.Recipe(SIDES[sides], balance)
            SideCodec.statistics = with_abs if balance == "abs" else statistics
            res = sf.analyze(model, loss, ta, tb, codec=replace(codec, seed=seed), variant=args.variant,
                             passes=passes, stats_dtype=torch.float32)
            m = metrics(exact.scores, res.scores, res.stderr)
            rule = "√mean|g|" if balance == "abs" or passes == 2 else "(Î+ε+λ)^power"
            print(f"| {passes:g} | {sides} | {rule} | {seed} | {m['spearman']:.4f} | {m['median_rel_err']:.4f} "
                  f"| {m['coverage95']:.3f} | {m['worst_block_coverage95']:.3f} |", flush=True)
    finally:
        collect_sketches.RECIPE, SideCodec.statistics = today, statistics


if __name__ == "__main__":
    main()
