"""Does the conflict map predict? For every head block, a small diagonally Fisher-preconditioned step on task A
restricted to that block, θ_S ← θ_S − η (Î + ε)⁻¹ ḡ_A, and the change of task B's mean loss it causes, against
the first-order prediction −η T of ``res.head_conflicts()``.

Real trained MiniLM (the demo's model and tasks, masked-token loss, fp64), exact per-sample gradients. Each
block's η makes its largest weight change ``--scale`` (so every block's step is small); the table reports the
Spearman correlation of measured and predicted changes over blocks, the slope of measured on predicted (1 is
exact first order) and the fraction of blocks whose sign is predicted, at each scale.

    python benchmarks/conflict_predicts.py --samples 24 --scales 1e-4,1e-3,1e-2
    python benchmarks/conflict_predicts.py --samples 4 --scales 1e-3 --blocks 8     # the test suite's smoke run
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("SKETCHFISHER_PROGRESS", "0")

import numpy as np
import torch
from scipy.stats import spearmanr

import sketchfisher as sf
from sketchfisher.demo import load_minilm, load_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=24, help="samples per task")
    p.add_argument("--scales", default="1e-4,1e-3,1e-2", help="largest weight change of a block's step")
    p.add_argument("--blocks", type=int, default=None, help="only the first N distinct head blocks")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok = load_minilm()
    model = model.double()
    task_a = sf.tasks.from_texts(load_task("math", args.samples), tok, loss="mlm", batch_size=8)
    task_b = sf.tasks.from_texts(load_task("code", args.samples), tok, loss="mlm", batch_size=8)
    loss = sf.tasks.masked_token_loss
    res = sf.analyze(model, loss, task_a, task_b, codec=sf.Exact(), dtype=torch.float64)
    table = res.head_conflicts()
    if args.blocks:
        table = table.head(args.blocks)
    ctx, layout = res.context, res.layout

    def loss_b() -> float:
        with torch.no_grad():
            return float(torch.cat([loss(model, b) for b in task_b]).double().mean())

    base = loss_b()
    rows = []
    for scale in (float(x) for x in args.scales.split(",")):
        measured, predicted = [], []
        for row in table.to_dict("records"):
            hb = layout.head_block(row["layer"], row["block"], row["head"])
            param = model.get_parameter(hb.param_name)
            direction = ctx.rep_a.full(hb.param_name).double().mean(0) / (ctx.stats_a.fisher(hb.param_name).double()
                                                                            + res.cfg.eps)
            mask = torch.zeros_like(param, dtype=torch.bool)
            hb.select(mask).fill_(True)
            step = torch.where(mask, direction, torch.zeros_like(direction))
            eta = scale / max(float(step.abs().max()), 1e-300)
            with torch.no_grad():
                param -= eta * step
                measured.append(loss_b() - base)
                param += eta * step
            predicted.append(-eta * row["T"])
        m, q = np.array(measured), np.array(predicted)
        slope = float((m * q).sum() / (q * q).sum())
        rows.append((scale, spearmanr(m, q).statistic, slope, float((np.sign(m) == np.sign(q)).mean())))
    print(f"MiniLM, math (A) vs code (B), {res.n_a} + {res.n_b} samples, {len(table)} head blocks, fp64; "
          f"{time.perf_counter() - start:.0f} s")
    print("| largest weight change | Spearman(measured ΔL_B, −ηT) | slope | sign agreement |")
    print("| --- | --- | --- | --- |")
    for scale, rho, slope, sign in rows:
        print(f"| {scale:g} | {rho:.4f} | {slope:.4f} | {sign:.3f} |")


if __name__ == "__main__":
    main()
