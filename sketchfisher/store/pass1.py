"""Pass 1 of a store: each task's statistics, checkpointed while the pass runs and written once final.

``pass1/<task>.partial.safetensors`` holds the statistics and the number of batches done while the pass
runs (one per rank under ``torch.distributed``); ``pass1/<task>.safetensors`` the final statistics,
which supersede the checkpoints. A run killed at any point resumes from the last checkpoint (Welford
states merge exactly), so every sample counts once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..capture.oracle import LossFn
from ..collect import factor_pass, fold_factors, trainable_weights
from ..collect.passes import sized
from ..errors import InputError
from ..fisher import FisherStats
from ..layout import Layout
from .files import atomic_save_tensors, load_tensors
from .integrity import check_digest, check_header, stats_metadata

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """This process's share of the batches: batch ``i`` belongs to rank ``i % world``."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "Ranks":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def read_final(root: Path, task: str, store_id: str) -> FisherStats:
    """A task's final statistics as written by this store (header and digest checked)."""
    final = final_path(root, task)
    tensors, meta = load_tensors(final)
    check_header(final, meta, store_id, task)
    check_digest(final, tensors, meta.get("digest", ""))
    return FisherStats.from_tensors(tensors, meta)


def run_pass1(root: Path, task: str, model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout,
           checkpoint_every: int | None, show_progress: bool, ranks: Ranks, stats_dtype: torch.dtype,
           quantities: tuple[str, ...], store_id: str, desc: str | None = None) -> tuple[FisherStats, int | None]:
    """Pass 1 of one task: ``(statistics, batches)``; ``batches`` (how many the task yielded) when they
    were computed now and their final file is still to be written (:func:`save_pass1`), None when they
    were read from the store."""
    final = final_path(root, task)
    partial = partial_path(root, task, ranks)
    if final.exists():
        partial.unlink(missing_ok=True)  # a checkpoint of a run killed after the final file was written
        return read_final(root, task, store_id), None
    stats, done = FisherStats.accumulating(stats_dtype, quantities), 0
    if partial.exists():
        tensors, meta = load_tensors(partial)
        check_header(partial, meta, store_id, task)
        stats, done = FisherStats.from_tensors(tensors, meta), int(meta["batches_done"])
        logger.info("task %s: resuming pass 1 after %d batches", task, done)
    names = trainable_weights(model, layout)
    seen, policy = Counter(), Checkpoints(checkpoint_every)
    desc = desc or f"pass 1 {task.upper()}"
    for index, bf in factor_pass(model, loss_fn, Counted(batches, seen), names, desc=desc,
                                 show_progress=show_progress, skip=lambda i: i < done or not ranks.mine(i),
                                 total=sized(batches)):
        fold_factors(stats, bf, names, low=True)  # (stores hold sketches, whose side vectors read the same numbers)
        if policy.due(index + 1):
            bf.settle()  # (a checkpoint holds finite batches only)
            start = time.perf_counter()
            tensors, meta = stats.to_tensors()
            atomic_save_tensors(tensors, partial, {**meta, "batches_done": str(index + 1), "store_id": store_id,
                                                   "task": task})
            policy.saved(time.perf_counter() - start)
    if seen.batches < done:
        raise InputError(f"task {task} yielded {seen.batches} batches, fewer than the {done} recorded in {partial}")
    if ranks.world > 1:
        stats = stats.all_reduce(names)
    if stats.count == 0:
        raise InputError(f"task {task} yielded no samples")
    stats.check_finite(desc)
    return stats, seen.batches


def final_path(root: Path, task: str) -> Path:
    return root / "pass1" / f"{task}.safetensors"


def partial_path(root: Path, task: str, ranks: Ranks) -> Path:
    suffix = "" if ranks.world == 1 else f".rank{ranks.rank}-of-{ranks.world}"
    return root / "pass1" / f"{task}{suffix}.partial.safetensors"


def save_pass1(stats: FisherStats, path: Path, batches: int, store_id: str, task: str) -> None:
    """Write a task's final pass-1 statistics; its checkpoints (every rank's) are superseded and deleted."""
    tensors, meta = stats.to_tensors()
    atomic_save_tensors(tensors, path, {**meta, "batches": str(batches), **stats_metadata(tensors, store_id, task)})
    for partial in path.parent.glob(f"{task}*.partial.safetensors"):
        partial.unlink(missing_ok=True)


class Checkpoints:
    """When pass 1 writes its resumable checkpoint: every ``every`` batches, never (``every=0``: a run killed in
    pass 1 redoes it, and the disk holds no checkpoint beside the statistics), or (``every=None``) by time, once
    the work since the last checkpoint is at least 20 times what the last one cost to write and at least a
    minute: at 7B the statistics are tens of GB, and writing them every few batches would cost more than the
    pass itself. A crash loses at most that much work; every sample still counts once."""

    def __init__(self, every: int | None):
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 0):
            raise InputError(f"checkpoint_every must be a positive int, 0 (never) or None (by time), got {every!r}")
        self.every, self.cost, self.last = every, 0.0, time.perf_counter()

    def due(self, batches_done: int) -> bool:
        if self.every == 0:
            return False
        if self.every is not None:
            return batches_done % self.every == 0
        return time.perf_counter() - self.last >= max(60.0, 20 * self.cost)

    def saved(self, seconds: float) -> None:
        self.cost, self.last = seconds, time.perf_counter()


@dataclass
class Counter:
    """How many batches a task yielded (including those skipped)."""

    batches: int = 0


class Counted:
    """``batches``, counting them into ``counter`` as they are yielded; its length is theirs when they have one
    (so that a pass's progress bar shows "3/40", not "3it")."""

    def __init__(self, batches: Iterable[Any], counter: Counter):
        self.batches, self.counter = batches, counter

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.counter.batches += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]  (TypeError for a plain iterable, as the caller expects)
