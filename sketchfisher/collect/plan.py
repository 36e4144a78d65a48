"""The pass plan: one declarative description of a collection, from which everything else is derived.

A :class:`PassPlan` is the ordered list of :class:`Step` s a collection runs — which passes, over which
task, folding which statistics, writing which per-sample outputs — and nothing else spells the order out:
``sf.analyze`` and the store writer execute it (:func:`sketchfisher.collect.runner.execute`, with an
in-memory or a store sink; a resumed store runs the same plan, its sink skipping what is written), the planner predicts each
step's device memory (:func:`sketchfisher.collect.memory.plan_phases`) and the :class:`~sketchfisher.phases.PhaseLog`
records each step under the step's name, so the predicted and the measured phase tables have the same rows.

The orders (``passes``):

* one-pass codecs (Exact, Factors): ``pass 1 A``, ``pass 1 B`` (statistics and representation together);
* ``2``: ``pass 1 A``, ``pass 1 B`` (statistics), ``preparation`` (balance from both tasks, both centres),
  ``pass 2 A``, ``pass 2 B`` (side vectors);
* ``1.5`` (task B once): ``pass 1 A``, ``preparation`` (from task A alone), ``pass B`` (B's statistics and
  its uncentred side vectors together), ``centring B``, ``pass 2 A``.

A store appends ``writes`` (what the disk still owes once the device is done).

Why task B can be collected in one pass (``1.5``, 1.5 passes per task for |A| = |B| instead of 2). With
normaliser ``"a"`` the denominator comes from task A alone. The balance (any positive per-entry weight keeps
the estimator unbiased) is taken from task A's Σ|g| alone, so B's side vectors ``y'_j`` are known during B's
only pass; that pass also folds B's statistics. Centring is linear: ``R(y'_j − ȳ') = R y'_j − R ȳ'``, so B's
side vectors are kept unquantised and centred once ``ȳ'`` (B's mean transform, balanced) is known after the
pass; the cross term ``⟨y'_j, x̄'⟩`` needs only A's centre and is exact during the pass. Task A's pass 2 then
has ``ȳ'`` for its exact cross terms ``⟨x'_i, ȳ'⟩`` and ``e = ⟨x̄', ȳ'⟩``. The one quantity that is not
exact is ``‖ỹ_j‖²``, which only the standard errors use: it is ``‖R ỹ_j‖²`` (unbiased, relative error about
√(2/k)). Scores equal the two-pass order's up to the different balance (same expectation; full-width srht
gives the exact scores: test).

Device memory of that order: the preparations (``w_a``, ``w_b``, ``x̄'``) are built from task A's statistics
before B's pass, parameter by parameter, while A's statistics leave the device; B's pass then holds them and
B's own statistics; after it each parameter's ``ȳ'`` replaces ``w_b`` and B's statistics, so A's pass 2 holds
three model-sized tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional

from ..errors import InputError
from ..fisher import QUANTITIES
from ..metric import MEAN_OF, ScoreConfig

StepKind = Literal["fold", "prepare", "fold_sketch", "centre", "sketch", "writes"]
PASS_ORDERS = (2, 1.5)


@dataclass(frozen=True)
class Step:
    """One step of a collection.

    * ``fold``: a pass over ``task`` folding its statistics (and, for one-pass codecs, its representation);
    * ``prepare``: the side vectors' preparation from the statistics (``balance``: ``"ab"`` from both tasks'
      Σ|g|, ``"a"`` from task A's alone; ``centre_b``: task B's centre is known now);
    * ``fold_sketch``: one pass over ``task`` folding its statistics and writing its uncentred side vectors;
    * ``centre``: centring those side vectors once the task's statistics are final;
    * ``sketch``: a pass over ``task`` writing its side vectors;
    * ``writes``: waiting for what the disk still owes (stores).
    """

    kind: StepKind
    name: str
    task: Optional[str] = None
    balance: str = "ab"
    centre_b: bool = True

    @property
    def is_pass(self) -> bool:
        """Whether the step runs the model over a task's batches."""
        return self.kind in ("fold", "fold_sketch", "sketch")


@dataclass(frozen=True)
class PassPlan:
    """The steps of one collection and the pass-1 statistics each task keeps."""

    passes: float
    steps: tuple[Step, ...]
    statistics: dict  # task -> tuple of QUANTITIES
    means: bool = False  # both tasks' side means kept (MLP and linear units)
    conflicts: bool = True  # the conflict test's statistics and per-sample scalars recorded

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def passes_over(self, task: str) -> int:
        return sum(s.is_pass and s.task == task for s in self.steps)

    def with_writes(self) -> "PassPlan":
        """The plan with a final ``writes`` step (a store's background writes)."""
        return replace(self, steps=(*self.steps, Step("writes", "writes")))


def needed_statistics(cfg: ScoreConfig, codec, means: bool = False, passes: float = 2,
                      conflicts: bool = False) -> dict[str, tuple[str, ...]]:
    """The pass-1 statistics (:data:`sketchfisher.fisher.QUANTITIES`) each task must keep for these settings.

    Task A always keeps its Fisher (the normaliser, and exact re-scoring); task B only for the pooled
    normaliser. The codec adds what it needs (:meth:`Codec.statistics <sketchfisher.compress.Codec.statistics>`:
    for sketches with variance reduction Σ|g| for balancing and each side's task mean for centring). The
    Welford M2 (variance across samples) is never needed for scores. ``means=True`` (MLP units) keeps the
    task means of both sides' transforms whatever the codec: they give every neuron's mean score over all
    pairs (:func:`sketchfisher.interference.pair_means.pair_means_from_statistics`). ``conflicts=True`` (side
    codecs) keeps both tasks' Σg until the preparation: each sample's conflict scalar against the other task's
    mean gradient is recorded in its side pass (:mod:`sketchfisher.interference.conflicts`; one-pass codecs
    have every gradient and need nothing more).
    """
    a, b = {"fisher"}, {"fisher"} if cfg.normalizer == "pooled" else set()
    if conflicts and codec.two_pass:  # the task means, and task A's in two halves (the test's variance)
        a |= {"sum", "half"}
        b.add("sum")
    if means:
        a.add(MEAN_OF[cfg.spec.i_side])
        b.add(MEAN_OF[cfg.spec.j_side])
    extra = codec.statistics(cfg, passes)
    a |= extra["a"]
    b |= extra["b"]
    return {"a": tuple(q for q in QUANTITIES if q in a), "b": tuple(q for q in QUANTITIES if q in b)}


def resolve_passes(passes: Optional[float], cfg: ScoreConfig, codec) -> float:
    """The pass order to run: ``passes`` checked, or for None the codec's default for ``cfg`` (1.5 for sketches
    with variance reduction and normaliser ``"a"``, else 2)."""
    orders = codec.pass_orders(cfg)
    if passes is None:
        return orders[0]
    if passes not in PASS_ORDERS:
        raise InputError(f"passes must be 2 or 1.5, got {passes!r}")
    if passes not in orders:
        raise InputError("passes=1.5 (task B once) needs normalizer='a' (the denominator from task A alone) and a "
                         f"sketch with variance reduction; got normalizer={cfg.normalizer!r}, codec {codec!r}")
    return passes


def pass_plan(codec, cfg: ScoreConfig, passes: Optional[float] = None, means: bool = False,
              conflicts: bool = True) -> PassPlan:
    """The plan of a collection with ``codec`` and ``cfg`` in the pass order ``passes`` (None: the default).
    ``means`` keeps both tasks' side means (MLP and linear units); ``conflicts`` records what the conflict
    test needs (:func:`needed_statistics`)."""
    passes = resolve_passes(passes, cfg, codec)
    stats = needed_statistics(cfg, codec, means=means, passes=passes, conflicts=conflicts)
    fold_a, fold_b = Step("fold", "pass 1 A", "a"), Step("fold", "pass 1 B", "b")
    if not codec.two_pass:
        steps = (fold_a, fold_b)
    elif passes == 2:
        steps = (fold_a, fold_b, Step("prepare", "preparation"), Step("sketch", "pass 2 A", "a"),
                 Step("sketch", "pass 2 B", "b"))
    else:
        steps = (fold_a, Step("prepare", "preparation", balance="a", centre_b=False),
                 Step("fold_sketch", "pass B", "b"), Step("centre", "centring B", "b"), Step("sketch", "pass 2 A", "a"))
    return PassPlan(passes, steps, stats, means, conflicts)


__all__ = ["PASS_ORDERS", "PassPlan", "Step", "needed_statistics", "pass_plan",
           "resolve_passes"]
