"""Sketch-then-verify: re-score the best sketched candidates exactly.

Exact block gradients come from the result's own exact representation (``sf.Exact``/``sf.Factors``)
or, for sketched results, from recomputing only the candidate samples' gradient factors with the
model, loss and tasks (one more pass that keeps just those samples).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import pandas as pd
import torch
from torch import nn

from ..collect import factor_pass, trainable_weights
from ..compress import FactorContributions
from ..errors import InputError
from ..layout import Layout
from ..layout.adapters import base_model
from ..metric import x_side, y_side


def factor_subset(model: nn.Module, loss_fn: Any, batches: Iterable[Any], layout: Layout, wanted: set[int]):
    """Factors of the samples ``wanted`` (iteration order) only, and their positions in the subset."""
    rep, positions, seen = FactorContributions(), {}, 0
    for _, bf in factor_pass(model, loss_fn, batches, trainable_weights(model, layout)):
        sel = [b for b in range(bf.batch_size) if seen + b in wanted]
        if sel:
            idx = torch.tensor(sel)
            rep.append({m: a[idx] for m, a in bf.A.items()}, {m: d[idx] for m, d in bf.D.items()}, bf.lengths[idx])
            start = len(positions)
            positions.update({seen + b: start + n for n, b in enumerate(sel)})
        seen += bf.batch_size
    missing = wanted - set(positions)
    if missing:
        raise InputError(f"samples {sorted(missing)[:5]} were not produced by the task (it yielded {seen})")
    return rep, positions


def _sources(result: Any, cands: pd.DataFrame, model: Optional[nn.Module], loss_fn: Any, task_a: Any, task_b: Any):
    ctx = result.context
    if ctx is not None and ctx.exact is not None:
        identity = lambda n: {i: i for i in range(n)}  # noqa: E731
        return ctx.rep_a, identity(result.n_a), ctx.rep_b, identity(result.n_b)
    if model is None or loss_fn is None or task_a is None or task_b is None:
        raise InputError("this result holds no exact representation; pass model=, loss_fn=, task_a= and task_b= "
                         "(the same batches, in the same order) so the candidates' gradients can be recomputed")
    model = base_model(model)  # (a PEFT model: its base model, adapters injected, as collected)
    rep_a, pos_a = factor_subset(model, loss_fn, task_a, result.layout, set(cands["sample_i"].tolist()))
    rep_b, pos_b = factor_subset(model, loss_fn, task_b, result.layout, set(cands["sample_j"].tolist()))
    return rep_a, pos_a, rep_b, pos_b


def exact_candidate_scores(result: Any, cands: pd.DataFrame, **sources: Any) -> torch.Tensor:
    """Exact scores of the rows of ``cands`` (block, layer, head, sample_i, sample_j)."""
    layout, ctx = result.layout, result.context
    if ctx is None:
        raise InputError("this result carries no statistics (it was built from a bare score provider)")
    cfg, stats_a = ctx.cfg, ctx.stats_a
    stats = ctx.normalizer_stats()
    rep_a, pos_a, rep_b, pos_b = _sources(result, cands, **sources)
    out = torch.full((len(cands),), float("nan"), dtype=torch.float64)
    for (layer, block), group in cands.groupby(["layer", "block"], sort=False):
        ga, gb = rep_a.block(layout, layer, block), rep_b.block(layout, layer, block)
        fisher = stats.fisher_block(layout, layer, block)
        if ga is None or gb is None or fisher is None:
            continue
        ia = torch.tensor([pos_a[i] for i in group["sample_i"]])
        jb = torch.tensor([pos_b[j] for j in group["sample_j"]])
        hb = layout.head_index(block)[torch.tensor(group[layout.unit_column].to_numpy())]
        x = x_side(ga[ia, hb], fisher[hb], stats_a.count, cfg)
        y = y_side(gb[jb, hb], cfg)
        out[torch.tensor(group.index.to_numpy())] = (x * y).sum(-1).double()
    return out


def verify_top(result: Any, k: int = 100, budget: int = 1000, *, model: Optional[nn.Module] = None,
               loss_fn: Any = None, task_a: Any = None, task_b: Any = None) -> pd.DataFrame:
    """Re-score the ``budget`` best sketched candidates exactly; return them ranked by exact score.

    Columns: the candidate's block, layer, head, samples, sketched score and stderr, ``sketch_rank``,
    ``exact_score``, ``exact_rank`` (among the candidates) and ``held`` (in the top ``k`` by both).
    ``df.attrs["held_fraction"]`` is the fraction of the sketched top ``k`` that held. The first ``k``
    rows are the exact top ``k`` among the candidates.
    """
    if not (isinstance(k, int) and isinstance(budget, int) and 1 <= k <= budget):
        raise InputError(f"verify_top needs integers 1 <= k <= budget, got k={k!r}, budget={budget!r}")
    cands = result.top_conflicts(budget).reset_index(drop=True)
    cands["sketch_rank"] = range(len(cands))
    exact = exact_candidate_scores(result, cands, model=model, loss_fn=loss_fn, task_a=task_a, task_b=task_b)
    cands["exact_score"] = exact.numpy()
    key = result.cfg.spec.conflict_key(exact)
    order = torch.argsort(key.nan_to_num(nan=-float("inf")), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    cands["exact_rank"] = rank.numpy()
    cands["held"] = (cands["sketch_rank"] < k) & (cands["exact_rank"] < k)
    out = cands.sort_values("exact_rank").reset_index(drop=True)
    out.attrs["held_fraction"] = float(cands["held"].sum()) / min(k, len(cands))
    return out
