"""Calibration of the conflict test (``res.head_conflicts()``) on planted data, and what the variance's split
halves buy.

A tiny random Llama with GQA (the test suite's), collections of ``--samples`` + ``--samples`` samples of one
distribution, exact gradients. Task B's per-sample gradients are multiplied by planted factors: random signs
(the true T is 0), 0.5 (B agrees with A at half the loss scale), −1 (B is A's distribution with its loss
negated), and −1 on 75% of B's samples. Per collection: the fraction of null p-values under 0.05 (averaged over
``--draws`` draws), the fraction of null draws with any block flagged, and the fraction flagged under each
planted alternative. ``--plain`` adds the null fraction with the plain variance ``Var_i(a_i)/n_A +
Var_j(b_j)/n_B`` instead of the split halves (its second term counts tr(WΣ_AWΣ_B)/(n_A n_B) twice).

    python benchmarks/conflict_calibration.py --samples 64 --draws 40 --collections 3 --plain
    python benchmarks/conflict_calibration.py --samples 8 --draws 2 --collections 1        # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the test suite's tiny models

import numpy as np
import torch
from scipy.stats import t as student_t

import sketchfisher as sf
from sketchfisher.interference.conflicts import block_evidence
from tiny_models import generic_loss, make_batches, make_model, planted


def plain_p_values(res) -> np.ndarray:
    """One-sided p-values with the plain variance Var_i(a_i)/n_A + Var_j(b_j)/n_B (Welch degrees of freedom)."""
    out = []
    for layer in range(res.layout.num_layers):
        for block in res.layout.block_names:
            ev = block_evidence(res.context, res.layout, layer, block)
            a, b = ev["a"], ev["b"]
            va, vb = a.var(0) / a.shape[0], b.var(0) / b.shape[0]
            dof = (va + vb) ** 2 / (va ** 2 / (a.shape[0] - 1) + vb ** 2 / (b.shape[0] - 1))
            out += list(student_t.cdf((ev["T"] / (va + vb).sqrt()).numpy(), dof.numpy()))
    return np.array(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="samples per task")
    p.add_argument("--draws", type=int, default=40, help="null draws per collection")
    p.add_argument("--collections", type=int, default=3)
    p.add_argument("--plain", action="store_true", help="also the null fraction with the plain variance")
    args = p.parse_args()
    model = make_model("llama_gqa")
    print(f"tiny Llama (GQA), {args.samples} + {args.samples} samples of one distribution, {args.draws} null draws")
    print("| collection | null: p < 0.05 | null: draws with a flag | " + ("null, plain variance: p < 0.05 | "
          if args.plain else "") + "B × 0.5: flagged | B negated: flagged | 75% negated: flagged |")
    print("| --- | --- | --- | " + ("--- | " if args.plain else "") + "--- | --- | --- |")
    for c in range(args.collections):
        res = sf.analyze(model, generic_loss, make_batches(args.samples, 16, seed=10 + c),
                         make_batches(args.samples, 16, seed=20 + c), codec=sf.Exact())
        n, g = res.n_b, torch.Generator().manual_seed(c)
        fractions, flagged, plain = [], [], []
        for _ in range(args.draws):
            draw = planted(res, torch.randint(0, 2, (n,), generator=g).double() * 2 - 1)
            table = draw.head_conflicts()
            fractions.append(float((table.p_value < 0.05).mean()))
            flagged.append(bool(table.conflict.any()))
            if args.plain:
                plain.append(float((plain_p_values(draw) < 0.05).mean()))
        alternatives = [planted(res, f).head_conflicts().conflict.mean() for f in (
            torch.full((n,), 0.5, dtype=torch.float64), -torch.ones(n, dtype=torch.float64),
            torch.where(torch.arange(n) < 3 * n // 4, -1.0, 1.0).double())]
        print(f"| {c} | {np.mean(fractions):.3f} | {np.mean(flagged):.3f} | "
              + (f"{np.mean(plain):.3f} | " if args.plain else "") + " | ".join(f"{x:.3f}" for x in alternatives) + " |")


if __name__ == "__main__":
    main()
