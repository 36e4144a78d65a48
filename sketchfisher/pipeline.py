"""``sf.analyze``: Stage 1 collection and Stage 6 scoring in one call."""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .capture import per_sample_gradients
from .capture.oracle import LossFn
from .compress import Exact, ExactContributions
from .errors import InputError
from .fisher import TaskStats
from .interference import InterferenceResult, ScoreConfig, score_tensor
from .layout import Layout, layout_for
from .progress import progress

logger = logging.getLogger(__name__)


def collect_exact(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, *,
                  desc: str = "collect", show_progress: bool = False) -> tuple[ExactContributions, TaskStats]:
    """Per-sample gradients (oracle) of the layout's trainable parameters, and their Fisher statistics.

    Parameters with ``requires_grad=False`` are not collected; their scores come out NaN.
    """
    named = dict(model.named_parameters())
    names = [n for n in layout.params if named[n].requires_grad]
    skipped = [n for n in layout.params if n not in names]
    if skipped:
        logger.info("not collecting %d frozen parameters (scores NaN): %s", len(skipped), skipped[:3])
    if not names:
        raise InputError("every attention parameter of the layout is frozen (requires_grad=False); nothing to score")
    reps, stats = ExactContributions(), TaskStats()
    for grads in progress(per_sample_gradients(model, loss_fn, batches, names), desc=desc, enabled=show_progress):
        reps.append(grads)
        stats.update(grads)
    if stats.count == 0:
        raise InputError(f"{desc}: the task yielded no samples")
    return reps, stats


def analyze(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any], *,
            codec: Any = None, variant: str = "paper", normalizer: str = "a", eps: float = 1e-10,
            ridge_abs: float = 0.0, ridge_rel: float = 0.0, layout: Optional[Layout] = None,
            progress: bool = False) -> InterferenceResult:
    """Head-resolved interference between every task-A sample i and task-B sample j.

    ``loss_fn(model, batch)`` returns one loss per sample (``[B]``); ``task_a``/``task_b`` iterate
    over batches. Returns scores ``[nA, nB, L, H, 4]`` (SEMANTICS §4).
    """
    codec = Exact() if codec is None else codec
    if not isinstance(codec, Exact):
        raise InputError(f"codec must be one of: sf.Exact(); got {type(codec).__name__}")
    cfg = ScoreConfig(variant=variant, normalizer=normalizer, eps=eps, ridge_abs=ridge_abs, ridge_rel=ridge_rel)
    layout = layout_for(model) if layout is None else layout
    rep_a, stats_a = collect_exact(model, loss_fn, task_a, layout, desc="task A", show_progress=progress)
    rep_b, stats_b = collect_exact(model, loss_fn, task_b, layout, desc="task B", show_progress=progress)
    stats = stats_a.merge(stats_b) if normalizer == "pooled" else stats_a
    scores = score_tensor(
        layout, len(rep_a), len(rep_b),
        grads_a=lambda layer, block: rep_a.block(layout, layer, block),
        grads_b=lambda layer, block: rep_b.block(layout, layer, block),
        fisher=lambda layer, block: stats.fisher_block(layout, layer, block),
        count=stats.count, cfg=cfg,
    )
    config = {"codec": codec.to_dict(), "variant": variant, "normalizer": normalizer, "eps": eps,
              "ridge_abs": ridge_abs, "ridge_rel": ridge_rel, "layout": layout.model_type}
    return InterferenceResult(scores=scores, stderr=torch.zeros_like(scores), layout=layout, config=config)
