"""Resumable collection of sketches into a store directory: the order of the passes, the checks
before any work, and the manifest once complete (:mod:`.pass1` writes the statistics, :mod:`.shards`
the sketches).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..capture.oracle import LossFn, batch_size_of
from ..collect import default_stats_dtype, needed_statistics, prepare_all, sketch_batches
from ..collect import trainable_weights
from ..collect.memory import check_tasks_fit, format_bytes, store_disk_bytes
from ..collect.sketches import centre_j_side, centred, check_reiterable, check_sketch_width, compacted_statistics
from ..collect.sketches import host_staging, pass_b, resolve_passes, statistics_dtypes
from ..compress import Sketch
from ..errors import InputError
from ..fisher import FisherStats
from ..fisher.host import host_copy
from ..layout import Layout
from ..metric import ScoreConfig
from ..phases import PhaseLog
from .files import StoreLock, Writes, atomic_write_json, read_metadata, remove_stale_temps
from .integrity import check_header, index_entry
from .manifest import build_manifest, check_same, new_store_id, passes_of, read_manifest, seal
from .pass1 import Counter, Ranks, counted, final_path, partial_path, run_pass1, save_pass1
from .shards import TASKS, ShardParts, drop_stale_shards, shard_name, write_shard

logger = logging.getLogger(__name__)


def _check_space(root: Path, model: nn.Module, codec: Sketch, samples: int | None, batches: int | None,
                 stats_copies: tuple[int, int], stats_dtype: torch.dtype, max_bytes: int | None,
                 world: int = 1, compact_copies: tuple[int, int] = (0, 0)) -> None:
    """Refuse before writing when the store would not fit the disk (or ``max_bytes``): everything it writes
    (:func:`~sketchfisher.collect.memory.store_disk_bytes`), less what is already there. Skipped while the
    sample counts are unknown (tasks that are not lists of batches, before pass 1 has counted them)."""
    if samples is None or batches is None:
        return
    plan = store_disk_bytes(model, codec, samples, batches, stats_copies, torch.finfo(stats_dtype).bits // 8, world,
                            compact_copies)
    stored = plan["sketches"] + plan["shard_headers"] + plan["statistics"] + plan["manifest"]
    already = sum(p.stat().st_size for p in root.rglob("*.safetensors") if p.is_file())
    needed = max(0, plan["total"] - already)
    free = shutil.disk_usage(root).free
    parts = ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in plan.items() if k != "total")
    if max_bytes is not None and stored > max_bytes:
        raise InputError(f"the planned store is {stored:,} bytes ({format_bytes(stored)}: {parts}; {samples} samples), "
                         f"over max_bytes={max_bytes:,}")
    if needed > free:
        raise InputError(f"the store needs {format_bytes(needed)} more on disk ({parts}) but {root} has "
                         f"{format_bytes(free)} free")


def _counts(*tasks: Iterable[Any]) -> tuple[int | None, int | None]:
    """(samples, batches) over the tasks when they are lists of batches whose sizes can be read."""
    if not all(isinstance(t, (list, tuple)) for t in tasks):
        return None, None
    sizes = [batch_size_of(b) for t in tasks for b in t]
    return (None, None) if any(n is None for n in sizes) else (sum(sizes), len(sizes))


@dataclass
class _Run:
    """What every pass of one store collection shares."""

    root: Path
    ranks: Ranks
    model: nn.Module
    loss_fn: LossFn
    tasks: dict[str, Iterable[Any]]
    layout: Layout
    codec: Sketch
    cfg: ScoreConfig
    store_id: str
    show_progress: bool
    log: PhaseLog
    writes: Writes

    def submit_shard(self, t: str, index: int, size: int, blocks: dict) -> None:
        parts = ShardParts.of(blocks, self.codec)
        self.writes.submit(write_shard, parts, self.root / "pass2" / t / shard_name(index), self.store_id, t, index,
                           size, nbytes=parts.nbytes())


def _pass2(run: _Run, t: str, preps: dict, count_a: int) -> None:
    """Pass 2 of one task: the shards not written yet (resumption skips those that are)."""
    done = {p.name for p in (run.root / "pass2" / t).glob("*.safetensors")}
    with run.log.phase(f"pass 2 {t.upper()}"):
        for index, size, blocks in sketch_batches(
                run.model, run.loss_fn, run.tasks[t], run.layout, run.codec, preps, t, count_a, run.cfg,
                skip=lambda i: shard_name(i) in done or not run.ranks.mine(i), desc=f"pass 2 {t}",
                show_progress=run.show_progress):
            run.submit_shard(t, index, size, blocks)


def _task_b_once(run: _Run, stats_a: FisherStats, quantities: tuple[str, ...], stats_dtype: torch.dtype,
                 staging: Any, stat_writes: Writes) -> tuple[FisherStats, dict]:
    """Task B in one pass, after task A's pass 1 (:func:`sketchfisher.collect.sketches.collect_sketches_b_once`
    in memory): ``(B's statistics, the preparations for A's pass 2)``.

    The preparations come from task A alone; B's pass folds B's statistics and keeps its sketches
    uncentred on the device; then B's statistics go to disk and each shard is written centred by
    ``R ȳ'``. A run killed before B's statistics reached the disk redoes the whole pass (its shards are
    stale then and deleted on restart); once they are on disk, B's centre is known and the shards still
    missing are a plain pass 2 over B, balanced the same way."""
    root, ranks, layout, codec, cfg, log = run.root, run.ranks, run.layout, run.codec, run.cfg, run.log
    final = final_path(root, "b")
    if final.exists():
        stats_b, _ = run_pass1(root, "b", run.model, run.loss_fn, run.tasks["b"], layout, None, run.show_progress,
                            ranks, stats_dtype, quantities, run.store_id)
        with log.phase("preparation"):
            preps = prepare_all(layout, stats_a, stats_b, cfg, codec, offload=True, keep=(), balance_from_a=True)
        _pass2(run, "b", preps, stats_a.count)
        return stats_b, preps
    with log.phase("preparation"):
        preps = prepare_all(layout, stats_a, None, cfg, codec, offload=True, keep=())
    seen = Counter()
    reduce = (lambda stats: stats.all_reduce(trainable_weights(run.model, layout))) if ranks.world > 1 else None
    with log.phase("pass B (statistics and sketches)"):
        raw, stats_b = pass_b(run.model, run.loss_fn, counted(run.tasks["b"], seen), layout, codec, cfg, preps,
                              stats_a.count, quantities, stats_dtype, skip=lambda i: not ranks.mine(i),
                              show_progress=run.show_progress, reduce=reduce)
    if ranks.rank == 0:
        with log.phase("statistics B to host"):
            host = stats_b.to_host(staging.copy if staging is not None else host_copy)
        stat_writes.submit(save_pass1, host, final, seen.batches, run.store_id, "b")
        del host
    if staging is not None:
        staging.close()
    with log.phase("centring B"):
        centres = centre_j_side(layout, codec, cfg, preps, stats_b)
        while raw:
            index, size, blocks = raw.pop(0)
            run.submit_shard("b", index, size, centred(blocks, centres))
    return stats_b, preps


def stored_passes(path: str | Path) -> float | None:
    """The pass order recorded by the store at ``path``; None when there is no store there yet."""
    manifest = Path(path) / "manifest.json"
    return passes_of(read_manifest(manifest)) if manifest.exists() else None


def collect_to_store(path: str | Path, model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any],
                     task_b: Iterable[Any], layout: Layout, codec: Sketch, cfg: ScoreConfig, *,
                     checkpoint_every: int | None = None, max_bytes: int | None = None,
                     show_progress: bool = False, stats_dtype: torch.dtype | None = None,
                     inputs: dict[str, Any] | None = None, log: PhaseLog | None = None,
                     passes: float | None = None) -> Path:
    """Collect (or finish collecting) a sketch store at ``path``; returns the path.

    ``passes=1.5`` (normaliser ``"a"``, a sketch with variance reduction; the default there) runs task B
    once, between task A's two passes, as ``sf.analyze(passes=1.5)`` does (:func:`_task_b_once`); ``2``
    runs two passes per task. The manifest records the order; a store is only resumed in the order that
    began it (``passes=None`` takes it from the store).

    ``log`` (a :class:`~sketchfisher.phases.PhaseLog`) records each phase's time and peak device memory.
    The final pass-1 statistics and the pass-2 shards are written by a background thread while the GPU
    goes on; the call returns when everything is on disk.

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
    if ranks.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    with StoreLock(root) if ranks.rank == 0 else nullcontext():  # one writer (one run's rank 0) at a time
        return _collect(root, ranks, model, loss_fn, task_a, task_b, layout, codec, cfg, checkpoint_every,
                        max_bytes, show_progress, stats_dtype, inputs, log, passes)


def _collect(root: Path, ranks: Ranks, model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any],
             task_b: Iterable[Any], layout: Layout, codec: Sketch, cfg: ScoreConfig, checkpoint_every: int | None,
             max_bytes: int | None, show_progress: bool, stats_dtype: torch.dtype | None,
             inputs: dict[str, Any] | None, log: PhaseLog | None, passes: float) -> Path:
    passes = resolve_passes(stored_passes(root) if passes is None else passes, cfg, codec)
    wanted = build_manifest(model, layout, codec, cfg, inputs, passes)
    manifest_path = root / "manifest.json"
    if ranks.rank == 0 and not manifest_path.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(seal({**wanted, "store_id": new_store_id()}), manifest_path)
    ranks.barrier()
    manifest = read_manifest(manifest_path)
    check_same(manifest, wanted, f"store {root}")
    store_id = manifest["store_id"]
    for sub in ("pass1", "pass2/a", "pass2/b"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    if ranks.rank == 0:
        remove_stale_temps(root)  # half-written files of a killed run (the store's own names only); never read
    ranks.barrier()
    tasks = dict(zip(TASKS, (task_a, task_b)))
    log = log if log is not None else PhaseLog.for_devices([p.device for p in model.parameters()])
    needs = needed_statistics(cfg, codec, means=layout.beyond_heads, passes=passes)
    stats_dtype = stats_dtype or default_stats_dtype(model)
    check_tasks_fit(model, codec, cfg, stats_dtype, task_a, task_b, passes=passes)
    if ranks.rank == 0 and not all(final_path(root, t).exists() for t in TASKS):
        drop_stale_shards(root)
    ranks.barrier()
    stats_copies = tuple(len(needs[t]) for t in TASKS)
    compact = tuple(sum(q in compacted_statistics(layout) for q in needs[t]) for t in TASKS)
    _check_space(root, model, codec, *_counts(task_a, task_b), stats_copies, stats_dtype, max_bytes, ranks.world,
                 compact)
    # the final pass-1 statistics are written to disk in the background while pass 2 runs; their host
    # memory is made ready while pass 1 runs
    dtypes = [d for t in TASKS if not final_path(root, t).exists() for d in statistics_dtypes(needs[t], layout, stats_dtype)]
    staging = host_staging(model, layout, dtypes if ranks.rank == 0 else [])
    # two writers: the statistics (tens of GB at 7B) must not hold up the shards behind them
    stat_writes, writes = Writes(), Writes()
    try:
        stats = {}
        run = _Run(root, ranks, model, loss_fn, tasks, layout, codec, cfg, store_id, show_progress, log, writes)
        for t in TASKS if passes == 2 else ("a",):
            with log.phase(f"pass 1 {t.upper()}"):
                stats[t], batches = run_pass1(root, t, model, loss_fn, tasks[t], layout, checkpoint_every,
                                           show_progress, ranks, stats_dtype, needs[t], store_id)
                stats[t].compact(compacted_statistics(layout))  # (read from the store: rounded already)
            if batches is not None and ranks.rank == 0:
                with log.phase(f"statistics {t.upper()} to host"):
                    host = stats[t].to_host(staging.copy if staging is not None else host_copy)
                stat_writes.submit(save_pass1, host, final_path(root, t), batches, store_id, t)
                del host
        if passes == 2:
            if staging is not None:
                staging.close()
            _check_space(root, model, codec, stats["a"].count + stats["b"].count, _counts(task_a, task_b)[1] or
                         stats["a"].count + stats["b"].count, stats_copies, stats_dtype, max_bytes, ranks.world,
                         compact)
            with log.phase("preparation"):
                # every statistic is on disk (or on its way there): the device copies are freed as consumed
                preps = prepare_all(layout, stats["a"], stats["b"], cfg, codec, offload=True, keep=())
        else:
            stats["b"], preps = _task_b_once(run, stats["a"], needs["b"], stats_dtype, staging, stat_writes)
        for t in TASKS if passes == 2 else ("a",):
            _pass2(run, t, preps, stats["a"].count)
        del preps
        with log.phase("writes"):  # what the disk still owes once the GPU is done
            writes.wait()
            stat_writes.wait()
    finally:
        writes.close()
        stat_writes.close()
        if staging is not None:
            staging.close()
    ranks.barrier()
    for t in TASKS:
        partial_path(root, t, ranks).unlink(missing_ok=True)
    ranks.barrier()
    if ranks.rank != 0:
        ranks.barrier()
        return root
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
        manifest["tasks"][t] = {"samples": stats[t].count, "batch_sizes": sizes}
        if sum(sizes) != stats[t].count:
            raise InputError(f"task {t}: pass 2 saw {sum(sizes)} samples but pass 1 saw {stats[t].count}; "
                             "the task must yield the same batches on every pass")
    manifest["complete"] = True
    atomic_write_json(seal(manifest), manifest_path)
    ranks.barrier()
    return root
