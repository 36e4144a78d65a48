"""Resumable collection of sketches into a store directory: the pass plan executed into a
:class:`StoreSink`, the checks before any work, and the manifest once complete (:mod:`.pass1` writes
the statistics, :mod:`.shards` the sketches).

Layout of a store::

    manifest.json                 settings, layout, model fingerprint, per-task sample counts
    pass1/<task>.safetensors      final pass-1 statistics of task a or b
    pass1/<task>.partial.safetensors   checkpoint while pass 1 runs (statistics + batches done)
    pass2/<task>/<batch>.safetensors   one shard per batch of sketches (written, then renamed)

Every file is written under a temporary name and renamed, so a file is either complete or absent.
A run killed at any point and restarted with the same arguments skips what is complete: pass-1
checkpoints resume from the batches they recorded (Welford states merge exactly) and pass 2 skips
batches whose shard exists. Every sample is counted exactly once. With task B in one pass (the
default where it applies) B's statistics are not checkpointed: a run killed before they reach the
disk redoes B's pass.

Under ``torch.distributed`` (``torchrun``; NCCL on GPUs, gloo on CPU) every rank runs this with the
same tasks: batch i belongs to rank i % world; pass-1 statistics are all-reduced; each rank writes its
own pass-2 shards into the one store; rank 0 writes the manifest. The sketches are those of a
single-process run (same seeds), up to the rounding of the statistics' reduction order.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from ..capture.oracle import LossFn, batch_size_of
from ..collect import Job, Sink, default_stats_dtype, execute, pass_plan, trainable_weights
from ..collect.disk import statistics_widths, store_disk_bytes
from ..collect.memory import format_bytes
from ..collect.runner import check_job
from ..collect.plan import Step
from ..collect.sketches import host_staging, statistics_dtypes
from ..compress import SideCodec, check_codec
from ..errors import InputError
from ..fisher import FisherStats
from ..fisher.host import host_copy
from ..layout import Layout
from ..layout.adapters import base_model
from ..metric import ScoreConfig
from ..phases import PhaseLog
from .files import StoreError, StoreLock, Writes, atomic_write_json, read_metadata, remove_stale_temps
from .integrity import check_header, index_entry, shard_damage
from .manifest import build_manifest, check_same, conflicts_of, new_store_id, passes_of, read_manifest, seal
from .pass1 import Checkpoints, Counted, Counter, Ranks, final_path, partial_path, read_final, run_pass1, save_pass1
from .shards import TASKS, ShardParts, drop_stale_shards, shard_index, shard_name, write_shard

logger = logging.getLogger(__name__)


def _check_space(root: Path, layout: Layout, codec: SideCodec, samples: int | None, batches: int | None,
                 statistics: dict[str, tuple[str, ...]], stats_dtype: torch.dtype, max_bytes: int | None,
                 world: int = 1, conflicts: bool = False, checkpoints: bool = True) -> None:
    """Refuse before writing when the store would not fit the disk (or ``max_bytes``): everything it writes
    (:func:`~sketchfisher.collect.disk.store_disk_bytes`), less what is already there. Skipped while the
    sample counts are unknown (tasks that are not lists of batches, before pass 1 has counted them)."""
    if samples is None or batches is None:
        return
    widths = tuple(statistics_widths(statistics[t], layout.beyond_heads, stats_dtype) for t in TASKS)
    plan = store_disk_bytes(layout, codec, samples, batches, widths, world, conflicts, checkpoints)
    stored = plan["total"] - plan["pass1_checkpoint"]
    already = sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.is_file()) if root.exists() else 0
    needed = max(0, plan["total"] - already)
    free = shutil.disk_usage(next(p for p in (root, *root.resolve().parents) if p.exists())).free
    parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in plan.items() if k != "total")
    if max_bytes is not None and stored > max_bytes:
        raise InputError(f"the planned store is {stored:,} bytes ({format_bytes(stored)}: {parts}; {samples} samples), "
                         f"over max_bytes={max_bytes:,}")
    if needed > free:
        hint = ""
        if checkpoints and needed - plan["pass1_checkpoint"] <= free:
            hint = (f"; without pass-1 checkpoints (checkpoint_every=0, the CLI's --no-checkpoint) it needs "
                    f"{format_bytes(max(0, needed - plan['pass1_checkpoint']))}, which fits")
        raise InputError(f"the store needs {format_bytes(needed)} more on disk ({parts}) but {root} has "
                         f"{format_bytes(free)} free{hint}")


def check_space_before_loading(root: Path, codec: SideCodec, cfg: ScoreConfig, layout: Layout,
                                sizes: tuple[int, int], batch_size: int, passes: float | None, conflicts: bool,
                                stats_dtype: torch.dtype, max_bytes: int | None, checkpoints: bool = True) -> None:
    """The disk check of a collection from its layout alone (resolved on a weightless skeleton of the model) and
    the tasks' sample counts, before any weight is read: the same numbers and refusal as the check before pass 1."""
    existing = stored_passes(root) if (root / "manifest.json").exists() else None
    plan = pass_plan(codec, cfg, existing if passes is None else passes, means=layout.beyond_heads, conflicts=conflicts)
    batches = sum(-(-n // batch_size) for n in sizes)
    _check_space(root, layout, codec, sum(sizes), batches, plan.statistics, stats_dtype, max_bytes, 1, conflicts,
                 checkpoints)


def _counts(*tasks: Iterable[Any]) -> tuple[int | None, int | None]:
    """(samples, batches) over the tasks when they are lists of batches whose sizes can be read."""
    if not all(isinstance(t, (list, tuple)) for t in tasks):
        return None, None
    sizes = [batch_size_of(b) for t in tasks for b in t]
    return (None, None) if any(n is None for n in sizes) else (sum(sizes), len(sizes))


class StoreSink(Sink):
    """The store's sink for the pass plan: statistics checkpointed while a statistics pass runs (resumed from
    the last checkpoint) and written once final, in the background; each batch's side vectors written as a
    shard, in the background; batches whose shard exists (or that belong to another rank) skipped."""

    def __init__(self, root: Path, ranks: Ranks, store_id: str, codec: SideCodec, checkpoint_every: int | None,
                 staging: Any, space: Callable[[int], None], lockstep: bool = False, keeps_fisher_a: bool = True):
        self.root, self.ranks, self.store_id, self.codec = root, ranks, store_id, codec
        self.lockstep = lockstep  # a sharded model: every rank runs every one of its batches (collectives)
        self.checkpoint_every, self.staging, self.space = checkpoint_every, staging, space
        self.keep = ()  # every statistic is on disk (or on its way there): device copies are freed as consumed
        self.fisher_a: Optional[FisherStats] = None
        self.keeps_fisher_a = keeps_fisher_a  # task B's single pass runs without w_a: rebuilt from A's Fisher
        self.counters: dict[str, Counter] = {}
        self.batches_seen: dict[str, int | None] = {}
        # two writers: the statistics (tens of GB at 7B) must not hold up the shards behind them
        self.stat_writes, self.writes = Writes(), Writes()
        self.final: dict[str, int] = {}  # task -> samples, once its statistics are final

    def fold(self, step: Step, job: Job, quantities: tuple[str, ...]) -> FisherStats:
        stats, batches = run_pass1(self.root, step.task, job.model, job.loss_fn, job.tasks[step.task], job.layout,
                                   self.checkpoint_every, job.show_progress, self.ranks, job.stats_dtype, quantities,
                                   self.store_id, desc=step.name)
        self.batches_seen[step.task] = batches
        return stats

    def batches(self, task: str, job: Job) -> Iterable[Any]:
        self.counters[task] = Counter()
        return Counted(job.tasks[task], self.counters[task])

    def skip(self, task: str):
        """Batches whose shard a killed run wrote (each read and checked first: a damaged one is named, deleted
        and computed again) or that another rank computes."""
        done = set()
        for path in sorted((self.root / "pass2" / task).glob("*.safetensors")):
            index = shard_index(path.name)
            damage = None if index is None or not self.ranks.mine(index) else shard_damage(path, self.store_id, task,
                                                                                          index)
            if damage is not None:
                logger.warning("%s is damaged (%s): deleted, its batch is computed again", path, damage)
                path.unlink()
                continue
            done.add(path.name)
        if self.lockstep:  # a sharded model's passes are collectives: every rank runs all of its batches again
            return lambda i: not self.ranks.mine(i)
        return lambda i: shard_name(i) in done or not self.ranks.mine(i)

    def reduce(self, job: Job):
        if self.ranks.world == 1:
            return None
        return lambda stats: stats.all_reduce(trainable_weights(job.model, job.layout))

    def final_statistics(self, task: str) -> FisherStats | None:
        if not final_path(self.root, task).exists():
            return None
        self.batches_seen[task] = None  # read from the store: nothing to write again
        return read_final(self.root, task, self.store_id)

    def statistics_final(self, task: str, stats: FisherStats) -> None:
        # a statistics pass says how many batches it computed (None: read from the store); a single pass
        # over the task counted them as they went by
        batches = self.batches_seen.pop(task) if task in self.batches_seen else self.counters[task].batches
        host = None
        if batches is not None and self.ranks.rank == 0:  # computed now: to host memory, then to disk
            host = stats.to_host(self.staging.copy if self.staging is not None else host_copy)
            self.stat_writes.submit(save_pass1, host, final_path(self.root, task), batches, self.store_id, task)
        if task == "a" and self.keeps_fisher_a:  # A's Fisher in host memory: w_a is built again after B's single pass
            self.fisher_a = (host or stats.to_host()).only(("fisher", "sum"))  # (Σg where kept: the test's T)
        del host
        self.final[task] = stats.count
        if set(self.final) == set(TASKS):
            if self.staging is not None:
                self.staging.close()
            self.space(sum(self.final.values()))

    def a_fisher(self, state: Any) -> Optional[FisherStats]:
        return self.fisher_a

    def sides(self, task: str, index: int, size: int, blocks: dict) -> None:
        parts = ShardParts.of(blocks, self.codec)
        self.writes.submit(write_shard, parts, self.root / "pass2" / task / shard_name(index), self.store_id, task,
                           index, size, nbytes=parts.nbytes())

    def flush(self) -> None:
        self.writes.wait()
        self.stat_writes.wait()

    def close(self) -> None:
        self.writes.close()
        self.stat_writes.close()
        if self.staging is not None:
            self.staging.close()


def stored_passes(path: str | Path) -> float | None:
    """The pass order recorded by the store at ``path``; None when there is no store there yet."""
    manifest = Path(path) / "manifest.json"
    return passes_of(read_manifest(manifest)) if manifest.exists() else None


def sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are sharded over the ranks (FSDP2 ``fully_shard``: DTensors)."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def check_lockstep(model: nn.Module, tasks: dict, ranks: Ranks) -> None:
    """A sharded model gathers its weights in every forward and backward, a collective: every rank must run
    the same number of batches. Batch ``i`` goes to rank ``i % world``, so each task's batch count must be a
    multiple of the world size; refused before any work otherwise (it would hang)."""
    if ranks.world == 1 or not sharded(model):
        return
    for task, batches in tasks.items():
        n = len(batches) if hasattr(batches, "__len__") else None
        if n is None or n % ranks.world:
            raise InputError(f"task {task.upper()}: a model sharded over {ranks.world} ranks (FSDP) runs each batch "
                             f"on all ranks at once, so every rank needs the same number of batches; "
                             f"{'an uncounted iterable' if n is None else f'{n} batches'} do not split evenly: "
                             f"give a multiple of {ranks.world} batches (a list or a DataLoader with drop_last)")


def collect_to_store(path: str | Path, model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any],
                     task_b: Iterable[Any], layout: Layout, codec: SideCodec, cfg: ScoreConfig, *,
                     checkpoint_every: int | None = None, max_bytes: int | None = None,
                     show_progress: bool = False, stats_dtype: torch.dtype | None = None,
                     inputs: dict[str, Any] | None = None, log: PhaseLog | None = None,
                     passes: float | None = None, conflicts: bool | None = None) -> Path:
    """Collect (or finish collecting) a store of a side codec (``sf.Sketch``) at ``path``; returns the path.

    The collection is the pass plan of ``sf.analyze`` (:func:`sketchfisher.collect.plan.pass_plan`) plus a
    final ``writes`` step, executed into a :class:`StoreSink`. ``passes=1.5`` (normaliser ``"a"``, variance
    reduction; the default there) runs task B once, between task A's two passes; ``2`` runs two passes per
    task. The manifest records the order; a store is only resumed in the order that began it
    (``passes=None`` takes it from the store). A resumed store runs the same plan: a task whose final statistics
    are on disk reads them back, and only the batches whose shards are missing run again, with the arithmetic
    of the first run, so the store is bitwise the one an uninterrupted run writes.

    ``checkpoint_every``: when pass 1 checkpoints its statistics for resumption (:class:`Checkpoints
    <sketchfisher.store.pass1.Checkpoints>`): None (default) by time, every N batches, or 0 never: a run killed
    in pass 1 then redoes it, and the disk need not hold a checkpoint beside the statistics (at 7B, tens of GB).

    ``log`` (a :class:`~sketchfisher.phases.PhaseLog`) records each step's time and peak device memory.
    The final pass-1 statistics and the pass-2 shards are written by background threads while the GPU
    goes on; the call returns when everything is on disk.

    Before pass 2 writes anything, the planned size of the store (known once pass 1 has counted the samples)
    is compared with ``max_bytes`` and with the free disk; collection refuses to go on with the numbers in
    the error. ``conflicts`` records each sample's conflict scalars (``sf.analyze``'s option of that name; an
    existing store keeps its own).
    """
    codec = check_codec(codec)
    model = base_model(model)  # a PEFT model: its base model, adapters injected (the effective weights)
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise InputError(f"max_bytes bounds the store's size on disk and must be a positive number of bytes (or "
                         f"None); got {max_bytes!r}")
    Checkpoints(checkpoint_every)  # (its value checked before any work)
    if not codec.two_pass:
        raise InputError(f"stores hold the side vectors of a pass-2 codec (sf.Sketch or a registered SideCodec); "
                         f"got codec {codec!r}")
    codec.check_layout(layout)
    root = Path(path)
    ranks = Ranks.current()
    if ranks.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    with StoreLock(root) if ranks.rank == 0 else nullcontext():  # one writer (one run's rank 0) at a time
        return _collect(root, ranks, model, loss_fn, task_a, task_b, layout, codec, cfg, checkpoint_every,
                        max_bytes, show_progress, stats_dtype, inputs, log, passes, conflicts)


def _collect(root: Path, ranks: Ranks, model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any],
             task_b: Iterable[Any], layout: Layout, codec: SideCodec, cfg: ScoreConfig, checkpoint_every: int | None,
             max_bytes: int | None, show_progress: bool, stats_dtype: torch.dtype | None,
             inputs: dict[str, Any] | None, log: PhaseLog | None, passes: float | None,
             conflicts: bool | None) -> Path:
    existing = read_manifest(root / "manifest.json") if (root / "manifest.json").exists() else None
    if existing is not None and conflicts is None:  # a store is finished as it was begun
        conflicts = conflicts_of(existing)
    plan = pass_plan(codec, cfg, stored_passes(root) if passes is None else passes, means=layout.beyond_heads,
                     conflicts=conflicts is not False)
    tasks = dict(zip(TASKS, (task_a, task_b)))
    check_lockstep(model, tasks, ranks)
    log = log if log is not None else PhaseLog.for_devices([p.device for p in model.parameters()])
    stats_dtype = stats_dtype or default_stats_dtype(model)
    on_disk = {t for t in TASKS if final_path(root, t).exists()}
    job = Job(model, loss_fn, tasks, layout, codec, cfg, stats_dtype, log, show_progress)
    plan = check_job(plan.with_writes(), job, conflicts)  # (the tasks, the layout, the device)
    wanted = build_manifest(model, layout, codec, cfg, inputs, plan.passes, plan.conflicts)
    manifest_path = root / "manifest.json"
    if ranks.rank == 0 and not manifest_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        _begin_or_restore(root, wanted)
    ranks.barrier()
    manifest = read_manifest(manifest_path)
    check_same(manifest, wanted, f"store {root}")
    store_id = manifest["store_id"]
    for sub in ("pass1", "pass2/a", "pass2/b"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if ranks.rank == 0:
        remove_stale_temps(root)  # half-written files of a killed run (the store's own names only); never read
    ranks.barrier()
    if ranks.rank == 0 and on_disk != set(TASKS):
        drop_stale_shards(root)
    ranks.barrier()
    space = lambda samples, batches=None: _check_space(  # noqa: E731  (again once pass 1 counted the samples)
        root, layout, codec, samples, batches or _counts(task_a, task_b)[1] or samples, plan.statistics, stats_dtype,
        max_bytes, ranks.world, plan.conflicts, checkpoint_every != 0)
    space(*_counts(task_a, task_b))  # refused before any work when the tasks can be counted
    # the final statistics are written to disk in the background while the passes go on; their host memory
    # is made ready while pass 1 runs
    dtypes = [d for t in TASKS if t not in on_disk for d in statistics_dtypes(plan.statistics[t], layout, stats_dtype)]
    sink = StoreSink(root, ranks, store_id, codec, checkpoint_every,
                     host_staging(model, layout, dtypes if ranks.rank == 0 else []), space,
                     lockstep=ranks.world > 1 and sharded(model),
                     keeps_fisher_a=any(step.kind == "fold_sketch" for step in plan.steps))
    try:
        state = execute(plan, job, sink)
    finally:
        sink.close()
    ranks.barrier()
    for t in TASKS:
        partial_path(root, t, ranks).unlink(missing_ok=True)
    ranks.barrier()
    if ranks.rank != 0:
        ranks.barrier()
        return root
    _seal_complete(root, manifest, store_id, {t: state.stats[t].count for t in TASKS})
    ranks.barrier()
    return root


def write_manifest(root: Path, manifest: dict) -> None:
    """The manifest, and its copy in ``pass1/`` (from which a deleted manifest is restored)."""
    (root / "pass1").mkdir(parents=True, exist_ok=True)
    atomic_write_json(manifest, root / "pass1" / "manifest.json")
    atomic_write_json(manifest, root / "manifest.json")


def _begin_or_restore(root: Path, wanted: dict) -> None:
    """A new store's manifest; or, for a store whose manifest.json was deleted, its copy put back (checked as
    any manifest is: sealed, and against this run's settings). Files without either are refused by name rather
    than adopted under settings nobody recorded."""
    copy = root / "pass1" / "manifest.json"
    if copy.exists():
        logger.warning("%s was missing: restored from its copy %s", root / "manifest.json", copy)
        atomic_write_json(read_manifest(copy), root / "manifest.json")  # (checked: sealed and whole)
        return
    written = [p for sub in ("pass1", "pass2/a", "pass2/b") for p in sorted((root / sub).glob("*.safetensors"))]
    if written:
        raise StoreError(f"{root} holds collection files ({written[0].relative_to(root)}, ...) but no manifest.json "
                         "and no copy of it, so the settings they were written with are unknown; move them away or "
                         "collect into a new directory")
    write_manifest(root, seal({**wanted, "store_id": new_store_id()}))


def _seal_complete(root: Path, manifest: dict, store_id: str, counts: dict[str, int]) -> None:
    """Index every file the collection wrote into the manifest, check that the shards are the batches
    0..n−1 holding every sample its statistics counted, and seal it as complete."""
    manifest["tasks"], manifest["files"] = {}, {}
    for t in TASKS:  # sample id = position in iteration order; batch b holds ids [start_b, start_b + size_b)
        shards = sorted((root / "pass2" / t).glob("*.safetensors"))
        if [p.name for p in shards] != [shard_name(i) for i in range(len(shards))]:
            raise InputError(f"task {t}: the shards {[p.name for p in shards][:5]}... are not the batches "
                             f"0..{len(shards) - 1}")
        sizes = []
        for index, path in enumerate(shards):
            meta = read_metadata(path)
            check_header(path, meta, store_id, t, index, meta.get("samples"))
            sizes.append(int(meta["samples"]))
            manifest["files"][f"pass2/{t}/{path.name}"] = index_entry(meta)
        final = final_path(root, t)
        manifest["files"][f"pass1/{final.name}"] = index_entry(read_metadata(final))
        manifest["tasks"][t] = {"samples": counts[t], "batch_sizes": sizes}
        if sum(sizes) != counts[t]:
            raise InputError(f"task {t}: pass 2 saw {sum(sizes)} samples but pass 1 saw {counts[t]}; "
                             "the task must yield the same batches on every pass")
    manifest["complete"] = True
    write_manifest(root, seal(manifest))
