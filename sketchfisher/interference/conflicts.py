"""The conflict test: do tasks A and B pull a unit block's weights in opposite directions?

For a unit block with entries S (one head's Q, K, V or O block; an MLP channel group's block),

    T = Σ_S ḡ_A ḡ_B / (Î + ε + λ)

is the mean ``signed`` score over all (i, j) pairs and, to first order, minus the change of task B's mean
loss per unit step of a diagonally Fisher-preconditioned update on task A through that block. **Conflict
is T < 0**: training on A through this block raises B's loss. The test is one-sided, H0: T ≥ 0.

T is a product of two independent sample means, so its standard error comes from the samples, not from any
sketch. With W = 1 / (Î + ε + λ) and the per-sample *conflict scalars* ``a_i = g_i · W ḡ_B`` (task A) and
``b_j = ḡ_A · W g_j`` (task B), whose means are T,

    Var(T̂) = E_B[Var_A(T̂ | B)] + Var_B(E_A[T̂ | B])
           ≈ Var_i(a_i) / n_A  +  Cov_j(b_j', b_j'') / n_B,

where ``b'_j`` and ``b''_j`` use the mean gradients of two fixed halves of task A (its samples at even and
odd positions). The first term is unbiased given B. The second estimates ``μ_A·WΣ_BW·μ_A / n_B`` without
bias because the two halves' noises are independent; the plain ``Var_j(b_j) / n_B`` would add the
second-order term ``tr(WΣ_AWΣ_B) / (n_A n_B)`` a second time, a conservative bias that grows where the task
means are weak against their noise (``benchmarks/conflict_calibration.py --plain`` compares the two; on its
tiny Llama both lie within the spread between collections). Exact codecs compute the scalars from the stored gradients; sketch codecs record
them exactly in their side passes, once the other task's means are known
(:func:`sketchfisher.collect.plan.needed_statistics`), so the test is the same for every codec, in memory
and from a store. The p-value is Student's t with
Welch–Satterthwaite degrees of freedom; q-values are Benjamini–Hochberg over the distinct unit blocks (a
K/V block shared by several query heads is one hypothesis). ``alignment`` is the cosine
T / (‖ḡ_A‖_W ‖ḡ_B‖_W), with T's confidence interval divided by the same norms.

What alignment means: near −1 the tasks' mean updates oppose each other on the block, near +1 they agree.
Near 0 it means either "orthogonal" or "too few samples": each task mean carries noise of size
σ/√n, and two random halves of one task give alignment well below 1 (about 0.6 on MiniLM with 32 samples
each). Read it with its interval and q-value, never alone.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import false_discovery_control
from scipy.stats import t as student_t

from ..errors import InputError
from ..metric.sides import shift

COLUMNS = ["layer", "head", "block", "alignment", "alignment_low", "alignment_high", "T", "stderr", "p_value",
           "q_value", "conflict", "shared_by"]


def block_evidence(ctx: Any, layout: Any, layer: int, block: str) -> Optional[dict[str, torch.Tensor]]:
    """``{"T", "aa", "bb": [H_b]; "a": [nA, H_b]; "b", "b_even", "b_odd": [nB, H_b]}`` (fp64) of one (layer,
    block); None when the block was not collected."""
    if ctx.exact is not None:
        ga, gb = ctx.rep_a.block(layout, layer, block), ctx.rep_b.block(layout, layer, block)
        stats = ctx.stats_a if ctx.cfg.normalizer == "loo" else ctx.normalizer_stats()
        fisher = stats.fisher_block(layout, layer, block)
        if ga is None or gb is None or fisher is None:
            return None
        fisher = fisher.double()
        w = 1.0 / (fisher + shift(fisher, ctx.cfg).to(fisher))
        ga, gb = ga.double().to(w.device), gb.double().to(w.device)
        ma, mb = ga.mean(0), gb.mean(0)
        return {"T": (ma * mb * w).sum(-1), "aa": (ma * ma * w).sum(-1), "bb": (mb * mb * w).sum(-1),
                "a": (ga * (mb * w)).sum(-1), "b": (gb * (ma * w)).sum(-1),
                "b_even": (gb * (ga[0::2].mean(0) * w)).sum(-1), "b_odd": (gb * (ga[1::2].mean(0) * w)).sum(-1)}
    src, key = ctx.source, (layer, block)
    moments = None if src.moments is None else src.moments.get(key)
    a, b = src.side_a.conflict(key), src.side_b.conflict(key)
    if moments is None and a is None and b is None and src.e.get(key) is None:
        return None  # not collected (a frozen block)
    if moments is None or a is None or b is None or not {"ab", "aa", "bb", "n_even"} <= set(moments):
        raise InputError("this collection did not record the conflict test's per-sample scalars: collect with "
                         "conflicts=True (the default; stores written before format 5 have none: collect again)")
    n_a, n_even = ctx.counts[0], float(moments["n_even"])
    a, b = a.double().cpu(), b.double().cpu()
    b_odd = (n_a * b[..., 0] - n_even * b[..., 1]) / (n_a - n_even)  # task A's odd half from its whole and even half
    return {"T": moments["ab"].double().cpu(), "aa": moments["aa"].double().cpu(), "bb": moments["bb"].double().cpu(),
            "a": a[..., 0], "b": b[..., 0], "b_even": b[..., 1], "b_odd": b_odd}


def conflict_table(result: Any, level: float = 0.05, confidence: float = 0.95) -> pd.DataFrame:
    """The conflict test of every unit block of ``result``'s family: one row per distinct unit block (a K/V
    block shared by a group of query heads is listed under the group's first query head; ``shared_by``
    counts the group), most conflicting first. ``conflict`` is ``q_value <= level``."""
    if not (0 < level < 1) or not (0 < confidence < 1):
        raise InputError(f"level and confidence must be in (0, 1), got {level!r} and {confidence!r}")
    ctx, layout = result.context, result.layout
    if ctx is None:
        raise InputError("this result carries no collection context (it was built from a bare score provider)")
    n_a, n_b = ctx.counts
    if n_a < 4 or n_b < 2:
        raise InputError(f"the conflict test needs at least 4 task-A and 2 task-B samples, have {n_a} and {n_b}")
    rows, tested = [], False
    for layer in range(layout.num_layers):
        for block in layout.block_names:
            if (layer, block) not in layout.blocks:
                continue
            ev = block_evidence(ctx, layout, layer, block)
            index = layout.head_index(block).tolist()
            first = [index.index(d) for d in range(max(index) + 1)]
            shared = [index.count(d) for d in range(max(index) + 1)]
            if ev is None:  # not collected (a frozen block): its rows are kept, every number missing
                rows += [{"layer": layer, "head": h, "block": block, "shared_by": n, **{c: float("nan") for c in (
                    "alignment", "alignment_low", "alignment_high", "T", "stderr", "p_value")}}
                         for h, n in zip(first, shared)]
                continue
            tested = True
            rows += _rows(ev, layer, block, first, shared, confidence)
    if not tested:
        raise InputError("no collected blocks to test")
    df = pd.DataFrame(rows)
    ok = df["p_value"].notna().to_numpy()
    q = np.full(len(df), np.nan)
    q[ok] = false_discovery_control(df["p_value"].to_numpy()[ok], method="bh")
    df["q_value"] = q
    df["conflict"] = df["q_value"] <= level  # (NaN: False)
    df = df.sort_values(["q_value", "alignment", "layer", "head"], na_position="last").reset_index(drop=True)
    df = df[COLUMNS].rename(columns={"head": layout.unit_column})
    df.attrs.update(level=level, confidence=confidence, samples=(n_a, n_b),
                    geometry={"layers": layout.num_layers, "units": layout.num_heads, "unit": layout.unit_column,
                              "blocks": list(layout.block_names)},
                    statistic="T = Σ_S ḡ_A ḡ_B / (Î + ε + λ); H0: T ≥ 0 (one-sided); conflict: q ≤ level")
    return df


def _rows(ev: dict, layer: int, block: str, first: list[int], shared: list[int], confidence: float) -> list[dict]:
    a, b = ev["a"], ev["b"]
    n_a, n_b = a.shape[0], b.shape[0]
    even, odd = ev["b_even"] - ev["b_even"].mean(0), ev["b_odd"] - ev["b_odd"].mean(0)
    va, vb = a.var(0) / n_a, ((even * odd).sum(0) / (n_b - 1)).clamp_min(0) / n_b
    se = (va + vb).sqrt()
    # Welch–Satterthwaite degrees of freedom of the two-sample variance
    dof = (va + vb).square() / (va.square() / (n_a - 1) + vb.square() / (n_b - 1)).clamp_min(1e-300)
    host = lambda t: t.detach().double().cpu().numpy()  # noqa: E731  (exact codecs may leave them on a GPU)
    T, norm = host(ev["T"]), host((ev["aa"] * ev["bb"]).sqrt())
    se, dof = host(se), np.maximum(host(dof), 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # (one vectorised call per block, not one per head)
        p = np.where(se > 0, student_t.cdf(T / np.where(se > 0, se, 1.0), dof), np.where(T < 0, 0.0, 1.0))
        half = student_t.ppf(0.5 + confidence / 2, dof) * se
        cos = lambda x: np.where(norm > 0, np.clip(x / np.where(norm > 0, norm, 1.0), -1.0, 1.0), np.nan)  # noqa: E731
        align, low, high = cos(T), cos(T - half), cos(T + half)
    out = []
    for h in range(T.shape[0]):  # no sampling variation at all (se = 0): the sign of T decides p
        out.append({"layer": layer, "head": first[h], "block": block, "alignment": float(align[h]),
                    "alignment_low": float(low[h]), "alignment_high": float(high[h]), "T": float(T[h]),
                    "stderr": float(se[h]), "p_value": float(p[h]), "shared_by": shared[h]})
    return out


def describe(row: Any, unit: str = "head") -> str:
    """One flagged block in words: ``layer 12 head 5 V: alignment −0.41 [−0.55, −0.27], q = 0.003``."""
    return (f"layer {row['layer']} {unit} {row[unit]} {row['block']}: alignment {row['alignment']:+.2f} "
            f"[{row['alignment_low']:+.2f}, {row['alignment_high']:+.2f}], q = {row['q_value']:.2g}")


__all__ = ["COLUMNS", "block_evidence", "conflict_table", "describe"]
