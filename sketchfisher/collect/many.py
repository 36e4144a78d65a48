"""Many tasks, each collected once: one statistics pass and one sketch pass per task, paired afterwards in
any order.

A pair's sketches depend on the other task in three places: the balance (a per-entry weight moved from one
side to the other), the centres, and the cross terms with the other side's centre. Each can be made to
depend on one task alone:

* **the balance is shared**, taken from all tasks' statistics pooled (any positive per-entry weight keeps
  the scores exact, :func:`sketchfisher.compress.sketch_scores.prepare_block`): task t's i-side vectors are
  ``x'_i = f_i(g_i) · β / (Î_t + ε + λ)`` (normaliser ``"a"``: the i-side task's own Fisher) and its j-side
  vectors ``y'_j = f_j(g_j) / β``, whatever the partner;
* **each task is centred by its own means** ``x̄'_t`` and ``ȳ'_t``, scaled per sample (scaled centring,
  exact with any direction);
* **each sample keeps its exact cross term with every task's centre** (one scalar per task and unit block),
  so a pair (A, B) reads ``⟨x'_i, ȳ'_B⟩`` and ``⟨x̄'_A, y'_j⟩`` from its columns, and ``e = ⟨x̄'_A, ȳ'_B⟩``
  comes from the centres.

The conflict test's per-sample scalars are kept the same way: as task A of a pair, ``g_i · ḡ_u W_t`` for
every task u; as task B, ``g_j · ḡ_s W_s`` and ``g_j · ḡ_s^half W_s`` for every task s (``W_t = 1/(Î_t + ε +
λ)``). Every task's sketches are made in one pass once all tasks' statistics are known, so N tasks take 2N
passes, and adding a task later takes its two passes plus one pass over every earlier task (their cross
terms and conflict scalars against the new task's centre and mean). The computation is the torch path, with
every task's statistics in memory and, while the sketch passes run, each task's mean gradient and its two
weighted means in the score dtype: about 3N model-sized tensors beside the statistics (models whose N tasks fit
the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..capture.oracle import LossFn
from ..compress import SketchSide
from ..compress.sketch import Sketch
from ..compress.sketch_scores import (BlockPrep, abs_balance, balances_by_fisher, fisher_balance, scale_centring,
                                     side_vector, sketch_sides)
from ..errors import InputError
from ..fisher import MEAN_ACCESSOR, QUANTITIES, FisherStats
from ..layout import Layout, block_index
from ..metric import MEAN_OF, ScoreConfig, shift
from .passes import block_gradients, factor_pass
from .stage1 import collect


@dataclass
class TaskSketches:
    """Every task's statistics and both sides' sketches (``sides[t]["a"]``: task t as the i-side, ``["b"]`` as the
    j-side; cross terms and conflict scalars have one column per task, in ``names`` order) and each task's
    per-block preparation (balance, centres)."""

    names: list[str]
    stats: dict[str, FisherStats]
    sides: dict[str, dict[str, SketchSide]]
    preps: dict[str, dict[tuple[int, str], BlockPrep]] = field(repr=False)


def check_tasks(tasks: Mapping[str, Iterable[Any]], codec: Any, cfg: ScoreConfig) -> list[str]:
    """The task names, once the settings are checked."""
    names = list(tasks)
    if len(names) < 2:
        raise InputError(f"many-task collection needs at least 2 tasks, got {len(names)}")
    if any(not isinstance(n, str) or not n for n in names):
        raise InputError(f"task names must be non-empty strings, got {names}")
    if not isinstance(codec, Sketch):
        raise InputError(f"collecting each task once needs sketches (sf.Sketch); got {codec!r}: exact codecs keep every "
                         "gradient and pair with sf.analyze directly")
    if cfg.normalizer != "a":
        raise InputError(f"collecting each task once needs normalizer='a' (each pair's denominator from its task A); "
                         f"got {cfg.normalizer!r}")
    for name in names:
        task = tasks[name]
        if iter(task) is task:
            raise InputError(f"task {name!r} is a one-shot iterator; it is iterated twice: pass a list or a DataLoader")
    return names


def _pooled(stats: dict[str, FisherStats], layout: Layout, key: tuple[int, str], what: str) -> torch.Tensor:
    """A statistic's mean over every task's samples pooled, ``[H_b, S]``."""
    total = sum(s.count for s in stats.values())
    return sum(s.block(layout, *key, what).double() * (s.count / total) for s in stats.values())


def prepare_tasks(layout: Layout, stats: dict[str, FisherStats], cfg: ScoreConfig, codec: Sketch
                  ) -> dict[str, dict[tuple[int, str], BlockPrep]]:
    """Each task's per-block preparation against the shared balance: ``w_a`` from its own Fisher, ``w_b``
    shared, ``x̄'`` and ``ȳ'`` its own means (None without variance reduction)."""
    names = list(stats)
    first = stats[names[0]]
    out: dict[str, dict] = {t: {} for t in names}
    for key in layout.groups():
        if layout.param_of(*key) not in first.welford:
            continue
        if not codec.variance_reduction:
            balance = None
        elif balances_by_fisher(cfg):
            pooled = _pooled(stats, layout, key, "fisher")
            balance = fisher_balance(pooled + shift(pooled, cfg), cfg)
        else:
            balance = abs_balance(_pooled(stats, layout, key, "mean_abs"), None, 0, 0)
        for t in names:
            fisher = stats[t].block(layout, *key, "fisher").double()
            denom = fisher + shift(fisher, cfg)
            zeros = torch.zeros(fisher.shape[0], dtype=torch.float64, device=fisher.device)
            if balance is None:
                out[t][key] = BlockPrep(denom.reciprocal().to(cfg.dtype), None, None, None, zeros)
                continue
            w_a, w_b = (balance / denom).to(cfg.dtype), balance.reciprocal().to(cfg.dtype)
            x_bar = (stats[t].block(layout, *key, MEAN_ACCESSOR[MEAN_OF[cfg.spec.i_side]]).double() * balance
                     / denom).to(cfg.dtype)
            y_bar = (stats[t].block(layout, *key, MEAN_ACCESSOR[MEAN_OF[cfg.spec.j_side]]).double()
                     / balance).to(cfg.dtype)
            out[t][key] = BlockPrep(w_a, w_b, x_bar, y_bar, zeros)
    return out


def denominator(stats: FisherStats, layout: Layout, key: tuple[int, str], cfg: ScoreConfig) -> torch.Tensor:
    """``W = 1 / (Î + ε + λ)`` of one task and block, fp64."""
    fisher = stats.block(layout, *key, "fisher").double()
    return (fisher + shift(fisher, cfg)).reciprocal()


def conflict_weights(layout: Layout, stats: dict[str, FisherStats], key: tuple[int, str], cfg: ScoreConfig):
    """``(W_t [N, H_b, S], ḡ_t [N, H_b, S], ḡ_t W_t and ḡ_t^half W_t [N, 2, H_b, S])`` of one block, fp64."""
    w, g, half = [], [], []
    for s in stats.values():
        w.append(denominator(s, layout, key, cfg))
        g.append(s.block(layout, *key, "mean_grad").double())
        half.append(s.block(layout, *key, "mean_grad_half").double())
    w, g, half = torch.stack(w), torch.stack(g), torch.stack(half)
    return w, g, torch.stack([g * w, half * w], 1)


def collect_tasks(model: nn.Module, loss_fn: LossFn, tasks: Mapping[str, Iterable[Any]], layout: Layout,
                  codec: Sketch, cfg: ScoreConfig, stats_dtype: Optional[torch.dtype] = None,
                  show_progress: bool = False) -> TaskSketches:
    """Collect every task once (:mod:`this module <sketchfisher.collect.many>`): a statistics pass over each task,
    then one sketch pass over each, forming both sides' sketches with their cross terms and conflict scalars
    against every task."""
    names = check_tasks(tasks, codec, cfg)
    codec.check_layout(layout)
    quantities = tuple(q for q in QUANTITIES if q in {"fisher", "abs", "sum", "half", MEAN_OF[cfg.spec.i_side],
                                                      MEAN_OF[cfg.spec.j_side]})
    stats = {}
    for t in names:
        _, stats[t] = collect(model, loss_fn, tasks[t], layout, codec, stats_dtype=stats_dtype, quantities=quantities,
                              desc=f"pass 1 {t}", show_progress=show_progress)
        if stats[t].count < 2:
            raise InputError(f"task {t!r} yielded {stats[t].count} sample(s); each task needs at least 2")
    preps = prepare_tasks(layout, stats, cfg, codec)
    keys = list(preps[names[0]])
    centres = {key: (torch.stack([preps[t][key].x_bar for t in names]), torch.stack([preps[t][key].y_bar for t in names]))
               for key in keys if preps[names[0]][key].x_bar is not None}
    # each task's mean and its two weighted means, kept in the score dtype (3N model-sized tensors); a task's own
    # denominator W_t is formed per pass
    weights = {key: tuple(x.to(cfg.dtype) for x in conflict_weights(layout, stats, key, cfg)[1:]) for key in keys}
    sides = {t: {"a": SketchSide(codec), "b": SketchSide(codec)} for t in names}
    params = sorted({layout.param_of(*key) for key in keys})
    for t in names:
        own_w = {key: denominator(stats[t], layout, key, cfg).to(cfg.dtype) for key in keys}  # W_t
        for _, bf in factor_pass(model, loss_fn, tasks[t], params, desc=f"pass 2 {t}", show_progress=show_progress):
            out: dict[str, dict] = {"a": {}, "b": {}}
            for key in keys:
                hbs = layout.head_blocks(*key)
                module = hbs[0].module_name
                g = block_gradients(bf, module, hbs)  # (what the statistics saw)
                prep = preps[t][key]
                mean, weighted = (x.to(g.device) for x in weights[key])
                gd = g.to(cfg.dtype)
                conflict = {"a": torch.einsum("bhs,uhs->bhu", gd * own_w[key].to(g.device), mean),  # g_i·ḡ_u W_t, every u
                            "b": torch.einsum("bhs,uchs->bhuc", gd, weighted)}          # g_j · ḡ_s W_s, its half
                for side in ("a", "b"):
                    v = side_vector(g, prep, side, stats[t].count, cfg)
                    sk, norm2, _, own = sketch_sides(v, prep, side, codec, key[0], block_index(key[1]))
                    others = centres.get(key)
                    cross = (torch.zeros(*v.shape[:2], len(names), dtype=v.dtype, device=v.device) if others is None
                             else torch.einsum("bhs,uhs->bhu", v, others[1 if side == "a" else 0].to(v)))
                    sk, norm2, gamma = scale_centring(sk, norm2, own, prep, side, codec, key[0], block_index(key[1]))
                    out[side][key] = (sk, norm2, cross, gamma, conflict[side])
            for side in ("a", "b"):
                sides[t][side].add_batch(out[side])
                sides[t][side].n += bf.batch_size
        if sides[t]["a"].n != stats[t].count:
            raise InputError(f"task {t!r}: its sketch pass saw {sides[t]['a'].n} samples but its statistics counted "
                             f"{stats[t].count}: the task must yield the same batches on every pass")
    return TaskSketches(names, stats, sides, preps)


__all__ = ["TaskSketches", "check_tasks", "collect_tasks", "conflict_weights", "denominator", "prepare_tasks"]
