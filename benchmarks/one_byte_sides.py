"""What one-byte balances and centres would cost in accuracy, measured before they are built.

Where the statistics are fp32 (the GPU setting) a collection keeps the balance ``w_b`` and the centres ``x̄'`` and
``ȳ'`` in bf16: any values keep the scores exact, as long as every use reads the same ones, and ``w_a`` is formed
from the rounded balance so that the denominator stays exact. This script rounds them further, to fp8 (e4m3: 3
mantissa bits) with a power-of-two scale per head block, by wrapping the library's preparation (an emulation: the
values are rounded, their storage is not), and prints the accuracy against the exact codec with and without it,
in both pass orders, for a few sketch seeds:

    python benchmarks/one_byte_sides.py                                    # MiniLM, paper
    python benchmarks/one_byte_sides.py --variant signed
    python benchmarks/one_byte_sides.py --model gpt2 --train-steps 36     # a briefly trained GPT-2-wide LM
    python benchmarks/one_byte_sides.py --sides bf16 --balance abs,fisher --seeds 1

``--balance fisher`` swaps the balance √mean|g| for (Î+ε+λ)^¼ (the same for Gaussian gradients), another cut the
conflict test beside heads + MLP units would need: pass 1 would then keep no Σ|g| of task A's. Variants that
already balance by the Fisher (``signed``) take no ``--balance``.
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
from sketchfisher.compress import sketch_scores
from sketchfisher.metric.sides import shift

from accuracy_vs_memory import MODELS, metrics, model_and_tasks

ROUND = {"on": False}


def one_byte(v: torch.Tensor) -> torch.Tensor:
    """``v [H_b, S]`` rounded to fp8 e4m3 with a power-of-two scale per row (head block), in v's dtype."""
    if not ROUND["on"]:
        return v
    d = v.double()
    top = d.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    scale = torch.exp2(torch.ceil(torch.log2(top / 448)))  # the largest magnitude lands in e4m3's range
    return ((d / scale).to(torch.float8_e4m3fn).double() * scale).to(v.dtype)


_prepare, _with_j = sketch_scores.prepare_block, sketch_scores.with_j_centre


def prepare_block(fisher, fisher_a, mean_i_a, mean_j_b, abs_a, abs_b, n_a, n_b, cfg, codec, **kw):
    """The library's preparation, its balance and centres then rounded to one byte; ``w_a`` from the rounded
    balance (the product of the weights stays the denominator), ``e`` from the rounded centres."""
    prep = _prepare(fisher, fisher_a, mean_i_a, mean_j_b, abs_a, abs_b, n_a, n_b, cfg, codec, **kw)
    if prep.w_b is None or not ROUND["on"]:
        return prep
    f = fisher.double()
    w_b = one_byte(prep.w_b)
    ratio = prep.w_b.double() / w_b.double()  # x̄' scales with the balance 1/w_b, ȳ' with w_b
    x_bar = one_byte((prep.x_bar.double() * ratio).to(prep.x_bar.dtype))
    w_a = None if prep.w_a is None else sketch_scores.a_weight(f + shift(f, cfg), w_b, prep.w_a.dtype)
    y_bar = None if prep.y_bar is None else one_byte((prep.y_bar.double() / ratio).to(prep.y_bar.dtype))
    e = prep.e if y_bar is None else (x_bar.double() * y_bar.double()).sum(-1)
    return replace(prep, w_a=w_a, w_b=w_b, x_bar=x_bar, y_bar=y_bar, e=e)


def with_j_centre(prep, mean_j_b):
    out = _with_j(prep, mean_j_b)
    if not ROUND["on"]:
        return out
    y_bar = one_byte(out.y_bar)
    return replace(out, y_bar=y_bar, e=(out.x_bar.double() * y_bar.double()).sum(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm", choices=MODELS)
    p.add_argument("--train-steps", type=int, default=0)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--variant", default="paper", choices=list(sf.VARIANTS))
    p.add_argument("--seeds", type=int, default=2, help="sketch seeds per setting")
    p.add_argument("--k", type=int, default=None, help="the sketch's k (default: the default sketch's)")
    p.add_argument("--sides", default="bf16,fp8", help="balance and centres: bf16 (the library's), fp8 (emulated)")
    p.add_argument("--balance", default="abs", help="abs (the library's √mean|g|), fisher (emulated (Î+ε+λ)^¼)")
    args = p.parse_args()
    balances = args.balance.split(",")
    if "fisher" in balances and sketch_scores.balances_by_fisher(sf.ScoreConfig(variant=args.variant)):
        p.error(f"the {args.variant} variant balances by the Fisher already")
    for module in (sketch_scores, collect_sketches):  # (collect.sketches imported the names)
        module.prepare_block, module.with_j_centre = prepare_block, with_j_centre
    model, loss, ta, tb = model_and_tasks(args.model, args.samples, args.layers, args.train_steps)
    exact = sf.analyze(model, loss, ta, tb, codec=sf.Factors(), variant=args.variant)
    codec = sf.Sketch() if args.k is None else sf.Sketch(k=args.k)
    print(f"# {args.model}{f' trained {args.train_steps} steps' if args.train_steps else ''}, {args.variant}, "
          f"{exact.n_a}x{exact.n_b} samples, {codec!r}, fp32 statistics; torch {torch.__version__}")
    print("| passes | balance and centres | seed | Spearman | median rel err | 95% coverage | worst head block |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    library = (sketch_scores.balances_by_fisher, sketch_scores.fisher_balance)
    try:
        for passes, balance, sides, seed in itertools.product((1.5, 2), balances, args.sides.split(","),
                                                             range(args.seeds)):
            ROUND["on"] = sides == "fp8"
            by_fisher = balance == "fisher"
            for module in (sketch_scores, collect_sketches):  # (the codec's statistics and the preparation ask)
                module.balances_by_fisher = (lambda cfg: True) if by_fisher else library[0]
            sketch_scores.fisher_balance = (lambda denom: denom.sqrt().sqrt()) if by_fisher else library[1]
            res = sf.analyze(model, loss, ta, tb, codec=replace(codec, seed=seed), variant=args.variant,
                             passes=passes, stats_dtype=torch.float32)
            m = metrics(exact.scores, res.scores, res.stderr)
            label = ("fp8, scale per head block" if ROUND["on"] else "bf16") + (", (Î+ε+λ)^¼ balance" if by_fisher else "")
            print(f"| {passes:g} | {label} | {seed} | {m['spearman']:.4f} | {m['median_rel_err']:.4f} "
                  f"| {m['coverage95']:.3f} | {m['worst_block_coverage95']:.3f} |", flush=True)
    finally:
        ROUND["on"] = False
        for module in (sketch_scores, collect_sketches):
            module.balances_by_fisher = library[0]
        sketch_scores.fisher_balance = library[1]



if __name__ == "__main__":
    main()
