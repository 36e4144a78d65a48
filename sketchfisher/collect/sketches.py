"""Pass 2 of the sketch codec: sketch every sample's side vectors once both tasks' statistics are known.

Pass 1 (:func:`sketchfisher.collect.collect`, or the store writer) accumulates exact per-task
statistics (Welford of g², Σ|g|, Σg). :func:`prepare_all` turns them into each (layer, block)'s
:class:`~sketchfisher.compress.sketch_scores.BlockPrep`; pass 2 runs the model again, forms each
sample's head-block gradients from its factors (one block at a time), turns them into the
variant's i-side (task A) or j-side (task B) vectors, and sketches them.
"""

from __future__ import annotations

from dataclasses import replace as dataclass_replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .. import kernels
from ..capture.oracle import LossFn
from ..compress import Sketch, SketchSide
from ..compress.sketch_scores import BlockPrep, Side, prepare_block, side_vector, sketch_sides, with_j_centre
from ..errors import InputError
from ..fisher import MEAN_ACCESSOR, QUANTITIES, FisherStats, HostStaging
from ..fisher.host import host_copy
from ..layout import BLOCKS, Layout, block_index
from ..metric import MEAN_OF, ScoreConfig
from ..phases import PhaseLog
from .finite import LaggedFiniteCheck
from .passes import Skip, factor_pass, fold_factors, trainable_weights

Preps = dict[tuple[int, str], Optional[BlockPrep]]


def needed_statistics(cfg: ScoreConfig, codec: Any, means: bool = False, passes: float = 2) -> dict[str, tuple[str, ...]]:
    """The pass-1 statistics (:data:`sketchfisher.fisher.QUANTITIES`) each task must keep for these settings.

    Task A always keeps its Fisher (the normaliser, and exact re-scoring); task B only for the pooled
    normaliser. The sketch codec with variance reduction adds Σ|g| of both tasks (balancing) and the
    task mean of each side's transform (centering: the i-side's over A, the j-side's over B); with
    ``passes=1.5`` the balance comes from task A alone, so task B keeps only its mean. The Welford M2
    (variance across samples) is never needed for scores. ``means=True`` (MLP units) keeps the task
    means of both sides' transforms whatever the codec: they give every neuron's mean score over all
    pairs (:func:`sketchfisher.interference.pair_means.pair_means_from_statistics`).
    """
    a, b = {"fisher"}, {"fisher"} if cfg.normalizer == "pooled" else set()
    if means:
        a.add(MEAN_OF[cfg.spec.i_side])
        b.add(MEAN_OF[cfg.spec.j_side])
    if codec.two_pass and codec.variance_reduction:
        a |= {"abs", MEAN_OF[cfg.spec.i_side]}
        b |= {MEAN_OF[cfg.spec.j_side]} if passes == 1.5 else {"abs", MEAN_OF[cfg.spec.j_side]}
    return {"a": tuple(q for q in QUANTITIES if q in a), "b": tuple(q for q in QUANTITIES if q in b)}


def prepare(layout: Layout, layer: int, block: str, stats_a: FisherStats, stats_b: Optional[FisherStats],
            cfg: ScoreConfig, codec: Sketch, balance_from_a: bool = False) -> Optional[BlockPrep]:
    """Pass-2 quantities of one (layer, block) from both tasks' statistics (on the statistics' device).

    ``balance_from_a`` balances by task A's Σ|g| alone; ``stats_b=None`` (with it) prepares the single pass
    over task B, whose centre is not known yet (:func:`collect_sketches_b_once`)."""
    if layout.param_of(layer, block) not in stats_a.welford:
        return None
    gathered: dict = {}  # one gather per (task, statistic): variants reuse the Fisher or Σ|g| as a centre

    def get(stats: FisherStats, what: str) -> torch.Tensor:
        key = (id(stats), what)
        if key not in gathered:
            gathered[key] = stats.block(layout, layer, block, what)
        return gathered[key]

    fisher_a = get(stats_a, "fisher")
    fisher = fisher_a
    if cfg.normalizer == "pooled":  # the Welford merge of the two means, entry by entry (as FisherStats.merge)
        fisher = fisher_a + (get(stats_b, "fisher") - fisher_a) * (stats_b.count / (stats_a.count + stats_b.count))
    vr = codec.variance_reduction
    b = vr and stats_b is not None
    return prepare_block(fisher, fisher_a if cfg.normalizer == "loo" else None,
                         get(stats_a, MEAN_ACCESSOR[MEAN_OF[cfg.spec.i_side]]) if vr else None,
                         get(stats_b, MEAN_ACCESSOR[MEAN_OF[cfg.spec.j_side]]) if b else None,
                         get(stats_a, "mean_abs") if vr else None,
                         get(stats_b, "mean_abs") if b and not balance_from_a else None,
                         stats_a.count, stats_b.count if stats_b is not None else 0, cfg, codec)


def prepare_all(layout: Layout, stats_a: FisherStats, stats_b: Optional[FisherStats], cfg: ScoreConfig,
                codec: Sketch, offload: bool = False, keep: tuple[str, ...] = ("fisher",),
                staging: Optional[HostStaging] = None, balance_from_a: bool = False) -> Preps:
    """:func:`prepare` for every (layer, block), layer by layer (``stats_b=None``: from task A alone, for
    the single pass over task B; ``balance_from_a``: as it, with task B's centre).

    With ``offload=True`` each parameter's statistics are released as soon as all of its blocks are
    prepared: those in ``keep`` (by default the Fisher, needed later to re-score candidates exactly)
    move to host memory (into ``staging``'s buffers when given), the others are freed. Device memory
    then holds the statistics or the preparations of a parameter, never both for the whole model (at
    7B the two together would not fit one 80 GB card)."""
    keys = layout.groups()
    last_use = {layout.param_of(*key): key for key in keys}
    preps: Preps = {}
    copy = staging.copy if staging is not None else host_copy
    tasks = [stats for stats in (stats_a, stats_b) if stats is not None]
    for key in keys:
        preps[key] = prepare(layout, *key, stats_a, stats_b, cfg, codec, balance_from_a)
        name = layout.param_of(*key)
        if offload and last_use[name] == key:
            for stats in tasks:
                stats.offload(name, keep=keep, copy=copy)
    if offload:
        for stats in tasks:
            stats.settle(keep)
    return preps


def host_staging(model: nn.Module, layout: Layout, dtypes: Iterable[torch.dtype],
                 modules: str = "attention") -> Optional[HostStaging]:
    """Host buffers for model-sized statistics of the collected weights, one per entry of ``dtypes``,
    touched in the background while the passes run (:class:`~sketchfisher.fisher.HostStaging`); None
    when there are none or the model's collected weights are all on the host already."""
    weights, dtypes = [model.get_parameter(name) for name in trainable_weights(model, layout, modules)], list(dtypes)
    if not dtypes or not any(w.is_cuda for w in weights):
        return None
    return HostStaging.for_tensors(weights, dtypes)


def compacted_statistics(layout: Layout) -> tuple[str, ...]:
    """The statistics a run rounds to bf16 once final (:meth:`~sketchfisher.fisher.FisherStats.compact`):
    Σ|g| and Σg, which only balance and centre the sketches, unless the layout's MLP or linear units
    also read exact task means from them."""
    return () if layout.beyond_heads else ("abs", "sum")


def statistics_dtypes(quantities: Iterable[str], layout: Layout, dtype: torch.dtype) -> list[torch.dtype]:
    """The precision each kept statistic is written in (bf16 for the compacted ones)."""
    return [torch.bfloat16 if q in compacted_statistics(layout) else dtype for q in quantities]


def sketch_batches(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Sketch,
                   preps: Preps, side: Side, count: int, cfg: ScoreConfig, skip: Skip = lambda i: False,
                   desc: str = "pass 2", show_progress: bool = False,
                   fold: Optional[Callable[[Any], None]] = None) -> Iterator[tuple[int, int, dict]]:
    """Pass 2 over one task, batch by batch: ``(batch index, batch size, {(layer, block): (sketches
    [B, H_b, k], ‖x̃‖² [B, H_b], cross [B, H_b])})``. Batches for which ``skip(index)`` is true are
    not run (resumption) and yield nothing. ``count`` is task A's sample count. ``fold(factors)``, when
    given, also receives every batch's captured factors first (pass-1 statistics in the same pass)."""
    keys = [key for key, prep in preps.items() if prep is not None]
    weights = sorted({layout.param_of(*key) for key in keys})
    fused = FusedSides(layout, codec, cfg, side)
    check = LaggedFiniteCheck(desc, cfg)
    for index, bf in factor_pass(model, loss_fn, batches, weights, skip=skip, desc=desc, show_progress=show_progress):
        if fold is not None:
            fold(bf)
        out = {}
        last = (None, None)  # (module, its per-sample gradient): blocks of one fused module share it
        for layer, block in keys:
            hbs = layout.head_blocks(layer, block)
            module = hbs[0].module_name
            prep = preps[(layer, block)]
            if prep.w_a.device != bf.A[module].device:  # statistics read from disk, or another card's
                prep = preps[(layer, block)] = prep.to(bf.A[module].device)
            if fused.applies(bf.A[module]):
                if last[0] != module:
                    last = (None, None)  # free the previous module's gradient first
                    last = (module, bf.grad(module))
                out[(layer, block)] = fused(last[1], layer, block, prep)
                continue
            g = torch.stack([hb.grad_from_factors(bf.A[module], bf.D[module]).flatten(-2) for hb in hbs], 1)
            v = side_vector(g, prep, side, count, cfg)
            out[(layer, block)] = sketch_sides(v, prep, side, codec, layer, block_index(block))
        check.submit(index, out)
        yield index, bf.batch_size, out
    check.finish()


class FusedSides:
    """Pass 2 for sjlt on CUDA in one Triton kernel per (layer, block): the side vectors, their cross
    terms and norms and the sketches, read straight out of the module's per-sample gradient
    (:func:`sketchfisher.kernels.sketch_heads`). Computes what the torch path of
    :func:`sketch_batches` computes (``tests/test_gpu.py``); leave-one-out task-A sides and
    non-fp32 score dtypes take the torch path."""

    def __init__(self, layout: Layout, codec: Sketch, cfg: ScoreConfig, side: Side):
        self.layout, self.codec, self.cfg, self.side = layout, codec, cfg, side
        self.enabled = (codec.kind == "sjlt" and cfg.dtype == torch.float32 and kernels.available()
                        and not (side == "a" and cfg.normalizer == "loo"))
        self._geometry: dict = {}

    def applies(self, factor: torch.Tensor) -> bool:
        return self.enabled and factor.is_cuda

    def geometry(self, layer: int, block: str, device: torch.device):
        """Hash keys ``[H_b, 2]``, element offsets ``[H_b]``, size, columns and row stride of the head blocks."""
        if (layer, block) not in self._geometry:
            hbs = self.layout.head_blocks(layer, block)
            hb = hbs[0]
            size, cols_p = hb.numel, hb.param_shape[1]
            if hb.storage_axis == 0:
                offsets, cols = [b.start * cols_p for b in hbs], cols_p
            else:
                offsets, cols = [b.start for b in hbs], hb.width
            keys = [self.codec.map(layer, block_index(block), h, size).hash_key() for h in range(len(hbs))]
            self._geometry[(layer, block)] = (kernels.to_device(torch.tensor(keys, dtype=torch.int64), device),
                                              kernels.to_device(torch.tensor(offsets, dtype=torch.int64), device),
                                              size, cols, cols_p)
        return self._geometry[(layer, block)]

    def __call__(self, grad: torch.Tensor, layer: int, block: str, prep: BlockPrep):
        keys, offsets, size, cols, row_stride = self.geometry(layer, block, grad.device)
        return kernels.sketch_heads(grad, keys, offsets, size, cols, row_stride, self.codec.k, self.codec.s,
                                    transform=getattr(self.cfg.spec, "i_side" if self.side == "a" else "j_side"),
                                    weight=prep.weight(self.side), centre=prep.centre(self.side),
                                    other=prep.other(self.side))


def sketch_task(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Sketch,
                preps: Preps, side: Side, count: int, cfg: ScoreConfig, desc: str, show_progress: bool) -> SketchSide:
    """Pass 2 over one task in memory: every sample's sketched ``side`` vectors."""
    out = SketchSide(codec)
    for _, size, blocks in sketch_batches(model, loss_fn, batches, layout, codec, preps, side, count, cfg,
                                          desc=desc, show_progress=show_progress):
        for key, (sk, norm2, cross) in blocks.items():
            out.add(key, sk, norm2, cross)
        out.n += size
    return out


def check_sketch_width(layout: Layout, codec: Any) -> None:
    """A sketch must be smaller than the head blocks it sketches (else it stores more than the data).

    The one exception is srht at its full width k = P (the block size padded to a power of two), which
    recovers exact scores and is how sketches are checked against the exact answer."""
    if not codec.two_pass:
        return
    smallest, block = min((hb.numel, block) for layer, block in layout.groups() for hb in layout.head_blocks(layer, block))
    what = "head block" if block in BLOCKS else "MLP channel-group block"
    full = 1 << (smallest - 1).bit_length()
    if codec.k >= smallest and not (codec.kind == "srht" and codec.k <= full):
        raise InputError(f"Sketch(k={codec.k}) is not smaller than the smallest {what} ({smallest:,} entries): "
                         f"the sketch would be larger than the data; use k < {smallest:,}, or sf.Factors() for exact "
                         "scores")


def check_reiterable(**tasks: Iterable[Any]) -> None:
    """Two-pass collection needs tasks it can iterate twice (a list or a DataLoader, not a generator)."""
    for name, task in tasks.items():
        if iter(task) is task:
            raise InputError(f"{name} is a one-shot iterator; Sketch needs two passes, pass a list or a DataLoader")


def collect_sketches(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any],
                     layout: Layout, codec: Sketch, cfg: ScoreConfig, stats_a: FisherStats, stats_b: FisherStats,
                     show_progress: bool = False, log: Optional[PhaseLog] = None,
                     staging: Optional[HostStaging] = None) -> tuple[SketchSide, SketchSide, dict]:
    """Pass 2 for both tasks given their pass-1 statistics; returns the two sides and each block's exact
    scalar ``e`` (all the scores need of the preparations, which are freed). Task A's Fisher moves to
    host memory (``staging``'s buffers when given)."""
    check_reiterable(task_a=task_a, task_b=task_b)
    check_sketch_width(layout, codec)
    log = log or PhaseLog()
    with log.phase("preparation"):
        # MLP units keep the task means too: every neuron's pair-mean score comes from them
        means = (MEAN_OF[cfg.spec.i_side], MEAN_OF[cfg.spec.j_side]) if layout.beyond_heads else ()
        preps = prepare_all(layout, stats_a, stats_b, cfg, codec, offload=True, staging=staging,
                            keep=tuple(dict.fromkeys(("fisher", *means))))
    with log.phase("pass 2 A"):
        side_a = sketch_task(model, loss_fn, task_a, layout, codec, preps, "a", stats_a.count, cfg, "pass 2 A",
                             show_progress)
    with log.phase("pass 2 B"):
        side_b = sketch_task(model, loss_fn, task_b, layout, codec, preps, "b", stats_a.count, cfg, "pass 2 B",
                             show_progress)
    if side_a.n != stats_a.count or side_b.n != stats_b.count:
        raise InputError(f"pass 2 saw {side_a.n}/{side_b.n} samples but pass 1 saw {stats_a.count}/{stats_b.count}: "
                         "the tasks must yield the same batches on every pass")
    return side_a, side_b, centre_products(preps)


def collect_sketches_b_once(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any],
                            layout: Layout, codec: Sketch, cfg: ScoreConfig, stats_a: FisherStats,
                            quantities_b: tuple[str, ...], stats_dtype: torch.dtype, show_progress: bool = False,
                            log: Optional[PhaseLog] = None, staging: Optional[HostStaging] = None
                            ) -> tuple[SketchSide, SketchSide, dict, FisherStats]:
    """Sketches of both tasks with ONE pass over task B (after task A's pass 1; A's pass 2 comes last):
    1.5 passes per task for |A| = |B| instead of 2. Returns the two sides, each block's ``e`` and task
    B's statistics.

    It rests on three facts. With normaliser ``"a"`` the denominator comes from task A alone. The balance
    (any positive per-entry weight keeps the estimator unbiased) is taken from task A's Σ|g| alone, so
    B's side vectors ``y'_j`` are known during B's only pass; that pass also folds B's statistics.
    Centring is linear: ``R(y'_j − ȳ') = R y'_j − R ȳ'``, so B's sketches are kept unquantised and
    centred once ``ȳ'`` (B's mean transform, balanced) is known after the pass; the cross term
    ``⟨y'_j, x̄'⟩`` needs only A's centre and is exact during the pass. Task A's pass 2 then has ``ȳ'``
    for its exact cross terms ``⟨x'_i, ȳ'⟩`` and ``e = ⟨x̄', ȳ'⟩``. The one quantity that is not exact
    is ``‖ỹ_j‖²``, which only the standard errors use: it is ``‖R ỹ_j‖²`` (unbiased, relative error
    about √(2/k)). Scores equal the two-pass order's up to the different balance (same expectation;
    full-width srht gives the exact scores: test).

    Device memory: the preparations (``w_a``, ``w_b``, ``x̄'``) are built from task A's statistics
    before B's pass, parameter by parameter, while A's statistics leave the device (its Fisher to host
    memory, ``staging``'s buffers when given). B's pass then holds them and B's own statistics (four
    model-sized tensors, as a two-pass order's pass 2); after it each parameter's ``ȳ'`` replaces
    ``w_b`` and B's statistics, so A's pass 2 holds three."""
    check_passes(1.5, cfg, codec)
    check_reiterable(task_a=task_a)
    check_sketch_width(layout, codec)
    log = log or PhaseLog()
    means = (MEAN_OF[cfg.spec.i_side], MEAN_OF[cfg.spec.j_side]) if layout.beyond_heads else ()
    keep = tuple(dict.fromkeys(("fisher", *means)))
    with log.phase("preparation"):
        preps = prepare_all(layout, stats_a, None, cfg, codec, offload=True, staging=staging, keep=keep)
    with log.phase("pass B (statistics and sketches)"):
        raw, stats_b = pass_b(model, loss_fn, task_b, layout, codec, cfg, preps, stats_a.count, quantities_b,
                              stats_dtype, show_progress=show_progress)
    with log.phase("centring B"):
        centres = centre_j_side(layout, codec, cfg, preps, stats_b, keep)
        side_b = SketchSide(codec)
        for key, centre in centres.items():  # a block's batches at once: a few large operations, not many small
            whole = tuple(torch.cat(t) for t in zip(*(blocks.pop(key) for _, _, blocks in raw)))
            side_b.add(key, *centred({key: whole}, {key: centre})[key])
        side_b.n = sum(size for _, size, _ in raw)
        del raw
    with log.phase("pass 2 A"):
        side_a = sketch_task(model, loss_fn, task_a, layout, codec, preps, "a", stats_a.count, cfg, "pass 2 A",
                             show_progress)
    if side_a.n != stats_a.count:
        raise InputError(f"pass 2 A saw {side_a.n} samples but pass 1 saw {stats_a.count}: the task must yield the "
                         "same batches on every pass")
    return side_a, side_b, centre_products(preps), stats_b


def pass_b(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Sketch,
           cfg: ScoreConfig, preps: Preps, count_a: int, quantities: tuple[str, ...], stats_dtype: torch.dtype,
           skip: Skip = lambda i: False, show_progress: bool = False,
           reduce: Optional[Callable[[FisherStats], FisherStats]] = None) -> tuple[list, FisherStats]:
    """Task B's only pass: ``(its batches' uncentred sketches [(index, size, blocks)], its statistics)``,
    the statistics checked (``reduce`` first merges other ranks') and rounded as final
    (:func:`compacted_statistics`). The sketches stay uncentred until B's centre is known
    (:func:`centre_j_side`, :func:`centred`)."""
    stats_b = FisherStats(dtype=stats_dtype, quantities=quantities)
    names = trainable_weights(model, layout)
    raw = list(sketch_batches(model, loss_fn, batches, layout, codec, preps, "b", count_a, cfg, skip=skip,
                              desc="pass B", show_progress=show_progress,
                              fold=lambda bf: fold_factors(stats_b, bf, names)))
    if reduce is not None:
        stats_b = reduce(stats_b)
    if stats_b.count == 0:
        raise InputError("pass B: the task yielded no samples")
    stats_b.check_finite("pass B")
    return raw, stats_b.compact(compacted_statistics(layout))


def centred(blocks: dict, centres: dict) -> dict:
    """Task B's uncentred sketches ``{key: (R y'_j, ‖·‖², cross)}`` (a batch, or more) centred by linearity,
    row by row (so a batch at a time or all at once give the same values):
    ``(R y'_j − R ȳ', ‖R ỹ_j‖², cross)``; the cross term ``⟨y'_j, x̄'⟩`` was exact already."""
    out = {}
    for key, (vec, _, cross) in blocks.items():
        vec = vec - centres[key].to(vec.device, vec.dtype)
        out[key] = (vec, vec.square().sum(-1), cross)
    return out


def one_pass_b_applies(cfg: ScoreConfig, codec: Any) -> bool:
    """Task B can be collected in one pass: a sketch with variance reduction and normaliser ``"a"``."""
    return bool(codec.two_pass and codec.variance_reduction and cfg.normalizer == "a")


def resolve_passes(passes: Optional[float], cfg: ScoreConfig, codec: Any) -> float:
    """The pass order to run: ``passes`` checked (:func:`check_passes`), or for None the default: 1.5 where
    it applies (:func:`one_pass_b_applies`), else 2."""
    if passes is None:
        return 1.5 if one_pass_b_applies(cfg, codec) else 2
    check_passes(passes, cfg, codec)
    return passes


def check_passes(passes: float, cfg: ScoreConfig, codec: Any) -> None:
    """The pass order is 2 (per task) or 1.5 (task B once), and 1.5 has what it rests on."""
    if passes not in (2, 1.5):
        raise InputError(f"passes must be 2 or 1.5, got {passes!r}")
    if passes == 1.5 and not one_pass_b_applies(cfg, codec):
        raise InputError("passes=1.5 (task B once) needs normalizer='a' (the denominator from task A alone) and a "
                         f"sketch with variance reduction; got normalizer={cfg.normalizer!r}, codec {codec!r}")


def centre_j_side(layout: Layout, codec: Sketch, cfg: ScoreConfig, preps: Preps, stats_b: FisherStats,
                  keep: tuple[str, ...] = ()) -> dict[tuple[int, str], torch.Tensor]:
    """After the single pass over task B: each block's ``R ȳ' [1, H_b, k]`` (to subtract from B's uncentred
    sketches). Each preparation gains ``ȳ'`` and ``e`` and drops ``w_b`` (not needed again); B's statistics
    are released parameter by parameter (those in ``keep`` to host memory)."""
    keys = [key for key, prep in preps.items() if prep is not None]
    last_use = {layout.param_of(*key): key for key in keys}
    centres = {}
    for key in keys:
        # ȳ' = mean_j f_j(g_j) · w_b, balanced as the pass was
        prep = with_j_centre(preps[key], stats_b.block(layout, *key, MEAN_ACCESSOR[MEAN_OF[cfg.spec.j_side]]))
        preps[key] = dataclass_replace(prep, w_b=None)
        centres[key] = codec.apply_heads(key[0], block_index(key[1]), prep.y_bar[None])
        name = layout.param_of(*key)
        if last_use[name] == key:
            stats_b.offload(name, keep=keep)
    stats_b.settle(keep)
    return centres


def centre_products(preps: Preps) -> dict[tuple[int, str], torch.Tensor]:
    """``e = ⟨x̄', ȳ'⟩ [H_b]`` per collected block: what sketched scores need of the preparations."""
    return {key: prep.e for key, prep in preps.items() if prep is not None}


__all__ = ["FusedSides", "Preps", "centre_j_side", "centred", "check_passes", "check_reiterable", "collect_sketches",
           "collect_sketches_b_once", "compacted_statistics", "host_staging", "needed_statistics", "one_pass_b_applies",
           "pass_b", "prepare", "prepare_all", "resolve_passes", "sketch_batches", "sketch_task", "statistics_dtypes",
           "trainable_weights"]
