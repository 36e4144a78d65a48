"""Stage 6 results scored from a sketch store (no model needed).

The store layer reads files (:class:`sketchfisher.store.StoreReader`); this module adds what a
store means for Stage 6: :class:`Store` is a reader whose :meth:`Store.result` scores it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..collect import prepare_all
from ..collect.sketches import centre_products
from ..store import StoreError, StoreReader
from .context import ResultContext, SketchSource
from .engine import DEFAULT_MAX_BYTES
from .result import InterferenceResult

TASKS = ("a", "b")


class Store(StoreReader):
    """A complete sketch store. ``sf.open_store(path)`` returns one; it needs no model."""

    def context(self) -> ResultContext:
        """Settings, statistics and lazily read sketches of the store."""
        stats = self.stats
        counts = {t: self.manifest["tasks"][t]["samples"] for t in TASKS}
        if {t: stats[t].count for t in TASKS} != counts:
            raise StoreError(f"{self.path}: pass-1 statistics disagree with the manifest's sample counts {counts}")
        preps = prepare_all(self.layout, stats["a"], stats["b"], self.cfg, self.codec, balance_from_a=self.passes == 1.5)
        sides = self.sides()
        return ResultContext(layout=self.layout, cfg=self.cfg, codec=self.codec, stats_a=stats["a"],
                             stats_b=stats["b"], source=SketchSource(sides["a"], sides["b"], centre_products(preps)),
                             store=str(self.path))

    def result(self, max_bytes: Optional[int] = None) -> InterferenceResult:
        """The Stage 6 result, scored lazily from the shards, one (layer, block) at a time."""
        return InterferenceResult.from_context(self.context(), DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)


def open_store(path: str | Path) -> Store:
    """Open a complete store for Stage 6 (no model needed)."""
    return Store(path)
