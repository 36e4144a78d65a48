"""``sf.analyze``: Stage 1 collection and Stage 6 scoring in one call."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

from torch import nn

from .capture.oracle import LossFn
from .collect import collect
from .compress import Exact, Sketch
from .errors import InputError
from .fisher import FisherStats
from .interference import InterferenceResult, ScoreConfig
from .interference.engine import DEFAULT_MAX_BYTES, ExactBlock
from .layout import Layout, layout_for
from .sketching import collect_sketches

logger = logging.getLogger(__name__)


def analyze(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any], *,
            codec: Any = None, variant: str = "paper", normalizer: str = "a", eps: float = 1e-10,
            ridge_abs: float = 0.0, ridge_rel: float = 0.0, layout: Optional[Layout] = None,
            modules: str = "attention", max_bytes: int = DEFAULT_MAX_BYTES, dtype: Any = None,
            store: Optional[str] = None, stats_dtype: Any = None, progress: bool = False) -> InterferenceResult:
    """Head-resolved interference between every task-A sample i and task-B sample j.

    ``loss_fn(model, batch)`` returns one loss per sample (``[B]``); ``task_a``/``task_b`` iterate
    over batches. ``codec`` is ``sf.Exact()`` (default; autograd oracle), ``sf.Factors(rank=None)``
    (batched hooks) or ``sf.Sketch(k, kind, seed, ...)`` (two passes: the tasks must be re-iterable;
    ``res.stderr`` then holds each score's standard error). ``modules="all"`` also collects Fisher
    statistics of every linear weight. ``max_bytes`` bounds the working set of one Stage 6 chunk;
    ``dtype`` (``torch.float32`` by default, or ``torch.float64``) is the Stage 6 arithmetic.
    ``store=path`` (sketches only) streams the per-sample sketches to a resumable store directory and
    scores from it; rerunning the same call after a crash finishes the collection. ``stats_dtype``
    (fp64 by default) is the precision of the pass-1 Fisher statistics. Returns an
    :class:`InterferenceResult` whose ``scores`` are ``[nA, nB, L, H, 4]`` (SEMANTICS §4).
    """
    codec = Exact() if codec is None else codec
    cfg = ScoreConfig(variant=variant, normalizer=normalizer, eps=eps, ridge_abs=ridge_abs, ridge_rel=ridge_rel,
                      **({} if dtype is None else {"dtype": dtype}))
    layout = layout_for(model) if layout is None else layout
    if store is not None:
        from .store import collect_to_store, open_store

        if modules != "attention":
            raise InputError("stores collect the attention layout only; use modules='attention' with store=")
        collect_to_store(store, model, loss_fn, task_a, task_b, layout, codec, cfg, show_progress=progress,
                         **({} if stats_dtype is None else {"stats_dtype": stats_dtype}))
        return open_store(store).result(max_bytes=max_bytes)
    kw = {} if stats_dtype is None else {"stats_dtype": stats_dtype}
    rep_a, stats_a = collect(model, loss_fn, task_a, layout, codec, modules=modules, desc="task A",
                             show_progress=progress, **kw)
    rep_b, stats_b = collect(model, loss_fn, task_b, layout, codec, modules=modules, desc="task B",
                             show_progress=progress, **kw)
    context = {"cfg": cfg, "codec": codec, "stats_a": stats_a, "stats_b": stats_b}
    if isinstance(codec, Sketch):
        provider, side_a, side_b = collect_sketches(model, loss_fn, task_a, task_b, layout, codec, cfg, stats_a,
                                                    stats_b, show_progress=progress)
        context.update(side_a=side_a, side_b=side_b)
    else:
        provider = exact_provider(layout, rep_a, rep_b, stats_a, stats_b, cfg)
        context.update(rep_a=rep_a, rep_b=rep_b)
    config = {"codec": codec.to_dict(), "variant": variant, "normalizer": normalizer, "eps": eps,
              "ridge_abs": ridge_abs, "ridge_rel": ridge_rel, "layout": layout.model_type}
    return InterferenceResult(layout=layout, n_a=stats_a.count, n_b=stats_b.count, provider=provider, config=config,
                              max_bytes=max_bytes, dtype=cfg.dtype, context=context)


def exact_provider(layout: Layout, rep_a: Any, rep_b: Any, stats_a: FisherStats, stats_b: FisherStats,
                   cfg: ScoreConfig):
    """Provider of exact block scores from two exact representations (Exact or Factors)."""
    stats = stats_a.merge(stats_b) if cfg.normalizer == "pooled" else stats_a

    def provider(layer: int, block: str) -> Optional[ExactBlock]:
        ga, gb = rep_a.block(layout, layer, block), rep_b.block(layout, layer, block)
        fisher = stats.fisher_block(layout, layer, block)
        if ga is None or gb is None or fisher is None:
            return None
        return ExactBlock.build(ga, gb, fisher, stats_a.count, cfg)
    return provider
