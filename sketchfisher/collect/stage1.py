"""Stage 1 in memory: each sample's representation (one-pass codecs) plus the task's Fisher statistics."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from ..capture.oracle import LossFn
from ..compress import Codec, check_codec
from ..errors import InputError
from ..fisher import QUANTITIES, FisherStats
from ..layout import Layout
from ..capture.hooks import fp32_reductions
from .layers import LayerWork, weight_groups
from .passes import factor_pass, fold_factors, gradient_pass, trainable_weights


def collect(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Codec, *,
            modules: str = "attention", desc: str = "collect", show_progress: bool = False,
            stats_dtype: Optional[torch.dtype] = None, quantities: Sequence[str] = QUANTITIES):
    """Per-sample representation (``codec.representation()``) and :class:`FisherStats` of one task.

    For a two-pass codec (``sf.Sketch``) this is pass 1 only (statistics; the representation is
    None): the sketches need both tasks' statistics first (:mod:`sketchfisher.collect.sketches`).
    Parameters with ``requires_grad=False`` are not collected; their scores come out NaN.
    ``stats_dtype`` is the precision of the model-sized pass-1 statistics (:func:`default_stats_dtype`
    when None) and ``quantities`` which of them to keep (all by default;
    :func:`~sketchfisher.collect.plan.needed_statistics` gives what given settings need).
    """
    codec = check_codec(codec)
    weights = trainable_weights(model, layout, modules)
    dtype = stats_dtype or default_stats_dtype(model)
    stats = FisherStats.accumulating(dtype, tuple(quantities))
    rep = codec.representation()
    if codec.source == "gradients":
        for _, grads in gradient_pass(model, loss_fn, batches, weights, desc=desc, show_progress=show_progress):
            rep.add(grads)
            stats.update(grads)
    else:
        # (a sketch's sides read the same numbers: bf16 products, whose statistics updates are recorded layer by
        # layer where they can be)
        work, groups = (LayerWork(fold=stats), weight_groups(layout, weights)) if codec.two_pass else (None, [])
        for _, captured in factor_pass(model, loss_fn, batches, weights, desc=desc, show_progress=show_progress):
            if work is None:
                fold_factors(stats, captured, weights)
            else:
                with fp32_reductions():
                    for parts in groups:
                        work.run(captured, parts)
            if rep is not None:
                rep.add(captured)
    if stats.count == 0:
        raise InputError(f"{desc}: the task yielded no samples")
    stats.check_finite(desc)
    return rep, stats


def default_stats_dtype(model: nn.Module) -> torch.dtype:
    """fp32 for a model on a GPU, fp64 on the CPU.

    On the CPU the statistics are small next to the time a pass takes and fp64 makes them exact to
    rounding; on a GPU at 7B scale each statistic is 8.6 GB in fp32 (attention weights alone), and
    fp32 Welford updates of batch means lose nothing the sketches can see (docs/benchmarks.md)."""
    return stats_dtype_for(any(p.is_cuda for p in model.parameters()))


def stats_dtype_for(on_gpu: bool) -> torch.dtype:
    """:func:`default_stats_dtype` of a model that is (or will be) on a GPU or not."""
    return torch.float32 if on_gpu else torch.float64
