"""``sf.analyze``: Stage 1 collection and Stage 6 scoring in one call; ``sf.run_sanity_checks``."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any, Iterable, Optional

import pandas as pd
import torch
from torch import nn

from .capture.oracle import LossFn
from .collect import Job, MemorySink, default_stats_dtype, execute, pass_plan
from .collect.runner import check_job
from .collect.sketches import host_staging
from .fisher import accumulator_dtype
from .compress import Codec, Exact, Factors, Sketch, check_codec
from .errors import InputError
from .interference import InterferenceResult, ScoreConfig
from .interference.checks import head_additivity, head_masking, loss_scaling, symmetry
from .interference.context import ExactSource, ResultContext, SketchSource
from .interference.engine import DEFAULT_MAX_BYTES
from .interference.stored import open_store
from .layout import Layout, layout_for, units_layout
from .layout.adapters import base_model
from .phases import PhaseLog
from .store import collect_to_store, stored_passes

logger = logging.getLogger(__name__)


def analyze(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any], *,
            codec: Optional[Codec] = None, config: Optional[ScoreConfig] = None, variant: Optional[str] = None,
            normalizer: Optional[str] = None, eps: Optional[float] = None, ridge_abs: Optional[float] = None,
            ridge_rel: Optional[float] = None, dtype: Optional[torch.dtype] = None, layout: Optional[Layout] = None,
            modules: str = "attention", max_bytes: int = DEFAULT_MAX_BYTES, store: Optional[str] = None,
            stats_dtype: Optional[torch.dtype] = None, progress: bool = False,
            units: str | tuple[str, ...] = "heads", mlp_group_size: Optional[int] = None,
            linear_group_sizes: Optional[dict[str, int]] = None, passes: Optional[float] = None,
            conflicts: Optional[bool] = None) -> InterferenceResult:
    """Head- and channel-resolved interference between every task-A sample i and task-B sample j.

    ``loss_fn(model, batch)`` returns one loss per sample (``[B]``); ``task_a``/``task_b`` iterate
    over batches. ``codec`` is ``sf.Exact()`` (default; autograd oracle), ``sf.Factors(rank=None)``
    (batched hooks) or ``sf.Sketch(k, kind, seed, ...)`` (two passes: the tasks must be re-iterable;
    ``res.stderr`` then holds each score's standard error).

    The score options are a :class:`ScoreConfig` (``config=``: variant, normalizer, eps, ridge,
    dtype); the keywords ``variant``, ``normalizer``, ``eps``, ``ridge_abs``, ``ridge_rel`` and
    ``dtype`` are a convenience that override the matching fields of ``config`` (or of the default).
    ``modules="all"`` also collects Fisher statistics of every linear weight. ``max_bytes`` bounds
    the working set of one Stage 6 chunk. ``store=path`` (sketches only) streams the per-sample
    sketches to a resumable store directory and scores from it; rerunning the same call after a
    crash finishes the collection. ``stats_dtype`` is the precision of the pass-1 Fisher statistics
    (None: fp64 for a model on the CPU, fp32 on a GPU); only the statistics these settings need are
    kept (:func:`sketchfisher.collect.needed_statistics`). Returns an :class:`InterferenceResult` whose ``scores`` are
    ``[nA, nB, L, H, 4]``.

    ``units`` chooses what the scores resolve: ``"heads"`` (attention heads, Q/K/V/O), ``"mlp"`` (MLP channel
    groups of ``mlp_group_size`` hidden units: GATE/UP rows and DOWN columns; default as many groups as
    heads) or both (``("heads", "mlp")`` / ``"all"``), collected in the same passes; ``"linear"`` adds
    output-channel groups of every other linear layer, one family per module pattern
    (``"linear:lm_head"``, ``"linear:layers.*.mlp.gate"``; group sizes by pattern in ``linear_group_sizes``).
    The result is the first family's; ``res.units(name)`` is another's (``scores [nA, nB, L, units,
    blocks]``; ``res.families`` names them).

    ``passes`` is the sketch codec's pass order. ``1.5`` (the default where it applies: sketches with variance
    reduction and normaliser ``"a"``) runs task B once: pass 1 over A, one pass over B that folds its
    statistics and sketches it, then pass 2 over A (:mod:`sketchfisher.collect.plan` says why this is exact:
    balance from task A alone, B centred after its pass by linearity; the same expectation, and on real
    MiniLM gradients the same error-bar coverage with a median relative error of ``paper`` scores about 4%
    higher than two passes: docs/sketches.md). ``2`` runs two
    passes over each task. With ``store=`` and no ``passes``, an existing store is finished in the order
    that began it.

    ``conflicts`` records what ``res.head_conflicts()`` needs: with a sketch codec each sample's exact conflict
    scalars against the other task's mean gradient, per unit block (both tasks' Σg, and task A's over half its
    samples, are kept until the preparation); exact codecs need nothing more. ``None`` (the default): on,
    unless only they keep the collection from fitting the device (then left out, with a warning); ``True``:
    on or refused; ``False``: off.
    """
    check_batches(task_a=task_a, task_b=task_b)
    model = base_model(model)  # a PEFT model: its base model, adapters injected (the effective weights)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise InputError(f"max_bytes bounds the memory of one chunk of scores and must be a positive number of "
                         f"bytes; got {max_bytes!r}")
    codec = check_codec(Exact() if codec is None else codec)
    cfg = score_config(config, variant=variant, normalizer=normalizer, eps=eps, ridge_abs=ridge_abs,
                       ridge_rel=ridge_rel, dtype=dtype)
    layout = units_layout(model, units, mlp_group_size, linear_group_sizes, layout=layout)
    if store is not None and passes is None:
        passes = stored_passes(store)
    plan = pass_plan(codec, cfg, passes, means=layout.beyond_heads, conflicts=conflicts is not False)
    if modules != "attention" and (store is not None or plan.passes == 1.5):
        raise InputError(f"{'stores' if store is not None else 'passes=1.5'} collect the layout's units only; use "
                         "modules='attention'")
    if store is not None:
        collect_to_store(store, model, loss_fn, task_a, task_b, layout, codec, cfg, show_progress=progress,
                         passes=plan.passes, stats_dtype=stats_dtype, conflicts=conflicts)
        return open_store(store).result(max_bytes=max_bytes)
    log = PhaseLog.for_devices([p.device for p in model.parameters()])
    job = Job(model, loss_fn, {"a": task_a, "b": task_b}, layout, codec, cfg,
              stats_dtype or default_stats_dtype(model), log, progress, modules)
    plan = check_job(plan, job, conflicts)
    # task A's Fisher (and, for MLP or linear units, both tasks' Σ|g|: task means) leave the GPU after the
    # passes that made them; their host memory is made ready while the passes run
    sink = MemorySink(job)
    sums = accumulator_dtype(job.stats_dtype) or job.stats_dtype  # (Σ|g| and Σg as they were accumulated)
    kept = [job.stats_dtype] + [sums for t in ("a", "b") for q in ("abs", "sum") if q in plan.statistics[t] and (
        q in sink.keep or (t == "a" and q in sink.keep_a and plan.passes == 1.5))]
    staging = host_staging(model, layout, kept) if codec.two_pass else None
    with staging or nullcontext():
        sink.staging = staging
        state = execute(plan, job, sink)
    if codec.two_pass:
        sink.check_counts(state)
        source = SketchSource(sink.side["a"], sink.side["b"], state.e, state.moments, state.residual or None)
    else:
        source = ExactSource(sink.reps["a"], sink.reps["b"])
    context = ResultContext.of(layout, cfg, codec, state.stats["a"], state.stats["b"], source)
    res = InterferenceResult.from_context(context, max_bytes)
    res.phases = log
    return res


def analyze_tasks(model: nn.Module, loss_fn: LossFn, tasks: Mapping[str, Iterable[Any]], *,
                  codec: Optional[Codec] = None, config: Optional[ScoreConfig] = None, variant: Optional[str] = None,
                  eps: Optional[float] = None, ridge_abs: Optional[float] = None, ridge_rel: Optional[float] = None,
                  dtype: Optional[torch.dtype] = None, layout: Optional[Layout] = None,
                  units: str | tuple[str, ...] = "heads", mlp_group_size: Optional[int] = None,
                  linear_group_sizes: Optional[dict[str, int]] = None, stats_dtype: Optional[torch.dtype] = None,
                  max_bytes: int = DEFAULT_MAX_BYTES, progress: bool = False) -> "TaskSet":
    """Collect every task of ``tasks`` (``{name: batches}``, at least two) once and pair them afterwards in any
    order: a statistics pass and one sketch pass per task (2N passes for N tasks, where pairwise collections
    would take N(N − 1) of them). ``res.pair("math", "code")`` is that pair's
    :class:`InterferenceResult` (scores with error bars, ``head_conflicts()``, every table), ``res.conflicts()``
    the conflict test of every ordered pair and ``res.matrix()`` how many unit blocks each pair flags.

    Sketches only (default ``sf.Sketch()``), normaliser ``"a"`` (each pair's denominator is its task A's
    Fisher). The balance is pooled over all tasks and each task is centred by its own means, so a pair's scores
    have the expectation of a dedicated ``sf.analyze`` run, with error bars of about its size
    (``benchmarks/many_tasks.py`` compares them on MiniLM). Every task's statistics stay in memory, and the
    sketch pass runs the torch path (no fused GPU kernel yet): for models whose N tasks' statistics fit."""
    from .collect.many import collect_tasks
    from .interference.many import TaskSet

    if not isinstance(tasks, Mapping):
        raise InputError(f"tasks must be a mapping {{name: batches}}, got {type(tasks).__name__}")
    check_batches(**{str(k): v for k, v in tasks.items()})
    model = base_model(model)
    codec = check_codec(Sketch() if codec is None else codec)
    cfg = score_config(config, variant=variant, normalizer=None, eps=eps, ridge_abs=ridge_abs, ridge_rel=ridge_rel,
                       dtype=dtype)
    layout = units_layout(model, units, mlp_group_size, linear_group_sizes, layout=layout)
    collection = collect_tasks(model, loss_fn, tasks, layout, codec, cfg,
                               stats_dtype=stats_dtype or default_stats_dtype(model), show_progress=progress)
    return TaskSet(collection, layout, cfg, codec, max_bytes)


def check_batches(**tasks: Any) -> None:
    """Tasks are iterables of batches; raw strings or a single tokenizer output get a pointer to the helpers."""
    for name, task in tasks.items():
        if isinstance(task, str) or (isinstance(task, (list, tuple)) and task and isinstance(task[0], str)):
            raise InputError(f"{name} holds raw strings; turn them into batches first: "
                             "sf.tasks.from_texts(texts, tokenizer, loss='clm' or 'mlm')")
        if isinstance(task, Mapping):
            raise InputError(f"{name} is one mapping (a tokenizer's output?), not an iterable of batches: pass "
                             f"[batch], or build batches with sf.tasks.from_texts(texts, tokenizer)")


def score_config(config: Optional[ScoreConfig] = None, **overrides: Any) -> ScoreConfig:
    """``config`` (or the default) with the given non-None fields replaced."""
    if config is not None and not isinstance(config, ScoreConfig):
        raise InputError(f"config must be an sf.ScoreConfig, got {type(config).__name__}")
    base = (config or ScoreConfig()).to_dict()
    base["dtype"] = (config or ScoreConfig()).dtype
    base.update({k: v for k, v in overrides.items() if v is not None})
    return ScoreConfig(**base)


def run_sanity_checks(model: nn.Module, loss_fn: Any, task_a: list, task_b: list, *, codec: Optional[Codec] = None,
                      layer: int = 0, heads: list[int] | None = None) -> pd.DataFrame:
    """Every property check of :mod:`sketchfisher.interference.checks` on the exact path; one row per check."""
    codec = codec or Factors()
    rows = [head_additivity(analyze(model, loss_fn, task_a, task_b, codec=codec))]
    rows.append(symmetry(analyze(model, loss_fn, task_a, task_a, codec=codec, variant="symmetric")))
    rows.append(head_masking(analyze, model, loss_fn, task_a, task_b, layer, heads or [0], codec=codec))
    rows += loss_scaling(analyze, model, loss_fn, task_a, task_b, codec=codec)
    return pd.DataFrame(rows)
