"""The one executor of a :class:`~sketchfisher.collect.plan.PassPlan`: each step's maths is here, what is
kept or written is a *sink*'s.

:func:`execute` walks the plan's steps, each inside a :class:`~sketchfisher.phases.PhaseLog` phase of the
step's name, and hands every product to the sink: :class:`MemorySink` keeps the representations and side
vectors in memory (``sf.analyze``); :class:`sketchfisher.store.writer.StoreSink` checkpoints statistics,
writes shards and skips what a killed run already wrote. Changing the order of the passes is a change of
the plan only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..capture.oracle import LossFn
from ..compress import Codec, SketchSide
from ..errors import InputError
from ..fisher import FisherStats, HostStaging
from ..layout import Layout
from ..metric import MEAN_OF, ScoreConfig
from ..phases import PhaseLog
from .passes import Skip
from .fit import check_plan_fits
from .memory import layout_units
from .plan import PassPlan, Step, pass_plan
from .sketches import Preps, centre_j_side, centre_products, centred, compacted_statistics, mean_moments, pass_b
from .sketches import prepare_all
from .sketches import sketch_batches
from .stage1 import collect

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """What every step of one collection shares."""

    model: nn.Module
    loss_fn: LossFn
    tasks: dict[str, Iterable[Any]]
    layout: Layout
    codec: Codec
    cfg: ScoreConfig
    stats_dtype: torch.dtype
    log: PhaseLog
    show_progress: bool = False
    modules: str = "attention"


@dataclass
class State:
    """What the steps have produced so far: each task's final statistics, the preparations, task B's
    uncentred side vectors between its single pass and its centring."""

    stats: dict[str, FisherStats] = field(default_factory=dict)
    preps: Optional[Preps] = None
    raw: dict[str, list] = field(default_factory=dict)
    e: dict = field(default_factory=dict)
    moments: dict = field(default_factory=dict)
    residual: dict = field(default_factory=dict)  # task B's mean residual per block (single pass, scaled centring)


class Sink:
    """Where a collection's products go. ``keep``: the statistics kept (in host memory) once the preparation
    consumed them; ``staging``: host buffers for statistics leaving the device (or None)."""

    keep: tuple[str, ...] = ()
    keep_a: tuple[str, ...] = ()  # what task A's statistics keep besides before B's single pass (:meth:`a_fisher`)
    staging: Optional[HostStaging] = None

    def fold(self, step: Step, job: Job, quantities: tuple[str, ...]) -> FisherStats:
        """Run a statistics pass (and keep a one-pass codec's representation); its statistics."""
        raise NotImplementedError

    def batches(self, task: str, job: Job) -> Iterable[Any]:
        """The batches of a pass over ``task``."""
        return job.tasks[task]

    def skip(self, task: str) -> Skip:
        """Batches of ``task`` this run does not compute (written already, another rank's)."""
        return lambda index: False

    def reduce(self, job: Job) -> Optional[Callable[[FisherStats], FisherStats]]:
        """Merges the statistics of several ranks (None: one process)."""
        return None

    def final_statistics(self, task: str) -> Optional[FisherStats]:
        """A task's final statistics written by an earlier run (None: none; they are computed now)."""
        return None

    def statistics_final(self, task: str, stats: FisherStats) -> None:
        """A task's statistics are final (compacted)."""

    def a_fisher(self, state: "State") -> Optional[FisherStats]:
        """Task A's statistics holding its Fisher (and its Σg, where kept) once the preparation consumed them (the
        single pass over task B runs without ``w_a``, built again from it afterwards, and the conflict test's T is
        formed from A's exact mean)."""
        return state.stats.get("a")

    def sides(self, task: str, index: int, size: int, blocks: dict) -> None:
        """A batch's centred side vectors ``{(layer, block): (vectors, ‖·‖², cross)}``."""
        raise NotImplementedError

    def centred(self, task: str, raw: list, centres: dict) -> None:
        """A single pass's uncentred batches ``[(index, size, blocks)]`` and each block's centre ``R ȳ'``."""
        for index, size, blocks in raw:
            self.sides(task, index, size, centred(blocks, centres))

    def flush(self) -> None:
        """Wait for what is still being written."""


def check_job(plan: PassPlan, job: Job, conflicts: Optional[bool] = None) -> PassPlan:
    """Everything cheap about a collection, before its first batch: tasks that are iterated more than once
    can be, the codec takes the layout, and the plan fits the device. Returns the plan to run: with
    ``conflicts=None`` (the default), a plan whose conflict-test statistics alone would not fit the device is
    run without them, with a warning saying so (``res.head_conflicts()`` then says how to get them); an
    explicit ``True`` refuses instead."""
    from .sketches import check_reiterable

    check_reiterable(**{f"task_{t}": job.tasks[t] for t in job.tasks if plan.passes_over(t) > 1})
    job.codec.check_layout(job.layout)
    fits = lambda p: check_plan_fits(job.model, p, job.codec, job.cfg, job.stats_dtype,  # noqa: E731
                                     job.tasks["a"], job.tasks["b"], layout_units(job.layout))
    try:
        fits(plan)
        return plan
    except InputError as exc:
        if conflicts is not None or not plan.conflicts or not job.codec.two_pass:
            raise
        lighter = pass_plan(job.codec, job.cfg, plan.passes, plan.means, conflicts=False)
        lighter = lighter.with_writes() if "writes" in plan.names else lighter
        fits(lighter)  # (refuses with its own numbers when even this does not fit)
        numbers, _, hints = str(exc).partition(". What would fit: ")
        keep = [h for h in hints.split("; ") if h and "conflicts=False" not in h]
        logger.warning("collecting without the conflict test's statistics, which would not fit the device (%s); "
                       "res.head_conflicts() will refuse this collection. With the test, what would fit: %s",
                       numbers, "; ".join(keep) or "more or larger devices")
        return lighter


def execute(plan: PassPlan, job: Job, sink: Sink) -> State:
    """Run ``plan``'s steps in order, each logged as a phase of its name; the final :class:`State`."""
    state = State()
    for step in plan.steps:
        with job.log.phase(step.name):
            STEPS[step.kind](step, plan, job, sink, state)
    if state.preps is not None:
        state.e, state.moments = centre_products(state.preps), mean_moments(state.preps)
        state.preps = None
    return state


def _fold(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    stats = sink.fold(step, job, plan.statistics[step.task])
    state.stats[step.task] = stats.compact(compacted_statistics(job.layout))  # (read from a store: rounded already)
    sink.statistics_final(step.task, state.stats[step.task])


def _prepare(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    # the statistics leave the device as they are consumed: those the sink keeps to host memory
    state.preps = prepare_all(job.layout, state.stats["a"], state.stats.get("b") if step.centre_b else None,
                              job.cfg, job.codec, offload=True, keep=sink.keep, staging=sink.staging,
                              balance_from_a=step.balance == "a", keep_a=sink.keep_a)


def _fold_sketch(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    # centred during the pass (by a direction from task A): each batch goes to the sink at once, else it is kept
    # uncentred until the centring step
    direct = all(p.y_bar is not None for p in state.preps.values() if p is not None)
    kept: list = []
    emit = (lambda index, size, blocks: sink.sides(step.task, index, size, blocks)) if direct else \
        (lambda *batch: kept.append(batch))
    known = sink.final_statistics(step.task)
    if known is not None:  # an earlier run's pass wrote them: only the batches whose sides are missing run again
        for batch in sketch_batches(job.model, job.loss_fn, sink.batches(step.task, job), job.layout, job.codec,
                                    state.preps, step.task, state.stats["a"].count, job.cfg,
                                    skip=sink.skip(step.task), desc=step.name, show_progress=job.show_progress):
            emit(*batch)
        state.raw[step.task] = kept
        state.stats[step.task] = known
        sink.statistics_final(step.task, known)
        return
    stats = pass_b(job.model, job.loss_fn, sink.batches(step.task, job), job.layout, job.codec, job.cfg,
                   state.preps, state.stats["a"].count, plan.statistics[step.task], job.stats_dtype, emit,
                   skip=sink.skip(step.task), show_progress=job.show_progress, reduce=sink.reduce(job),
                   desc=step.name)
    state.raw[step.task], state.stats[step.task] = kept, stats
    sink.statistics_final(step.task, stats)


def _centre(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    centres, state.residual = centre_j_side(job.layout, job.codec, job.cfg, state.preps, state.stats[step.task],
                                            sink.keep, stats_a=sink.a_fisher(state), staging=sink.staging)
    sink.centred(step.task, state.raw.pop(step.task), centres)


def _sketch(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    for index, size, blocks in sketch_batches(job.model, job.loss_fn, sink.batches(step.task, job), job.layout,
                                              job.codec, state.preps, step.task, state.stats["a"].count, job.cfg,
                                              skip=sink.skip(step.task), desc=step.name,
                                              show_progress=job.show_progress):
        sink.sides(step.task, index, size, blocks)


def _writes(step: Step, plan: PassPlan, job: Job, sink: Sink, state: State) -> None:
    sink.flush()


STEPS: dict[str, Callable[[Step, PassPlan, Job, Sink, State], None]] = {
    "fold": _fold, "prepare": _prepare, "fold_sketch": _fold_sketch, "centre": _centre, "sketch": _sketch,
    "writes": _writes}


class MemorySink(Sink):
    """``sf.analyze``'s sink: one-pass representations and both sides' side vectors in memory. Task A's
    Fisher (and, for MLP/linear units, both tasks' side means) stay in host memory after the preparation:
    exact re-scoring and pair means read them."""

    def __init__(self, job: Job, staging: Optional[HostStaging] = None):
        self.staging = staging  # (may be set later, before the collection runs)
        means = (MEAN_OF[job.cfg.spec.i_side], MEAN_OF[job.cfg.spec.j_side]) if job.layout.beyond_heads else ()
        self.keep = tuple(dict.fromkeys(("fisher", *means)))
        self.keep_a = ("sum",)  # (A's statistics stay in the state: the conflict test's T after B's single pass)
        self.reps: dict[str, Any] = {}
        self.side = {t: SketchSide(job.codec) for t in job.tasks} if job.codec.two_pass else {}

    def fold(self, step: Step, job: Job, quantities: tuple[str, ...]) -> FisherStats:
        rep, stats = collect(job.model, job.loss_fn, job.tasks[step.task], job.layout, job.codec,
                             modules=job.modules, desc=step.name, show_progress=job.show_progress,
                             stats_dtype=job.stats_dtype, quantities=quantities)
        self.reps[step.task] = rep
        return stats

    def sides(self, task: str, index: int, size: int, blocks: dict) -> None:
        self.side[task].add_batch(blocks)
        self.side[task].n += size

    def centred(self, task: str, raw: list, centres: dict) -> None:
        if not raw:  # (centred during the pass, and kept as it went)
            return
        # a block's batches at once: a few large operations, not many small ones
        for key, centre in centres.items():
            whole = tuple(torch.cat(t) for t in zip(*(blocks.pop(key) for _, _, blocks in raw)))
            self.side[task].add(key, *centred({key: whole}, {key: centre})[key])
        self.side[task].n += sum(size for _, size, _ in raw)

    def check_counts(self, state: State) -> None:
        """Every pass over a task saw the samples its statistics counted."""
        for task, side in self.side.items():
            if side.n != state.stats[task].count:
                raise InputError(f"task {task.upper()}: a pass saw {side.n} samples but its statistics counted "
                                 f"{state.stats[task].count}: the task must yield the same batches on every pass")


__all__ = ["Job", "MemorySink", "STEPS", "Sink", "State", "check_job", "execute"]
