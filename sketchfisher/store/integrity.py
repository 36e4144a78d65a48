"""What every store file carries so that a reader can tell it belongs, unchanged, where it is found.

Each file's safetensors metadata names the store (its random ``store_id``), the task and, for shards,
the batch index and sample count; it also holds a content digest (statistics: of all tensors; shards:
one per ``layer.block`` group, so that a lazy read of one block can be checked on its own). At the end
of a collection the manifest records every file with its digest and is sealed
(:func:`~sketchfisher.store.manifest.seal`). A reader then refuses a file that is missing, extra,
renamed, swapped, copied from another task or store, symlinked, or changed by a single byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .files import StoreError, block_digests, content_digest, load_tensors


def stats_metadata(tensors: dict[str, torch.Tensor], store_id: str, task: str) -> dict[str, str]:
    return {"store_id": store_id, "task": task, "digest": content_digest(tensors)}


def shard_metadata(tensors: dict[str, torch.Tensor], store_id: str, task: str, batch: int,
                   samples: int) -> dict[str, str]:
    return {"store_id": store_id, "task": task, "batch": str(batch), "samples": str(samples),
            "blocks": json.dumps(block_digests(tensors), sort_keys=True)}


def index_entry(meta: dict[str, str]) -> str:
    """What the manifest records of a file: its content digest (a shard's: of its blocks' digests)."""
    return meta["digest"] if "digest" in meta else hashlib.sha256(meta.get("blocks", "").encode()).hexdigest()


def check_header(path: Path, meta: dict[str, str], store_id: str, task: str, batch: int | None = None,
                 samples: int | None = None) -> None:
    """A file's metadata names this store, this task and (shards) this batch and sample count."""
    found = {"store_id": meta.get("store_id"), "task": meta.get("task")}
    wanted = {"store_id": store_id, "task": task}
    if batch is not None:
        found.update(batch=meta.get("batch"), samples=meta.get("samples"))
        wanted.update(batch=str(batch), samples=str(samples))
    wrong = [f"{k} {found[k]!r} (expected {wanted[k]!r})" for k in wanted if found[k] != wanted[k]]
    if wrong:
        raise StoreError(f"{path} does not belong here: {', '.join(wrong)}; it was renamed, swapped or copied "
                         "from another task or store")


def check_digest(path: Path, tensors: dict[str, torch.Tensor], expected: str, what: str = "content") -> None:
    if content_digest(tensors) != expected:
        raise StoreError(f"{path}: {what} does not match its recorded digest (the file was changed or corrupted)")


def shard_damage(path: Path, store_id: str, task: str, batch: int) -> str | None:
    """What is wrong with one written shard (read whole, each block checked against the digest its header
    records), or None when it is intact."""
    try:
        tensors, meta = load_tensors(path)
        check_header(path, meta, store_id, task, batch, meta.get("samples"))
        recorded = json.loads(meta.get("blocks", "{}"))
        if not isinstance(recorded, dict) or not recorded:
            return "its header records no block digests"
        if block_digests(tensors) != recorded:
            return "its content does not match the digests its header records"
    except (StoreError, ValueError) as exc:
        return str(exc)
    return None
