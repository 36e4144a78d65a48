"""``sf.analyze``: Stage 1 collection and Stage 6 scoring in one call."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .capture.oracle import LossFn
from .collect import collect
from .compress import Exact, Sketch
from .interference import InterferenceResult, ScoreConfig, assemble, exact_scorer
from .sketching import collect_sketches
from .layout import Layout, layout_for

logger = logging.getLogger(__name__)


def analyze(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any], *,
            codec: Any = None, variant: str = "paper", normalizer: str = "a", eps: float = 1e-10,
            ridge_abs: float = 0.0, ridge_rel: float = 0.0, layout: Optional[Layout] = None,
            modules: str = "attention", progress: bool = False) -> InterferenceResult:
    """Head-resolved interference between every task-A sample i and task-B sample j.

    ``loss_fn(model, batch)`` returns one loss per sample (``[B]``); ``task_a``/``task_b`` iterate
    over batches. ``codec`` is ``sf.Exact()`` (default; autograd oracle), ``sf.Factors(rank=None)``
    (batched hooks) or ``sf.Sketch(k, kind, seed, ...)`` (two passes: the tasks must be re-iterable;
    ``res.stderr`` then holds each score's standard error). ``modules="all"`` also collects Fisher statistics of every linear weight.
    Returns scores ``[nA, nB, L, H, 4]`` (SEMANTICS §4).
    """
    codec = Exact() if codec is None else codec
    cfg = ScoreConfig(variant=variant, normalizer=normalizer, eps=eps, ridge_abs=ridge_abs, ridge_rel=ridge_rel)
    layout = layout_for(model) if layout is None else layout
    rep_a, stats_a = collect(model, loss_fn, task_a, layout, codec, modules=modules, desc="task A",
                             show_progress=progress)
    rep_b, stats_b = collect(model, loss_fn, task_b, layout, codec, modules=modules, desc="task B",
                             show_progress=progress)
    if isinstance(codec, Sketch):
        scorer, _, _ = collect_sketches(model, loss_fn, task_a, task_b, layout, codec, cfg, stats_a, stats_b,
                                        show_progress=progress)
    else:
        stats = stats_a.merge(stats_b) if normalizer == "pooled" else stats_a
        scorer = exact_scorer(lambda layer, block: rep_a.block(layout, layer, block),
                              lambda layer, block: rep_b.block(layout, layer, block),
                              lambda layer, block: stats.fisher_block(layout, layer, block), stats_a.count, cfg)
    scores, stderr = assemble(layout, stats_a.count, stats_b.count, scorer, cfg.dtype)
    config = {"codec": codec.to_dict(), "variant": variant, "normalizer": normalizer, "eps": eps,
              "ridge_abs": ridge_abs, "ridge_rel": ridge_rel, "layout": layout.model_type}
    return InterferenceResult(scores=scores, stderr=stderr, layout=layout, config=config)
