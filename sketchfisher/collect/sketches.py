"""The steps of a side codec's collection (sketches) on plain statistics and captured factors.

Pass 1 accumulates exact per-task statistics (Welford of g², Σ|g|, Σg). :func:`prepare_all` turns them
into each (layer, block)'s :class:`~sketchfisher.compress.sketch_scores.BlockPrep`; a pass 2
(:func:`sketch_batches`) runs the model again, forms each sample's head-block gradients from its factors
(one block at a time), turns them into the variant's i-side (task A) or j-side (task B) vectors, and maps
them with the codec. Task B's single pass (:func:`pass_b`) folds its statistics and keeps its side
vectors uncentred until :func:`centre_j_side` knows its centre. The order of these steps is the pass
plan's (:mod:`.plan`); :mod:`.runner` executes it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from dataclasses import replace as dataclass_replace
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..capture.hooks import fp32_reductions
from ..capture.oracle import LossFn
from ..compress import SideCodec
from ..compress.base import centres_b_from_a
from ..compress.onebyte import narrower, values
from ..compress.sketch_scores import (BlockPrep, Side, balances_by_fisher, conflict_moments, conflict_scalars,
                                     prepare_block, rebuild_a_weight, residual_centre, scale_centring, side_vector,
                                     sketch_sides, with_j_centre)
from ..errors import InputError
from ..fisher import MEAN_ACCESSOR, FisherStats, HostStaging
from ..fisher.precision import kept_dtypes
from ..fisher.host import CopiesAhead, host_copy
from ..layout import Layout, block_index
from ..metric import MEAN_OF, ScoreConfig
from .finite import LaggedFiniteCheck
from .layers import LayerWork, layer_parts, prep_on
from .passes import Skip, block_gradients, factor_pass, fold_factors, trainable_weights

Preps = dict[tuple[int, str], Optional[BlockPrep]]
CONFLICT_WEIGHT_DTYPE = "fp8"
"""The conflict test's weights ``u = ḡ/(Î+ε+λ)`` (model-sized, held through the side passes) are kept in one byte
with a scale per head block (:mod:`~sketchfisher.compress.onebyte`) for every unit family. They only make each
sample's conflict scalar ``g·u``, which feeds the test's variance (a relative rounding of at most 2⁻⁴ per entry);
T and the norms are formed from the exact means (:func:`~sketchfisher.compress.sketch_scores.conflict_moments`)."""


def prepare(layout: Layout, layer: int, block: str, stats_a: FisherStats, stats_b: Optional[FisherStats],
            cfg: ScoreConfig, codec: SideCodec, balance_from_a: bool = False, conflicts: bool = True,
            recipe: Optional["Recipe"] = None) -> Optional[BlockPrep]:
    """Pass-2 quantities of one (layer, block) from both tasks' statistics (on the statistics' device).

    ``balance_from_a`` balances by task A's statistics alone (a power of its normaliser; stores of format 10 and
    before, by its √mean|g|); ``stats_b=None`` (with it) prepares the single pass
    over task B, whose centre is not known yet (the ``1.5`` order of :mod:`.plan`). A codec with scaled centring
    (:func:`~sketchfisher.compress.base.centres_b_from_a`) centres B during that pass by a multiple of task A's
    centre: the preparation's ``ȳ'`` is then ``x̄'`` itself (one tensor), until :func:`centre_j_side` puts B's own
    mean in its place. ``conflicts=False`` leaves
    out the conflict test's weights and moments even where the statistics allow them. ``recipe``: how the balance
    and the centres are formed and kept (:data:`RECIPE`, today's; a store reads its own, :func:`recipe_of`)."""
    recipe = recipe or RECIPE
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
    from_a = balance_from_a and stats_b is None and centres_b_from_a(codec, 1.5)  # B's direction: A's centre
    b = vr and stats_b is not None
    rule = "fisher" if recipe.balance == "fisher" and balance_from_a else "abs"  # (task B once: A's normaliser)
    fisher_balanced = rule == "fisher" or balances_by_fisher(cfg)  # (no Σ|g| needed)
    means = {t: get(s, "mean_grad") if conflicts and s is not None and "sum" in s.quantities else None
             for t, s in (("a", stats_a), ("b", stats_b))}  # the conflict test's
    half = get(stats_a, "mean_grad_half") if means["a"] is not None and "half" in stats_a.quantities else None
    prep = prepare_block(fisher, fisher_a if cfg.normalizer == "loo" else None,
                         get(stats_a, MEAN_ACCESSOR[MEAN_OF[cfg.spec.i_side]]) if vr else None,
                         get(stats_b, MEAN_ACCESSOR[MEAN_OF[cfg.spec.j_side]]) if b else None,
                         get(stats_a, "mean_abs") if vr and not fisher_balanced else None,
                         get(stats_b, "mean_abs") if b and not balance_from_a and not fisher_balanced else None,
                         stats_a.count, stats_b.count if stats_b is not None else 0, cfg, codec,
                         mean_g_a=means["a"], mean_g_b=means["b"], half_a=half,
                         u_dtype=CONFLICT_WEIGHT_DTYPE, balance=rule,
                         side_dtype=recipe.sides if stats_a.dtype == torch.float32 else None)
    if vr and from_a:  # B's single pass is centred by its own multiple of x̄' (any direction keeps scores exact)
        prep = dataclass_replace(prep, y_bar=prep.x_bar, e=values(prep.x_bar, torch.float64).square().sum(-1))
    if half is not None:  # how many samples the half mean averages
        prep.moments["n_even"] = torch.tensor(float(stats_a.half_counts[layout.param_of(layer, block)]), dtype=torch.float64)
    return prep


def prepare_all(layout: Layout, stats_a: FisherStats, stats_b: Optional[FisherStats], cfg: ScoreConfig,
                codec: SideCodec, offload: bool = False, keep: tuple[str, ...] = ("fisher",),
                staging: Optional[HostStaging] = None, balance_from_a: bool = False, keep_a: tuple[str, ...] = ()
                ) -> Preps:
    """:func:`prepare` for every (layer, block), layer by layer (``stats_b=None``: from task A alone, for
    the single pass over task B, which does not read ``w_a``: it is left out, and :func:`centre_j_side`
    builds it again from task A's Fisher; ``balance_from_a``: as it, with task B's centre).

    With ``offload=True`` each parameter's statistics are released as soon as all of its blocks are
    prepared: those in ``keep`` (by default the Fisher, needed later to re-score candidates exactly)
    move to host memory (into ``staging``'s buffers when given), the others are freed. Device memory
    then holds the statistics or the preparations of a parameter, never both for the whole model (at
    7B the two together would not fit one 80 GB card). ``keep_a``: what task A's statistics keep besides, when
    task B's single pass follows (its Σg: the conflict test's T is formed from A's exact mean after that pass)."""
    keys = layout.groups()
    last_use = {layout.param_of(*key): key for key in keys}
    preps: Preps = {}
    copy = staging.copy if staging is not None else host_copy
    tasks = [(stats, keep) for stats in (stats_a, stats_b) if stats is not None]
    if stats_b is None and keep_a:
        tasks[0] = (stats_a, tuple(dict.fromkeys((*keep, *keep_a))))
    with overlapped(staging):  # (a parameter's statistics leave while the next one's preparation runs)
        for key in keys:
            prep = preps[key] = prepare(layout, *key, stats_a, stats_b, cfg, codec, balance_from_a)
            if prep is not None and stats_b is None and prep.w_b is not None:  # B's single pass next: no w_a
                prep.w_a = None
            name = layout.param_of(*key)
            if offload and last_use[name] == key:
                for stats, kept in tasks:
                    stats.offload(name, keep=kept, copy=copy)
    if offload:
        for stats, kept in tasks:
            stats.settle(kept)
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


@dataclass(frozen=True)
class Recipe:
    """How a collection forms its preparations: ``sides``, the precision of the balance and the centres where the
    statistics are fp32 (the GPU setting, where they are model-sized tensors that the side passes hold on the device;
    ``"fp8"``: one byte with a scale per head block, :mod:`~sketchfisher.compress.onebyte`; None: the score dtype);
    ``balance``, the rule of :func:`~sketchfisher.compress.sketch_scores.prepare_block` where task B runs once (two
    passes per task balance by both tasks' Σ|g|). The scores are exact under any recipe; a store's reader must form
    its centres by the recipe its sketches were made with."""

    sides: Any
    balance: str


RECIPE = Recipe("fp8", "fisher")
"""Today's recipe (store format 11 on)."""


def recipe_of(format_version: int) -> Recipe:
    """The recipe a store of ``format_version`` was collected with."""
    if format_version >= 11:
        return RECIPE
    return Recipe(torch.bfloat16 if format_version >= 9 else None, "abs")



def compacted_statistics(layout: Layout | bool) -> tuple[str, ...]:
    """The statistics a run rounds to bf16 once final (:meth:`~sketchfisher.fisher.FisherStats.compact`):
    Σ|g| and Σg, which only balance and centre the sketches, unless the layout's MLP or linear units
    also read exact task means from them (``layout``: the layout, or whether it has units beyond heads)."""
    beyond = layout if isinstance(layout, bool) else layout.beyond_heads
    return () if beyond else ("abs", "sum")


def statistics_dtypes(quantities: Iterable[str], layout: Layout | bool, dtype: torch.dtype) -> list[torch.dtype]:
    """The precision each kept statistic is written in (bf16 for the compacted ones and a bf16 accumulator's)."""
    return [final for _, final in kept_dtypes(quantities, dtype, compacted_statistics(layout))]


def sketch_batches(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: SideCodec,
                   preps: Preps, side: Side, count: int, cfg: ScoreConfig, skip: Skip = lambda i: False,
                   desc: str = "pass 2", show_progress: bool = False,
                   fold: Optional[FisherStats] = None) -> Iterator[tuple[int, int, dict]]:
    """Pass 2 over one task, batch by batch: ``(batch index, batch size, {(layer, block): (sketches
    [B, H_b, k], ‖x̃‖² [B, H_b], cross [B, H_b], scaled centring's γ [B, H_b][, conflict scalars [B, H_b, m]])})``;
    the conflict scalars
    ``g · u`` (exact) where the preparation has the other task's mean gradient. Batches for which ``skip(index)`` is true are
    not run (resumption) and yield nothing. ``count`` is task A's sample count. ``fold``, when given, are
    statistics that every batch is also folded into (pass-1 statistics in the same pass): on the fused path
    from the per-sample gradient that the sketches read, formed once per module."""
    keys = [key for key, prep in preps.items() if prep is not None]
    weights = sorted({layout.param_of(*key) for key in keys})
    fused = codec.fused_sides(layout, cfg, side)
    check = LaggedFiniteCheck(desc, cfg)
    # each (layer, block) once: its head blocks, module and weight (224 blocks a batch at 7B), grouped by layer
    where = [(key, hbs, hbs[0].module_name, layout.param_of(*key))
             for key in keys for hbs in [layout.head_blocks(*key)]]
    head_blocks = {key: hbs for key, hbs, _, _ in where}
    layers = layer_parts(where)
    work = LayerWork(fold, fused, preps)  # (the fused path: gradients in buffers, each layer's launches recorded)
    try:  # (on the fused path, the preparations go back to their own order however the pass ends)
        for index, bf in factor_pass(model, loss_fn, batches, weights, skip=skip, desc=desc,
                                     show_progress=show_progress):
            folded = set()
            out = {}
            with fp32_reductions():  # (bf16 products of the per-sample gradients: set once for the batch's modules)
                for parts in layers:
                    if fused is not None and fused.applies(bf.A[parts[0].module]):
                        # (scaled-centred in the kernel; the conflict scalars and the statistics from the same read)
                        out.update(work.run(bf, parts))
                        folded.update(p.weight for p in parts if fold is not None)
                        continue
                    for part in parts:
                        for key in part.blocks:
                            g = block_gradients(bf, part.module, head_blocks[key])  # (what the statistics saw)
                            out[key] = _torch_sides(g, key, prep_on(preps, key, g.device), side, count, cfg, codec)
                if fold is not None:  # (the torch path, and weights whose blocks were not sketched: from the factors)
                    fold_factors(fold, bf, [w for w in weights if w not in folded], low=True,
                                 into=work.buffers.slot(bf.batch_size, 0), replays=work.statistics)
            bf.settle()  # finite factors before the consumer sees the batch (its work on the device is queued)
            check.submit(index, out)
            yield index, bf.batch_size, out
        check.finish()
    finally:
        if fused is not None:
            fused.close()


def _torch_sides(g: torch.Tensor, key: tuple, prep, side: Side, count: int, cfg: ScoreConfig,
                 codec: SideCodec) -> tuple:
    """One (layer, block)'s sides on the torch path, from its head blocks' gradients ``g``: what the fused kernel
    gives (:func:`sketch_batches`)."""
    layer, block = key[0], block_index(key[1])
    v = side_vector(g, prep, side, count, cfg)
    sk, norm2, cross, own = sketch_sides(v, prep, side, codec, layer, block)
    conflict = conflict_scalars(g, prep, side, cfg.dtype)
    sk, norm2, gamma = scale_centring(sk, norm2, own, prep, side, codec, layer, block)
    return (sk, norm2, cross, gamma, *([] if conflict is None else [conflict]))


def check_reiterable(**tasks: Iterable[Any]) -> None:
    """Two-pass collection needs tasks it can iterate twice (a list or a DataLoader, not a generator)."""
    for name, task in tasks.items():
        if iter(task) is task:
            raise InputError(f"{name} is a one-shot iterator; Sketch needs two passes, pass a list or a DataLoader")


def pass_b(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: SideCodec,
           cfg: ScoreConfig, preps: Preps, count_a: int, quantities: tuple[str, ...], stats_dtype: torch.dtype,
           emit: Callable[[int, int, dict], None], skip: Skip = lambda i: False, show_progress: bool = False,
           reduce: Optional[Callable[[FisherStats], FisherStats]] = None, desc: str = "pass B") -> FisherStats:
    """Task B's only pass: each batch's sketches go to ``emit(index, size, blocks)`` as they are made; the pass's
    statistics are returned, checked (``reduce`` first merges other ranks') and rounded as final
    (:func:`compacted_statistics`). Sketches not centred during the pass are centred once B's centre is known
    (:func:`centre_j_side`, :func:`centred`)."""
    stats_b = FisherStats.accumulating(stats_dtype, quantities)
    for batch in sketch_batches(model, loss_fn, batches, layout, codec, preps, "b", count_a, cfg, skip=skip,
                                desc=desc, show_progress=show_progress, fold=stats_b):
        emit(*batch)
    if reduce is not None:
        stats_b = reduce(stats_b)
    if stats_b.count == 0:
        raise InputError(f"{desc}: the task yielded no samples")
    stats_b.check_finite(desc)
    return stats_b.compact(compacted_statistics(layout))


def centred(blocks: dict, centres: dict) -> dict:
    """Task B's uncentred sketches ``{key: (R y'_j, ‖·‖², cross)}`` (a batch, or more) centred by linearity,
    row by row (so a batch at a time or all at once give the same values):
    ``(R y'_j − R ȳ', ‖R ỹ_j‖², cross)``; the cross term ``⟨y'_j, x̄'⟩`` was exact already."""
    out = {}
    for key, (vec, _, cross, *rest) in blocks.items():  # (rest: γ = 0 here, the conflict scalars, exact already)
        if centres[key] is None:  # centred during the pass already
            out[key] = blocks[key]
            continue
        vec = vec - centres[key].to(vec.device, vec.dtype)
        out[key] = (vec, vec.square().sum(-1), cross, *rest)
    return out


def centre_j_side(layout: Layout, codec: SideCodec, cfg: ScoreConfig, preps: Preps, stats_b: FisherStats,
                  keep: tuple[str, ...] = (), stats_a: Optional[FisherStats] = None,
                  staging: Optional[HostStaging] = None) -> tuple[dict, dict]:
    """After the single pass over task B: ``(centres, residuals)`` per block. ``centres``: ``R ȳ' [1, H_b, k]`` to
    subtract from B's uncentred sketches (centring by the mean), or None where B was centred during its pass by
    multiples of x̄' (scaled centring); for those, ``residuals`` holds B's mean residual
    (:func:`~sketchfisher.compress.sketch_scores.residual_centre`), which the scores take away from B's sketches.
    Each preparation gains B's own ``ȳ'`` and ``e`` (and, where task B kept Σg, the conflict weight ``u_a =
    ḡ_B/(Î+ε+λ)``) and drops ``w_b`` and task B's conflict weights (not needed again), and gets back ``w_a`` from task A's Fisher in ``stats_a``
    where B's pass ran without it (one parameter's Fisher on the device at a time); B's statistics are released
    parameter by parameter (those in ``keep`` to host memory, into ``staging``'s buffers when given)."""
    keys = [key for key, prep in preps.items() if prep is not None]
    last_use = {layout.param_of(*key): key for key in keys}
    centres, residuals = {}, {}
    held: dict = {}  # task A's statistics of one parameter on the preparations' device (what: tensor)
    # (each parameter's statistics of task A come over while the device finishes the parameter before)
    ahead = CopiesAhead([layout.param_of(*key) for key in keys],
                        lambda name, what: stats_a.fisher(name) if what == "fisher" else stats_a.sum_g[name])

    def of_a(key, what: str, device: torch.device) -> torch.Tensor:
        if stats_a is None or what not in stats_a.quantities:
            raise InputError(f"task A's {'Fisher' if what == 'fisher' else 'mean gradient'} is needed to finish the "
                             "preparations after task B's pass")
        name = layout.param_of(*key)
        if held.get("name") != name:
            held.clear()
            held["name"] = name
        if what not in held:
            moved = ahead.get(name, what, device)
            held[what] = moved if what == "fisher" else stats_a.mean_grad(name, moved=moved)
        return layout.gather(*key, held[what].unsqueeze(0))[0]

    with overlapped(staging):  # (B's statistics leave while task A's come back for the next parameter)
        for key in keys:
            _centre_block(key, preps, layout, codec, cfg, stats_b, of_a, centres, residuals)
            name = layout.param_of(*key)
            if last_use[name] == key:
                stats_b.offload(name, keep=keep, copy=staging.copy if staging is not None else host_copy)
    stats_b.settle(keep)
    return centres, residuals


def overlapped(staging: Optional[HostStaging]):
    """``staging``'s overlapped copies (:meth:`~sketchfisher.fisher.HostStaging.overlapped`), or nothing."""
    return staging.overlapped() if staging is not None else contextlib.nullcontext()


def _centre_block(key, preps: Preps, layout: Layout, codec: SideCodec, cfg: ScoreConfig, stats_b: FisherStats,
                  of_a: Callable, centres: dict, residuals: dict) -> None:
    """:func:`centre_j_side` for one (layer, block)."""
    prep = preps[key]
    if prep.w_a is None:
        prep = rebuild_a_weight(prep, of_a(key, "fisher", prep.device), cfg)
    during = prep.y_bar is not None  # centred during the pass by multiples of x̄' (scaled centring)
    prep = with_j_centre(prep, stats_b.block(layout, *key, MEAN_ACCESSOR[MEAN_OF[cfg.spec.j_side]]))
    if during:  # B's sketches are final: its mean residual is taken away when scoring
        centres[key], residuals[key] = None, residual_centre(prep, codec, *key)
    else:  # ȳ' = mean_j f_j(g_j) · w_b, balanced as the pass was
        centres[key] = codec.apply_heads(key[0], block_index(key[1]), values(prep.y_bar, cfg.dtype)[None])
    if "sum" in stats_b.quantities:
        mean_b = stats_b.block(layout, *key, "mean_grad").to(prep.device)
        weighted = mean_b * prep.inverse_denominator()
        mean_a = of_a(key, "sum", prep.device) if prep.u_b is not None else None  # (T from the exact means)
        moments = conflict_moments({"a": mean_a, "b": mean_b}, {"b": weighted}, prep.moments)
        prep = dataclass_replace(prep, u_a=narrower(weighted[None], CONFLICT_WEIGHT_DTYPE), moments=moments)
        del weighted, mean_a, mean_b
    preps[key] = dataclass_replace(prep, w_b=None, u_b=None)  # (B's conflict weights: B's pass is over)


def centre_products(preps: Preps) -> dict[tuple[int, str], torch.Tensor]:
    """``e = ⟨x̄', ȳ'⟩ [H_b]`` per collected block: what sketched scores need of the preparations."""
    return {key: prep.e for key, prep in preps.items() if prep is not None}


def mean_moments(preps: Preps) -> dict[tuple[int, str], dict]:
    """Per collected block, the task means' Fisher-weighted products the conflict test needs (where kept)."""
    return {key: prep.moments for key, prep in preps.items() if prep is not None and prep.moments}


__all__ = ["Preps", "centre_j_side", "centre_products", "centred", "mean_moments", "check_reiterable", "compacted_statistics",
           "host_staging", "pass_b", "prepare", "prepare_all", "RECIPE", "Recipe", "recipe_of",
           "sketch_batches", "statistics_dtypes"]
