"""Disk of a sketch store, planned before anything is written: what it holds at its fullest (the writer refuses a
collection that would not fit, and ``sf.plan`` lists the store beside the codecs)."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..compress import SideCodec
from ..fisher.precision import kept_dtypes
from ..layout import Layout
from .memory import Shape, _families

Widths = Sequence[tuple[int, int]]
"""One task's kept statistics: per statistic, bytes per entry while it accumulates (as a pass-1 checkpoint holds
it) and once final."""


def footprint(source: Any, units: Any = "heads") -> tuple[list[int], int, int]:
    """``(unit block sizes, statistic entries, (layer, block) groups)`` of a collection: of a resolved
    :class:`~sketchfisher.layout.Layout` exactly (every unit family it holds; the statistics cover each collected
    weight once), else of a model's shape (anything :meth:`Shape.of` takes) for the planned ``units``."""
    if isinstance(source, Layout):
        groups = source.groups()
        blocks = [hb for key in groups for hb in source.head_blocks(*key)]
        weights = {hb.param_name: hb.param_shape[0] * hb.param_shape[1] for hb in blocks}
        return [hb.numel for hb in blocks], sum(weights.values()), len(groups)
    return Shape.of(source).footprint(units)


def statistics_widths(quantities: Iterable[str], beyond_heads: bool, dtype: torch.dtype) -> Widths:
    """:data:`Widths` of one task's kept ``quantities`` in a collection whose statistics are ``dtype``."""
    from .sketches import compacted_statistics  # (here: collect.sketches imports much that imports this module)

    return [(running.itemsize, final.itemsize)
            for running, final in kept_dtypes(quantities, dtype, compacted_statistics(beyond_heads))]


def store_disk_bytes(source: Any, codec: SideCodec, samples: int, batches: int, widths: tuple[Widths, Widths],
                     world: int = 1, conflicts: bool = False, checkpoints: bool = True,
                     units: Any = "heads") -> dict[str, int]:
    """Everything a sketch store holds on disk at its fullest, in bytes, as an upper bound, for the collection's
    layout (``source``, every unit family it holds) or a model's shape and ``units`` (:func:`footprint`).

    ``sketches`` (``samples`` over both tasks), each shard's safetensors header and integrity records
    (``batches`` over both tasks), the final pass-1 statistics (``widths``: task A's and task B's kept statistics,
    :func:`statistics_widths`; each a model-sized tensor) and ``pass1_checkpoint``: what pass 1's resumable
    checkpoints add on top of the final statistics at the fullest moment. A checkpoint is replaced
    through a temporary file and deleted once its task's final file is written, so the statistics
    peak at ``max(2·A, A + 2·B)`` (A's final file beside B's checkpoint and its replacement), per
    rank for the checkpoints of ``world`` ranks. ``conflicts``: the shards also hold each sample's fp64 conflict
    scalars (one per head block for a task-A sample, two for task B; counted as two). ``checkpoints=False``: pass 1
    writes no checkpoint (``checkpoint_every=0``), so ``pass1_checkpoint`` is 0."""
    sizes, entries, groups = footprint(source, units)  # (groups: (layer, block) groups per shard)
    tensors = (2 + len(codec.encode(torch.zeros(1, 1))) + conflicts  # encoded vectors (and scale), ‖x̃‖², cross,
               + getattr(codec, "stores_gamma", False))  # and scaled centring's γ
    header = groups * (tensors * 96 + 96) + 1024  # per tensor name/dtype/shape/offsets; per group its digest
    a_full, b_full = (entries * sum(running for running, _ in w) for w in widths)  # as the checkpoints hold them
    a, b = (entries * sum(final for _, final in w) for w in widths)
    per_tensor = groups * 256  # the statistics files' headers: name, dtype, shape, offsets, digest per tensor
    fullest = max(2 * world * a_full, a + 2 * world * b_full)
    out = {"sketches": int(codec.bytes_per_sample(sizes, 0, 0) * samples),
           "conflict_scalars": len(sizes) * 16 * samples if conflicts else 0,
           "shard_headers": header * batches, "statistics": a + b + sum(map(len, widths)) * per_tensor,
           "pass1_checkpoint": max(0, fullest - a - b) if checkpoints else 0, "manifest": 4096 + 200 * batches}
    out["total"] = sum(out.values())
    return out


def default_store_bytes(source: Any, codec: SideCodec, samples: int, batch_size: int,
                        stats_dtype: torch.dtype = torch.float32, units: Any = "heads") -> dict[str, int]:
    """:func:`store_disk_bytes` of a store collected with the defaults (the codec's default pass order, the
    conflict test, pass-1 checkpoints) on a model's shape for ``units``, its statistics in ``stats_dtype``
    (fp32: a GPU's)."""
    from ..metric import ScoreConfig
    from .plan import pass_plan

    beyond = _families(units) != ("heads",)
    plan = pass_plan(codec, ScoreConfig(), None, means=beyond, conflicts=True)
    widths = tuple(statistics_widths(plan.statistics[t], beyond, stats_dtype) for t in "ab")
    return store_disk_bytes(source, codec, samples, -(-samples // batch_size), widths, conflicts=True, units=units)
