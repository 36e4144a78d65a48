"""Pass-2 shards of a store: one safetensors file per batch of sketches, written by a background thread."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..collect.finite import finite_rows, overflow_error
from ..compress import SideCodec
from .files import atomic_save_tensors
from .integrity import shard_metadata

logger = logging.getLogger(__name__)
TASKS = ("a", "b")


def shard_name(index: int) -> str:
    return f"{index:07d}.safetensors"


def shard_index(name: str) -> int | None:
    """The batch index a shard's file name carries (None for a name the store does not write)."""
    stem = name.removesuffix(".safetensors")
    return int(stem) if len(stem) == 7 and stem.isdigit() else None


@dataclass
class ShardParts:
    """A batch's pass-2 results on their way to the host: per device, the blocks' encoded vectors, ‖x̃‖²
    and cross terms stacked along the head axis, copied asynchronously; :meth:`tensors` (in the writer
    thread) waits for the copies and cuts the shard's per-block tensors out of them."""

    groups: list[tuple[list[tuple[int, str]], list[int], dict[str, torch.Tensor], Any]]

    @classmethod
    def of(cls, blocks: dict, codec: SideCodec) -> "ShardParts":
        by_device: dict = {}
        for key, value in blocks.items():
            by_device.setdefault(value[0].device, []).append(key)
        groups = []
        for device, keys in by_device.items():
            encoded = codec.encode(torch.cat([blocks[k][0] for k in keys], 1))  # per-vector: as per block
            parts = {**encoded, "norm2": torch.cat([blocks[k][1] for k in keys], 1).double(),
                     "cross": torch.cat([blocks[k][2] for k in keys], 1).double()}
            if getattr(codec, "stores_gamma", False):  # scaled centring's γ (exactly the value the sketch used)
                parts["gamma"] = torch.cat([blocks[k][3] for k in keys], 1).float()
            if all(len(blocks[k]) > 4 for k in keys):  # each sample's exact conflict scalars
                parts["conflict"] = torch.cat([blocks[k][4] for k in keys], 1).double()
            moved = {name: t.to("cpu", non_blocking=True) for name, t in parts.items() if t is not None}
            event = None
            if device.type == "cuda":
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
            groups.append((keys, [blocks[k][0].shape[1] for k in keys], moved, event))
        return cls(groups)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, moved, _ in self.groups for t in moved.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for keys, widths, moved, event in self.groups:
            if event is not None:
                event.synchronize()
            for name, t in moved.items():
                for (layer, block), piece in zip(keys, t.split(widths, 1)):
                    out[f"{layer}.{block}.{name}"] = piece.contiguous()
        return out


def write_shard(parts: ShardParts, path: Path, store_id: str, task: str, batch: int, samples: int) -> None:
    """Write one batch's shard, after checking on the host that every value is finite (the device-side check
    of a batch is read one batch late; nothing non-finite reaches the disk, where a restart would keep it)."""
    tensors = parts.tensors()
    ok = finite_rows(tensors.values())
    if not bool(ok.all()):
        raise overflow_error(f"pass 2 {task}", batch, (~ok).nonzero().flatten().tolist(), "their precision")
    atomic_save_tensors(tensors, path, shard_metadata(tensors, store_id, task, batch, samples))


def drop_stale_shards(root: Path) -> None:
    """Pass-2 shards without both final pass-1 files come from a run killed before its statistics reached the
    disk: pass 1 will be finished again, so they would mix two preparations. They are deleted."""
    stale = [p for t in TASKS for p in (root / "pass2" / t).glob("*.safetensors")]
    if stale:
        logger.warning("deleting %d pass-2 shards written before the run's pass-1 statistics were saved", len(stale))
    for p in stale:
        p.unlink()
