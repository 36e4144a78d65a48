"""Stage 6 results scored from a sketch store (no model needed)."""

from __future__ import annotations

from typing import Any, Optional

from ..sketching import prepare_all, sketch_provider
from .result import InterferenceResult

TASKS = ("a", "b")


def result_from_store(store: Any, max_bytes: Optional[int] = None) -> InterferenceResult:
    """An :class:`InterferenceResult` whose sketches are read lazily, one (layer, block) at a time."""
    from ..store import StoreError

    stats = store.stats
    counts = {t: store.manifest["tasks"][t]["samples"] for t in TASKS}
    if {t: stats[t].count for t in TASKS} != counts:
        raise StoreError(f"{store.path}: pass-1 statistics disagree with the manifest's sample counts {counts}")
    preps = prepare_all(store.layout, stats["a"], stats["b"], store.cfg, store.codec)
    sides = store.sides()
    provider = sketch_provider(store.layout, sides["a"], sides["b"], preps, store.codec)
    config = {"codec": store.codec.to_dict(), **store.manifest["score"], "store": str(store.path)}
    kw = {} if max_bytes is None else {"max_bytes": max_bytes}
    return InterferenceResult(layout=store.layout, n_a=counts["a"], n_b=counts["b"], provider=provider, config=config,
                              dtype=store.cfg.dtype,
                              context={"cfg": store.cfg, "codec": store.codec, "stats_a": stats["a"],
                                       "stats_b": stats["b"], "store": store}, **kw)


