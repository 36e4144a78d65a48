"""Disk of a sketch store, planned before anything is written: what it holds at its fullest (the writer refuses a
collection that would not fit, and ``sf.plan`` lists the store beside the codecs)."""

from __future__ import annotations

from typing import Any

import torch

from ..compress import SideCodec
from .memory import Shape


def store_disk_bytes(shape: Any, codec: SideCodec, samples: int, batches: int, stats_copies: tuple[int, int],
                     stats_bytes: int = 4, world: int = 1, compact_copies: tuple[int, int] = (0, 0),
                     conflicts: bool = False, checkpoints: bool = True) -> dict[str, int]:
    """Everything a sketch store holds on disk at its fullest, in bytes, as an upper bound.

    ``sketches`` (``samples`` over both tasks), each shard's safetensors header and integrity records
    (``batches`` over both tasks), the final pass-1 statistics (``stats_copies``: model-sized tensors
    of task A and of task B, in ``stats_bytes``) and ``pass1_checkpoint``: what pass 1's resumable
    checkpoints add on top of the final statistics at the fullest moment. A checkpoint is replaced
    through a temporary file and deleted once its task's final file is written, so the statistics
    peak at ``max(2·A, A + 2·B)`` (A's final file beside B's checkpoint and its replacement), per
    rank for the checkpoints of ``world`` ranks. ``compact_copies`` of each task's ``stats_copies`` are
    written in bf16 (:func:`sketchfisher.collect.sketches.compacted_statistics`); their checkpoints
    are not. ``conflicts``: the shards also hold each sample's fp64 conflict scalars (one per head block for a
    task-A sample, two for task B; counted as two). ``checkpoints=False``: pass 1 writes no checkpoint
    (``checkpoint_every=0``), so ``pass1_checkpoint`` is 0."""
    s = Shape.of(shape)
    groups = s.num_layers * 4  # (layer, block) groups per shard
    tensors = (2 + len(codec.encode(torch.zeros(1, 1))) + conflicts  # encoded vectors (and scale), ‖x̃‖², cross,
               + getattr(codec, "stores_gamma", False))  # and scaled centring's γ
    header = groups * (tensors * 96 + 96) + 1024  # per tensor name/dtype/shape/offsets; per group its digest
    unit = s.num_layers * s.attn_params_per_layer * stats_bytes
    a_full, b_full = (copies * unit for copies in stats_copies)  # as the checkpoints hold them
    a, b = (full - n * (unit - unit * 2 // stats_bytes) for full, n in zip((a_full, b_full), compact_copies))
    per_tensor = s.num_layers * 4 * 256  # the statistics files' headers: name, dtype, shape, offsets, digest per tensor
    fullest = max(2 * world * a_full, a + 2 * world * b_full)
    out = {"sketches": int(codec.bytes_per_sample(s.head_block_sizes, 0, 0) * samples),
           "conflict_scalars": len(s.head_block_sizes) * 16 * samples if conflicts else 0,
           "shard_headers": header * batches, "statistics": a + b + sum(stats_copies) * per_tensor,
           "pass1_checkpoint": max(0, fullest - a - b) if checkpoints else 0, "manifest": 4096 + 200 * batches}
    out["total"] = sum(out.values())
    return out
