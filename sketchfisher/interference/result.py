"""``InterferenceResult``: Stage 6 scores as a lazily materialised tensor plus streaming views."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import pandas as pd
import torch

from ..errors import InputError
from ..layout import Layout
from ..metric import Provider, ScoreConfig
from ..phases import PhaseLog
from .context import ResultContext, provider_for
from .engine import DEFAULT_MAX_BYTES, assemble, iter_chunks

COLUMNS = ["block", "layer", "head", "sample_i", "sample_j", "score", "stderr"]  # attention; MLP units: "unit"


def columns(layout: Layout) -> list[str]:
    """The tidy score table's columns: ``head`` names the unit index for attention, ``unit`` for MLP units."""
    return [layout.unit_column if c == "head" else c for c in COLUMNS]


@dataclass
class InterferenceResult:
    """Stage 6 output over ``nA`` task-A and ``nB`` task-B samples.

    ``scores[i, j, layer, head, b]`` with ``b`` in (Q, K, V, O) order and samples in iteration order;
    NaN marks missing data; ``stderr`` has the same shape (0 for exact codecs). Both are computed on
    first access. ``head_means``, ``top_conflicts``, ``block_summary`` and ``sample_summary`` stream
    over (layer, block, row chunk) when the full tensor has not been materialised, so they work when
    it would not fit in memory. What counts as a conflict is the variant's
    (:attr:`ScoreConfig.spec`): for ``variant="signed"`` a *negative* score, for the others a large one.

    Results of ``sf.analyze`` and of stores are built by :meth:`from_context`; the plain
    constructor takes any score provider (benchmarks, tests).
    """

    layout: Layout
    n_a: int
    n_b: int
    provider: Provider
    cfg: ScoreConfig = field(default_factory=ScoreConfig)
    max_bytes: int = DEFAULT_MAX_BYTES
    context: Optional[ResultContext] = field(default=None, repr=False)
    _scores: Optional[torch.Tensor] = field(default=None, repr=False)
    _stderr: Optional[torch.Tensor] = field(default=None, repr=False)
    phases: Optional[PhaseLog] = field(default=None, repr=False)  # time and device memory per collection phase

    def __post_init__(self) -> None:
        self.layout.require_single("a result")

    @classmethod
    def from_context(cls, context: ResultContext, max_bytes: int = DEFAULT_MAX_BYTES,
                     family: Optional[str] = None) -> "InterferenceResult":
        """The result of a context (in memory or from a store): one constructor path for both. A context
        collected over several unit families gives the result of ``family`` (default: its first)."""
        layout = context.layout
        if layout.families:
            layout = layout.family(family or layout.families[0][0])
        elif family is not None:
            layout = layout.family(family)
        return cls(layout=layout, n_a=context.counts[0], n_b=context.counts[1],
                   provider=provider_for(context), cfg=context.cfg, max_bytes=max_bytes, context=context)

    @property
    def families(self) -> tuple[str, ...]:
        """The unit families collected together with this result (``("heads", "mlp")``, or its own)."""
        layout = None if self.context is None else self.context.layout
        return tuple(n for n, _ in layout.families) if layout is not None and layout.families else (
            self.layout.family_name,)

    def units(self, family: str) -> "InterferenceResult":
        """The result of another unit family collected in the same passes: ``res.units("mlp")`` gives the
        MLP channel-group scores of a collection with ``units=("heads", "mlp")``; same samples, settings
        and statistics."""
        if family == self.layout.family_name:
            return self
        if self.context is None or family not in self.families:
            raise InputError(f"unit family {family!r} was not collected; this result has {self.families} "
                             "(collect with units=('heads', 'mlp'))")
        out = InterferenceResult.from_context(self.context, self.max_bytes, family)
        out.phases = self.phases
        return out

    @property
    def dtype(self) -> torch.dtype:
        """Precision of the scores (the score configuration's)."""
        return self.cfg.dtype

    @property
    def config(self) -> dict[str, Any]:
        """The settings that produced the result (codec, score options, layout, store) as a flat dict."""
        return self.cfg.to_dict() if self.context is None else self.context.config()

    # -- the full tensor ---------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.n_a, self.n_b, self.layout.num_layers, self.layout.num_heads, len(self.layout.block_names))

    def materialize(self) -> "InterferenceResult":
        if self._scores is None:
            self._scores, self._stderr = assemble(self.layout, self.n_a, self.n_b, self.provider, self.dtype,
                                                  self.max_bytes)
        return self

    @property
    def scores(self) -> torch.Tensor:
        return self.materialize()._scores

    @property
    def stderr(self) -> torch.Tensor:
        return self.materialize()._stderr

    @property
    def materialized(self) -> bool:
        return self._scores is not None

    def _first_heads(self, b: int) -> list[int]:
        """The first query head of each distinct head block of block ``b`` (K/V: of each kv group)."""
        idx = self.layout.head_index(self.layout.block_names[b]).tolist()
        return [idx.index(d) for d in range(max(idx) + 1)]

    def _chunks(self, expand: bool = True):
        """``(layer, b, lo, hi, scores, stderr)`` chunks; ``expand=False`` keeps distinct head blocks."""
        if self.materialized:
            for layer in range(self.layout.num_layers):
                for b in range(len(self.layout.block_names)):
                    heads = slice(None) if expand else self._first_heads(b)
                    s = self._scores[:, :, layer, heads, b]
                    if torch.isnan(s).all():
                        continue
                    yield layer, b, 0, self.n_a, s, self._stderr[:, :, layer, heads, b]
            return
        # chunks stay on the device they were scored on; reductions move only their small results
        for layer, b, lo, hi, s, se in iter_chunks(self.layout, self.provider, self.max_bytes, expand):
            yield layer, b, lo, hi, s.to(self.dtype), None if se is None else se.to(self.dtype)

    # -- streaming reductions ----------------------------------------------------------------
    def head_means(self) -> torch.Tensor:
        """Mean over sample pairs per (layer, unit, block): ``[L, H, 4]`` for heads (``[L, units, blocks]`` for
        MLP channel groups, blocks as in ``layout.block_names``); NaN where missing."""
        L, H, nb = self.layout.num_layers, self.layout.num_heads, len(self.layout.block_names)
        sums = torch.zeros(L, H, nb, dtype=torch.float64)
        counts = torch.zeros(L, H, nb, dtype=torch.float64)
        for layer, b, _, _, s, _ in self._chunks():
            sums[layer, :, b] += s.double().nansum((0, 1)).cpu()
            counts[layer, :, b] += (~torch.isnan(s)).sum((0, 1)).cpu()
        return sums / counts  # 0/0 -> NaN for missing blocks

    def head_means_stderr(self) -> torch.Tensor:
        """Standard error of :meth:`head_means` ``[L, H, 4]`` from the sketch (0 for exact codecs; NaN where
        missing): the error of the one inner product the mean over pairs reduces to, not the pairs'
        errors averaged (they are correlated)."""
        L, H = self.layout.num_layers, self.layout.num_heads
        out = torch.full((L, H, len(self.layout.block_names)), float("nan"), dtype=torch.float64)
        for layer, b, block, scores in self._block_scores():
            per_block = getattr(scores, "mean_stderr", None)
            se = per_block().cpu() if per_block is not None else torch.zeros(int(self.layout.head_index(block).max()) + 1,
                                                                              dtype=torch.float64)
            out[layer, :, b] = se[self.layout.head_index(block)]
        return out

    def _block_scores(self):
        """``(layer, b, block, block scores)`` of every collected block, from the provider (not chunked)."""
        for layer in range(self.layout.num_layers):
            for b, block in enumerate(self.layout.block_names):
                scores = self.provider(layer, block)
                if scores is not None:
                    yield layer, b, block, scores

    def shared_errors(self) -> pd.DataFrame:
        """How independent the sketch errors of a unit block's pairs are, per distinct unit block (a shared
        K/V block under its group's first query head). A pair's error is ``x̃_iᵀ(RᵀR − I)ỹ_j`` for the block's
        one map R: when a side's vectors span few directions, every pair's error is made of the same few
        random terms. The standard errors stay right on average over maps, but under the one map a run uses
        the block's intervals then hold or fail together. Columns: ``rank_a`` and ``rank_b`` (each side's
        effective rank in the block, estimated from its sketches), ``independent_errors`` (their product,
        about the number of independent errors among the block's pairs) and ``coverage_spread`` (about the
        standard deviation, over maps, of the fraction of the block's 95% intervals that hold:
        ``√(0.95·0.05 / independent_errors)``). Sketch codecs only: exact scores have no sketch error."""
        if self.context is None or self.context.exact is not None:
            raise InputError("shared_errors() describes a sketch's errors; exact scores (sf.Exact, sf.Factors) have none")
        rows = []
        for layer, b, block, scores in self._block_scores():
            rank_a, rank_b = (r.cpu() for r in scores.shared_error_ranks())
            for h, first in enumerate(self._first_heads(b)):
                n = float(rank_a[h] * rank_b[h])
                rows.append({"block": block, "layer": layer, self.layout.unit_column: first, "rank_a": float(rank_a[h]),
                             "rank_b": float(rank_b[h]), "independent_errors": n,
                             "coverage_spread": (0.95 * 0.05 / n) ** 0.5})
        return pd.DataFrame(rows)

    def pair_means_from_statistics(self, group_size: int = 1) -> torch.Tensor:
        """The mean score over all pairs per unit of ``group_size`` channels (1: single MLP neurons), exact,
        from the pass-1 statistics alone: ``[L, units, blocks]``; see
        :func:`sketchfisher.interference.pair_means.pair_means_from_statistics`."""
        from .pair_means import pair_means_from_statistics

        return pair_means_from_statistics(self, group_size)

    def pair(self, i: int, j: int, layer: int, head: int) -> dict[str, float]:
        """The block scores of one (i, j, layer, head or unit)."""
        if not (0 <= i < self.n_a and 0 <= j < self.n_b):
            raise InputError(f"pair ({i}, {j}) is outside [0, {self.n_a}) x [0, {self.n_b})")
        return {blk: float(self.scores[i, j, layer, head, b]) for b, blk in enumerate(self.layout.block_names)}

    def top_conflicts(self, k: int = 20, block: Optional[str] = None) -> pd.DataFrame:
        """The ``k`` strongest conflicts by the variant's conflict sign (largest scores; most negative for
        ``signed``), NaN excluded.

        Each storage head block appears once: a K/V block shared by a group of query heads (GQA)
        is listed under the group's first query head. Ties are broken by position (layer, block,
        head, i, j), so the list does not depend on chunking.
        """
        if not isinstance(k, int) or k < 1:
            raise InputError(f"k must be a positive int, got {k!r}")
        only = None if block is None else self.layout.position(block)
        names = self.layout.block_names
        variant = self.cfg.spec
        best_key = torch.empty(0, dtype=torch.float64)
        best_rows: list[list] = []
        for layer, b, lo, hi, s, se in self._chunks(expand=False):
            if only is not None and b != only:
                continue
            key = variant.conflict_key(s.double()).nan_to_num(nan=-float("inf")).reshape(-1)
            # keep every entry tied with the k-th value so that the tie-break below sees them all
            kth = torch.topk(key, min(k, key.numel())).values[-1]
            flat = ((key >= kth) & torch.isfinite(key)).nonzero().flatten()
            vals = s.reshape(-1)[flat].double().cpu().tolist()
            errs = [0.0] * len(vals) if se is None else se.reshape(-1)[flat].double().cpu().tolist()
            ci, cj, ch = (t.cpu().tolist() for t in torch.unravel_index(flat, s.shape))
            first = self._first_heads(b)
            rows = [[names[b], layer, first[h], lo + i, j, v, e] for i, j, h, v, e in zip(ci, cj, ch, vals, errs)]
            best_key = torch.cat([best_key, key[flat].cpu()])
            best_rows += rows
            best_key, best_rows = _select(best_key, best_rows, k, names)
        best_key, best_rows = _select(best_key, best_rows, k, names)
        out = pd.DataFrame(best_rows, columns=columns(self.layout))
        out.attrs.update(variant=variant.name, formula=variant.formula, conflict=variant.conflict)
        return out

    def block_summary(self) -> pd.DataFrame:
        """Per block: mean and max score over all (pair, layer, head), and the fraction missing."""
        total = self.n_a * self.n_b * self.layout.num_layers * self.layout.num_heads
        names = self.layout.block_names
        acc = {b: [0.0, 0, -float("inf")] for b in range(len(names))}
        for _, b, _, _, s, _ in self._chunks():
            ok = ~torch.isnan(s)
            count = int(ok.sum())
            acc[b][0] += float(s[ok].double().sum())
            acc[b][1] += count
            if count:
                acc[b][2] = max(acc[b][2], float(s[ok].max()))
        return pd.DataFrame([{"block": names[b], "mean": s / n if n else float("nan"),
                              "max": m if n else float("nan"), "missing_fraction": 1 - n / total}
                             for b, (s, n, m) in acc.items()])

    def sample_summary(self) -> pd.DataFrame:
        """Per sample and block: the mean score of that sample against the other task (NaN-aware)."""
        names = self.layout.block_names
        sums = {side: torch.zeros(n, len(names), dtype=torch.float64) for side, n in (("a", self.n_a), ("b", self.n_b))}
        counts = {side: torch.zeros_like(t) for side, t in sums.items()}
        for _, b, lo, hi, s, _ in self._chunks():
            ok = (~torch.isnan(s)).double()
            v = s.double().nan_to_num()
            sums["a"][lo:hi, b] += v.sum((1, 2)).cpu()
            counts["a"][lo:hi, b] += ok.sum((1, 2)).cpu()
            sums["b"][:, b] += v.sum((0, 2)).cpu()
            counts["b"][:, b] += ok.sum((0, 2)).cpu()
        rows = []
        for side in ("a", "b"):
            mean = sums[side] / counts[side]
            for i in range(mean.shape[0]):
                rows += [{"task": side.upper(), "sample": i, "block": names[b], "mean_score": float(mean[i, b])}
                         for b in range(len(names))]
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        """Every score as a tidy row: block, layer, head (``unit`` for MLP units), sample_i, sample_j, score,
        stderr."""
        n_a, n_b, L, H, B = self.shape
        idx = torch.cartesian_prod(*(torch.arange(s) for s in (n_a, n_b, L, H, B)))
        return pd.DataFrame({
            "block": [self.layout.block_names[b] for b in idx[:, 4].tolist()],
            "layer": idx[:, 2].numpy(), self.layout.unit_column: idx[:, 3].numpy(),
            "sample_i": idx[:, 0].numpy(), "sample_j": idx[:, 1].numpy(),
            "score": self.scores.reshape(-1).numpy(), "stderr": self.stderr.reshape(-1).numpy(),
        })

    def permutation_test(self, n_permutations: int = 999, seed: int = 0) -> pd.DataFrame:
        """Permutation p-values and BH q-values per cell of the mean score (exact codecs only): whether the
        cell's mean score is more extreme than under re-dealt A/B labels; see
        :func:`sketchfisher.interference.stats.permutation_test`."""
        from .stats import permutation_test, result_grads

        return permutation_test(self.layout, result_grads(self), self.cfg, n_permutations, seed)

    def report(self, path, **options) -> "Path":
        """Write this result's interactive HTML report (one file, works offline): the conflict map of every unit
        family, hover for T, alignment and q, click a cell for its strongest pairs. ``options``: ``texts_a``,
        ``texts_b`` (the samples' texts), ``title``, ``summary``, ``top``, ``level``
        (:func:`sketchfisher.interference.report.write_report`). Needs plotly (``pip install 'sketchfisher[report]'``)."""
        from .report import write_report

        return write_report(self, path, **options)

    def head_conflicts(self, level: float = 0.05, confidence: float = 0.95) -> pd.DataFrame:
        """Do tasks A and B pull each unit block's weights in opposite directions? Per distinct unit block:
        ``T = Σ_S ḡ_A ḡ_B / (Î + ε + λ)`` (the mean ``signed`` score over pairs; minus the first-order change
        of B's loss per unit Fisher-preconditioned step on A through the block), its standard error over
        samples, ``alignment`` (the cosine) with its ``confidence`` interval, the one-sided p-value of H0:
        T ≥ 0 and its Benjamini–Hochberg q-value; ``conflict`` marks q ≤ ``level``. Works for every codec, in
        memory and from stores. See :mod:`sketchfisher.interference.conflicts`."""
        from .conflicts import conflict_table

        return conflict_table(self, level, confidence)

    def distributions_differ(self, n_permutations: int = 999, seed: int = 0, progress: bool = False) -> pd.DataFrame:
        """Do the two tasks' gradient distributions differ on each block? A permutation test that re-deals the
        A/B labels (exact codecs only): a small p says "A and B differ", **not** "A and B conflict" (two
        agreeing tasks with different loss scales differ too); :meth:`head_conflicts` is the conflict test.
        See :func:`sketchfisher.interference.stats.distributions_differ`."""
        from .stats import distributions_differ

        return distributions_differ(self, n_permutations, seed, progress)

    def bootstrap_ci(self, confidence_level: float = 0.95, n_resamples: int = 999, seed: int = 0) -> pd.DataFrame:
        """Bootstrap intervals of each cell's mean score over samples (``scipy.stats.bootstrap``)."""
        from .stats import bootstrap_ci

        return bootstrap_ci(self, confidence_level, n_resamples, seed)

    def verify_top(self, k: int = 100, budget: int = 1000, **sources: Any) -> pd.DataFrame:
        """Re-score the ``budget`` best candidates exactly and report which of the top ``k`` held.

        See :func:`sketchfisher.interference.verify.verify_top` for the sources it accepts.
        """
        from .verify import verify_top

        return verify_top(self, k=k, budget=budget, **sources)


def _select(key: torch.Tensor, rows: list[list], k: int, names: tuple[str, ...]) -> tuple[torch.Tensor, list[list]]:
    """The k best rows by key (descending), ties broken by (layer, block, head, i, j) ascending."""
    order = sorted(range(len(rows)), key=lambda r: (-float(key[r]), rows[r][1], names.index(rows[r][0]),
                                                    rows[r][2], rows[r][3], rows[r][4]))[:k]
    return key[order] if order else key[:0], [rows[o] for o in order]
