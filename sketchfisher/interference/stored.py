"""Stage 6 results scored from a sketch store (no model needed).

The store layer reads files (:class:`sketchfisher.store.StoreReader`); this module adds what a
store means for Stage 6: :class:`Store` is a reader whose :meth:`Store.result` scores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..collect.sketches import prepare, recipe_of
from ..compress.base import centres_b_from_a
from ..compress.sketch_scores import residual_centre
from ..store import StoreError, StoreReader
from .context import ResultContext, SketchSource, Statistics
from .engine import DEFAULT_MAX_BYTES
from .result import InterferenceResult

TASKS = ("a", "b")


class Store(StoreReader):
    """A complete store. ``sf.open_store(path)`` returns one; it needs no model.

    Opening reads the manifest and the shards' headers only. The statistics are read when a score first
    needs them, and each block's preparation (what the centring contributes to its scores) is built for
    the block being scored, kept as one scalar per head, and freed: scoring a store needs its statistics
    files and one block at a time in memory, never every block's preparation at once."""

    def context(self) -> ResultContext:
        """Settings, lazily read statistics and lazily read sketches of the store."""
        counts = tuple(self.manifest["tasks"][t]["samples"] for t in TASKS)
        statistics = Statistics(self._statistics)
        sides = self.sides()
        centres = BlockCentres(self, statistics)
        residual = centres.residuals if centres_b_from_a(self.codec, self.passes) else None
        return ResultContext(self.layout, self.cfg, self.codec, statistics,
                             SketchSource(sides["a"], sides["b"], centres, centres.moments, residual), counts,
                             store=str(self.path))

    def _statistics(self):
        stats = self.stats
        counts = {t: self.manifest["tasks"][t]["samples"] for t in TASKS}
        if {t: stats[t].count for t in TASKS} != counts:
            raise StoreError(f"{self.path}: pass-1 statistics disagree with the manifest's sample counts {counts}")
        return stats

    def result(self, max_bytes: Optional[int] = None) -> InterferenceResult:
        """The Stage 6 result, scored lazily from the shards, one (layer, block) at a time."""
        return InterferenceResult.from_context(self.context(), DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)


class BlockCentres:
    """``e = ⟨x̄', ȳ'⟩ [H_b]`` of a store's blocks, the task means' products the conflict test needs
    (:attr:`moments`) and, for task B's single pass with scaled centring, B's mean residual (:attr:`residuals`),
    each computed from the statistics when first asked for (the block's preparation is freed at once; only
    these are kept)."""

    def __init__(self, store: Store, statistics: Statistics):
        self.store, self.statistics, self.cache = store, statistics, {}
        self.moments = _Part(self, 1)
        self.residuals = _Part(self, 2)

    def prepared(self, key: tuple[int, str], moments: bool = False):
        """``(e, moments or None, residual or None)`` of a block; None when it was not collected. The moments are
        computed (with the block's preparation again) only when asked for: scores need ``e`` alone."""
        if key not in self.cache or (moments and self.cache[key] is not None and self.cache[key][1] is None):
            s = self.store
            prep = prepare(s.layout, *key, self.statistics["a"], self.statistics["b"], s.cfg, s.codec,
                           balance_from_a=s.passes == 1.5, conflicts=moments,
                           recipe=recipe_of(s.manifest["format_version"]))
            residual = self.cache[key][2] if self.cache.get(key) is not None else (  # (computed once per block)
                residual_centre(prep, s.codec, *key) if prep is not None and centres_b_from_a(s.codec, s.passes)
                else None)
            self.cache[key] = None if prep is None else (prep.e, prep.moments if moments else None, residual)
        return self.cache[key]

    def get(self, key: tuple[int, str]):
        got = self.prepared(key)
        return None if got is None else got[0]


class _Part:
    """``get(key)``: one part of a store block's prepared values (:meth:`BlockCentres.prepared`): the conflict
    moments (``at=1``) or B's mean residual (``at=2``)."""

    def __init__(self, centres: BlockCentres, at: int):
        self.centres, self.at = centres, at

    def get(self, key: tuple[int, str]):
        got = self.centres.prepared(key, moments=self.at == 1)
        return None if got is None else got[self.at]


def open_store(path: str | Path, unverified: bool = False) -> Store:
    """Open a complete store for Stage 6 (no model needed). Stores of format versions before 3 carry no digests
    and are refused unless ``unverified=True`` asks to read them as they are."""
    return Store(path, unverified=unverified)
