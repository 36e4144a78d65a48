"""What a result was computed from, typed: settings, statistics and the per-sample representation.

One :class:`ResultContext` per result, built the same way for in-memory (``sf.analyze``) and
store-backed (``sf.open_store(...).result()``) results; :func:`provider_for` turns it into the
engine's score provider, so both kinds of result score through one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..compress import Codec, Representation
from ..fisher import FisherStats
from ..layout import Layout
from ..metric import ExactBlock, Provider, ScoreConfig


@dataclass(frozen=True)
class ExactSource:
    """Exact per-sample representations of both tasks (``sf.Exact`` / ``sf.Factors``)."""

    rep_a: Representation
    rep_b: Representation


@dataclass(frozen=True)
class SketchSource:
    """Both tasks' side-codec outputs (in memory, or read lazily from a store) and each block's exact scalar
    ``e = ⟨x̄', ȳ'⟩`` (the centres' inner product): a dict, or anything with ``get((layer, block))`` (a
    store computes it for the block being scored, from the statistics)."""

    side_a: Any  # SketchSide or a store's lazy side: ``get((layer, block))``, ``conflict((layer, block))``
    side_b: Any
    e: Any
    moments: Any = None  # per block, the task means' Fisher-weighted products (the conflict test's T and norms)
    residual: Any = None  # per block, task B's mean residual (R m, ‖m‖²) after a single pass with scaled centring


class Statistics:
    """Both tasks' pass-1 statistics, given or loaded on first use (a store reads its files only when a
    score or a check needs them)."""

    def __init__(self, load: Callable[[], dict[str, FisherStats]] | dict[str, FisherStats]):
        self._load = load if callable(load) else None
        self._stats = None if callable(load) else dict(load)

    def __getitem__(self, task: str) -> FisherStats:
        if self._stats is None:
            self._stats = self._load()
        return self._stats[task]


@dataclass(frozen=True)
class ResultContext:
    """Everything a result was computed from. ``source`` is an :class:`ExactSource` or a :class:`SketchSource`;
    ``store`` the store directory when the result is read from one."""

    layout: Layout
    cfg: ScoreConfig
    codec: Codec
    statistics: Statistics
    source: ExactSource | SketchSource
    counts: tuple[int, int]  # samples of task A and task B
    store: Optional[str] = None

    @classmethod
    def of(cls, layout: Layout, cfg: ScoreConfig, codec: Codec, stats_a: FisherStats, stats_b: FisherStats,
           source: ExactSource | SketchSource, store: Optional[str] = None) -> "ResultContext":
        """A context from statistics in hand (``sf.analyze``)."""
        return cls(layout, cfg, codec, Statistics({"a": stats_a, "b": stats_b}), source,
                   (stats_a.count, stats_b.count), store)

    @property
    def stats_a(self) -> FisherStats:
        return self.statistics["a"]

    @property
    def stats_b(self) -> FisherStats:
        return self.statistics["b"]

    @property
    def exact(self) -> Optional[ExactSource]:
        return self.source if isinstance(self.source, ExactSource) else None

    @property
    def rep_a(self) -> Optional[Representation]:
        return None if self.exact is None else self.exact.rep_a

    @property
    def rep_b(self) -> Optional[Representation]:
        return None if self.exact is None else self.exact.rep_b

    def normalizer_stats(self) -> FisherStats:
        """The statistics Î comes from: task A's, or A ∪ B's for ``normalizer="pooled"``."""
        return self.stats_a.merge(self.stats_b) if self.cfg.normalizer == "pooled" else self.stats_a

    def config(self) -> dict[str, Any]:
        """The settings as one flat JSON-serialisable dict (codec, score options, layout, store)."""
        out = {"codec": self.codec.to_dict(), **self.cfg.to_dict(), "layout": self.layout.model_type}
        if self.store is not None:
            out["store"] = self.store
        return out


def provider_for(ctx: ResultContext) -> Provider:
    """The engine's (layer, block) → scores provider for a context."""
    if ctx.exact is not None:
        return exact_provider(ctx)
    return sketch_provider(ctx)


def exact_provider(ctx: ResultContext) -> Provider:
    """Exact block scores from two exact representations (Exact or Factors)."""
    stats, layout = ctx.normalizer_stats(), ctx.layout

    def provider(layer: int, block: str) -> Optional[ExactBlock]:
        ga, gb = ctx.rep_a.block(layout, layer, block), ctx.rep_b.block(layout, layer, block)
        fisher = stats.fisher_block(layout, layer, block)
        if ga is None or gb is None or fisher is None:
            return None
        return ExactBlock.build(ga, gb, fisher, ctx.stats_a.count, ctx.cfg)
    return provider


def sketch_provider(ctx: ResultContext) -> Provider:
    """Block scores (with standard errors, for sketches) of a side codec from its two sides' outputs."""
    src, codec, layout = ctx.source, ctx.codec, ctx.layout

    def provider(layer: int, block: str):
        a, b = src.side_a.get((layer, block)), src.side_b.get((layer, block))
        if a is None or b is None:
            return None
        e = src.e.get((layer, block))
        if e is None:
            return None
        residual = None if src.residual is None else src.residual.get((layer, block))
        extra = {} if residual is None else {"residual": residual}  # (codecs that never centre B during its pass)
        return codec.block_scores(a, b, e, layout.head_blocks(layer, block)[0].numel, **extra)
    return provider


__all__ = ["ExactSource", "ResultContext", "SketchSource", "Statistics", "exact_provider", "provider_for",
           "sketch_provider"]
