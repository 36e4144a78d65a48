"""Resumable two-pass collection of sketches into a store directory.

Layout of a store::

    manifest.json                 settings, layout, model fingerprint, per-task sample counts
    pass1/<task>.safetensors      final pass-1 statistics of task a or b
    pass1/<task>.partial.safetensors   checkpoint while pass 1 runs (statistics + batches done)
    pass2/<task>/<batch>.safetensors   one shard per batch of sketches (written, then renamed)

Every file is written under a temporary name and renamed, so a file is either complete or absent.
A run killed at any point and restarted with the same arguments skips what is complete: pass-1
checkpoints resume from the batches they recorded (Welford states merge exactly) and pass 2 skips
batches whose shard exists. Every sample is counted exactly once.

Under ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on CPU) every rank runs this with the
same tasks: batch i belongs to rank i % world; pass-1 statistics are all-reduced; each rank writes its
own pass-2 shards into the one store; rank 0 writes the manifest. The sketches are those of a
single-process run (same seeds), up to the rounding of the statistics' reduction order.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..capture.oracle import LossFn
from ..collect import default_stats_dtype, factor_pass, fold_factors, needed_statistics, prepare_all, sketch_batches
from ..collect import trainable_weights
from ..collect.passes import sized
from ..collect.memory import check_tasks_fit
from ..collect.sketches import check_reiterable, check_sketch_width
from ..compress import Sketch
from ..compress.sketch import quantize
from ..errors import InputError
from ..fisher import FisherStats
from ..layout import BLOCKS, Layout
from ..metric import ScoreConfig
from .files import atomic_save_tensors, atomic_write_json, load_tensors, read_json, read_metadata, remove_stale_temps
from .manifest import build_manifest, check_same

logger = logging.getLogger(__name__)
TASKS = ("a", "b")


def shard_name(index: int) -> str:
    return f"{index:07d}.safetensors"


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


def _pass1(root: Path, task: str, model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout,
           checkpoint_every: int | None, show_progress: bool, ranks: Ranks, stats_dtype: torch.dtype,
           quantities: tuple[str, ...]) -> FisherStats:
    final = root / "pass1" / f"{task}.safetensors"
    if final.exists():
        return FisherStats.from_tensors(*load_tensors(final))
    suffix = "" if ranks.world == 1 else f".rank{ranks.rank}-of-{ranks.world}"
    partial = root / "pass1" / f"{task}{suffix}.partial.safetensors"
    stats, done = FisherStats(dtype=stats_dtype, quantities=quantities), 0
    if partial.exists():
        tensors, meta = load_tensors(partial)
        stats, done = FisherStats.from_tensors(tensors, meta), int(meta["batches_done"])
        logger.info("task %s: resuming pass 1 after %d batches", task, done)
    names = trainable_weights(model, layout)
    seen, policy = Counter(), Checkpoints(checkpoint_every)
    for index, bf in factor_pass(model, loss_fn, _counted(batches, seen), names, desc=f"pass 1 {task}",
                                 show_progress=show_progress, skip=lambda i: i < done or not ranks.mine(i),
                                 total=sized(batches)):
        fold_factors(stats, bf, names)
        if policy.due(index + 1):
            start = time.perf_counter()
            tensors, meta = stats.to_tensors()
            atomic_save_tensors(tensors, partial, {**meta, "batches_done": str(index + 1)})
            policy.saved(time.perf_counter() - start)
    index = seen.batches - 1
    if index + 1 < done:
        raise InputError(f"task {task} yielded {index + 1} batches, fewer than the {done} recorded in {partial}")
    if ranks.world > 1:
        stats = stats.all_reduce(names)
    if stats.count == 0:
        raise InputError(f"task {task} yielded no samples")
    if ranks.rank == 0:
        tensors, meta = stats.to_tensors()
        atomic_save_tensors(tensors, final, {**meta, "batches": str(index + 1)})
    ranks.barrier()
    partial.unlink(missing_ok=True)
    return stats


class Checkpoints:
    """When pass 1 writes its resumable checkpoint: every ``every`` batches, or (``every=None``) by time,
    once the work since the last checkpoint is at least 20 times what the last one cost to write and at
    least a minute: at 7B the statistics are tens of GB, and writing them every few batches would cost
    more than the pass itself. A crash loses at most that much work; every sample still counts once."""

    def __init__(self, every: int | None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise InputError(f"checkpoint_every must be a positive int or None, got {every!r}")
        self.every, self.cost, self.last = every, 0.0, time.perf_counter()

    def due(self, batches_done: int) -> bool:
        if self.every is not None:
            return batches_done % self.every == 0
        return time.perf_counter() - self.last >= max(60.0, 20 * self.cost)

    def saved(self, seconds: float) -> None:
        self.cost, self.last = seconds, time.perf_counter()


@dataclass
class Counter:
    """How many batches a task yielded (including those skipped)."""

    batches: int = 0


def _counted(batches: Iterable[Any], counter: Counter) -> Iterator[Any]:
    for batch in batches:
        counter.batches += 1
        yield batch


def _check_space(root: Path, layout: Layout, codec: Sketch, samples: int, max_bytes: int | None) -> None:
    blocks = sum(len(layout.head_blocks(layer, block)) for layer in range(layout.num_layers) for block in BLOCKS)
    planned = samples * blocks * codec.bytes_per_block()
    already = sum(p.stat().st_size for p in (root / "pass2").rglob("*.safetensors"))
    needed = max(0, planned - already)
    free = shutil.disk_usage(root).free
    if max_bytes is not None and planned > max_bytes:
        raise InputError(f"planned sketch store is {planned:,} bytes ({samples} samples x {blocks} head blocks x "
                         f"{codec.bytes_per_block()} bytes), over max_bytes={max_bytes:,}")
    if needed > free:
        raise InputError(f"planned sketch store needs {needed:,} more bytes but {root} has {free:,} free")


def collect_to_store(path: str | Path, model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any],
                     task_b: Iterable[Any], layout: Layout, codec: Sketch, cfg: ScoreConfig, *,
                     checkpoint_every: int | None = None, max_bytes: int | None = None,
                     show_progress: bool = False, stats_dtype: torch.dtype | None = None,
                     inputs: dict[str, Any] | None = None) -> Path:
    """Collect (or finish collecting) a sketch store at ``path``; returns the path.

    Before pass 2 writes anything, the planned size of the sketches (known once pass 1 has counted
    the samples) is compared with ``max_bytes`` and with the free disk; collection refuses to go on
    with the numbers in the error.
    """
    if not isinstance(codec, Sketch):
        raise InputError(f"stores hold sketches; got codec {codec!r} (use sf.Sketch(...))")
    check_reiterable(task_a=task_a, task_b=task_b)
    check_sketch_width(layout, codec)
    root = Path(path)
    ranks = Ranks.current()
    wanted = build_manifest(model, layout, codec, cfg, inputs)
    manifest_path = root / "manifest.json"
    if ranks.rank == 0 and not manifest_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(wanted, manifest_path)
    ranks.barrier()
    manifest = read_json(manifest_path)
    check_same(manifest, wanted, f"store {root}")
    for sub in ("pass1", "pass2/a", "pass2/b"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if ranks.rank == 0:
        remove_stale_temps(root)  # half-written files of a killed run (the store's own names only); never read
    ranks.barrier()
    tasks = dict(zip(TASKS, (task_a, task_b)))
    needs = needed_statistics(cfg, codec)
    stats_dtype = stats_dtype or default_stats_dtype(model)
    check_tasks_fit(model, codec, cfg, stats_dtype, task_a, task_b)
    stats = {t: _pass1(root, t, model, loss_fn, tasks[t], layout, checkpoint_every, show_progress, ranks, stats_dtype,
                       needs[t]) for t in TASKS}
    _check_space(root, layout, codec, stats["a"].count + stats["b"].count, max_bytes)
    preps = prepare_all(layout, stats["a"], stats["b"], cfg, codec, offload=True)
    for t in TASKS:
        folder = root / "pass2" / t
        done = {p.name for p in folder.glob("*.safetensors")}
        it = sketch_batches(model, loss_fn, tasks[t], layout, codec, preps, t, stats["a"].count, cfg,
                            skip=lambda i: shard_name(i) in done or not ranks.mine(i), desc=f"pass 2 {t}",
                            show_progress=show_progress)
        for index, size, blocks in it:
            tensors = {}
            for (layer, block), (sk, norm2, cross) in blocks.items():
                q, scale = quantize(sk, codec.dtype)
                tensors[f"{layer}.{block}.vec"] = q
                if scale is not None:
                    tensors[f"{layer}.{block}.scale"] = scale
                tensors[f"{layer}.{block}.norm2"] = norm2.double()
                tensors[f"{layer}.{block}.cross"] = cross.double()
            atomic_save_tensors(tensors, folder / shard_name(index), {"batch": str(index), "samples": str(size)})
    ranks.barrier()
    if ranks.rank != 0:
        ranks.barrier()
        return root
    manifest["tasks"] = {}
    for t in TASKS:  # sample id = position in iteration order; batch b holds ids [start_b, start_b + size_b)
        sizes = [int(read_metadata(p)["samples"]) for p in sorted((root / "pass2" / t).glob("*.safetensors"))]
        manifest["tasks"][t] = {"samples": stats[t].count, "batch_sizes": sizes}
        if sum(sizes) != stats[t].count:
            raise InputError(f"task {t}: pass 2 saw {sum(sizes)} samples but pass 1 saw {stats[t].count}; "
                             "the task must yield the same batches on every pass")
    manifest["complete"] = True
    atomic_write_json(manifest, manifest_path)
    ranks.barrier()
    return root


