"""Safe file primitives for stores: atomic writes, safetensors/JSON only, errors that name the file."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import SketchfisherError


class StoreError(SketchfisherError):
    """A store file is missing, truncated, corrupt or not a safetensors/JSON file."""


class StoreMismatchError(SketchfisherError):
    """A store was written with another codec, seed, layout, model or format version."""


TEMP_SUFFIX = ".sketchfisher-tmp"
STORE_FOLDERS = (".", "pass1", "pass2/a", "pass2/b")  # where a store writes; the only places it cleans up


def temp_name(path: Path) -> Path:
    """This process's temporary name for ``path`` (unique per process, recognisable as the store's own)."""
    return path.with_name(f"{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def remove_stale_temps(root: Path) -> int:
    """Delete the temporary files a killed run of the store left behind, and nothing else: only names the
    store itself makes, only in its own folders (never a user's ``*.tmp``, never below them)."""
    removed = 0
    for folder in STORE_FOLDERS:
        for stale in (root / folder).glob(f"*{TEMP_SUFFIX}"):
            if stale.is_file() and not stale.is_symlink():
                stale.unlink()
                removed += 1
    return removed


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file completely under a temporary name, then rename it into place."""
    tmp = temp_name(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Writes:
    """Store files written by one background thread while the GPU goes on (writing releases the GIL).

    Submitted writes wait in host memory until written, at most ``max_bytes`` of them (and at least
    one): when the disk is slower than the GPU the caller then waits, never the memory grows. The first
    failure is raised by the next :meth:`submit` or by :meth:`wait`. :meth:`close` lets the write in
    progress finish (it writes under a temporary name, so a file is complete or absent) and drops the
    ones not started."""

    def __init__(self, max_bytes: int = 1 << 30):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sketchfisher-store-writes")
        self._futures: list = []  # (future, bytes)
        self._max = max_bytes

    def submit(self, fn, *args, nbytes: int = 0) -> None:
        self._futures.append((self._pool.submit(fn, *args), nbytes))
        self._reap(self._max)

    def _reap(self, limit: int) -> None:
        while self._futures and (self._futures[0][0].done() or len(self._futures) > 1 and
                                 sum(n for _, n in self._futures) > limit or limit == 0):
            self._futures.pop(0)[0].result()

    def wait(self) -> None:
        """Block until every submitted write is on disk; raises the first failure."""
        self._reap(0)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class StoreLock:
    """``lock.json`` in a store while a process writes it: host, pid and start time of the writer.

    A second writer is refused with the first one's identity; a lock left by a process that no longer
    runs on this host (a crash, a kill) is taken over with a warning. A lock from another host cannot be
    checked: the error says how to remove it once that run is known to be gone."""

    def __init__(self, root: Path):
        self.path = Path(root) / "lock.json"
        self.held = False

    def __enter__(self) -> "StoreLock":
        import logging
        import socket
        import time

        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._holder()
                if other.get("host") == me["host"] and not _alive(other.get("pid")):
                    logging.getLogger(__name__).warning("taking over the lock of a writer that is gone: %s", other)
                    self.path.unlink(missing_ok=True)
                    continue
                where = "this host" if other.get("host") == me["host"] else f"host {other.get('host')!r}"
                raise StoreError(f"{self.path.parent} is being written by pid {other.get('pid')} on {where} since "
                                 f"{other.get('started')}; wait for it to finish (if that run is gone, delete "
                                 f"{self.path})") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise StoreError(f"cannot take the lock {self.path}")

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def content_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and the sha256 of each one's bytes, in name order: what
    a file's content must hash to, whatever its layout on disk. Large tensors are hashed in parallel
    threads (hashlib releases the GIL; half the cores): at 7B a statistics file is tens of GB."""
    names = sorted(tensors)
    host = {n: tensors[n].detach().contiguous().cpu() for n in names}

    def one(name: str) -> str:
        t = host[name]
        return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"").hexdigest()

    big = sum(t.numel() * t.element_size() for t in host.values()) > (64 << 20)
    if big and len(names) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # half the cores: the training loop's thread keeps the rest (all 16 cores of an H200 host hashing slowed
        # pass 2; a quarter of them left the statistics' writes behind the passes)
        with ThreadPoolExecutor(max_workers=min(len(names), max(1, (os.cpu_count() or 1) // 2))) as pool:
            digests = list(pool.map(one, names))
    else:
        digests = [one(n) for n in names]
    h = hashlib.sha256()
    for name, digest in zip(names, digests):
        t = host[name]
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{tuple(t.shape)}|{digest}\n".encode())
    return h.hexdigest()


def block_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """:func:`content_digest` of each ``layer.block`` group of a shard's tensors (read one group at a time)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        groups.setdefault(name.rsplit(".", 1)[0], {})[name] = t
    return {group: content_digest(ts) for group, ts in groups.items()}


def check_inside(root: Path, path: Path) -> Path:
    """``path`` itself, if it is a regular file of the store (no symlink, nothing resolving outside ``root``)."""
    if path.is_symlink() or not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{path} is a symlink or leaves the store {root}; stores hold their own files only")
    if not path.is_file():
        raise StoreError(f"{path} is missing or not a file")
    return path


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file (never unpickles); any defect raises :class:`StoreError` naming the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"cannot read store file {path}: {exc} (it may be truncated, corrupt or not safetensors)") from None


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"cannot read store file {path}: {exc} (it may be truncated, corrupt or not safetensors)") from None


def load_named(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one file whose names start with ``prefix``, read lazily (never unpickles)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StoreError(f"cannot read store file {path}: {exc} (it may be truncated, corrupt or not safetensors)") from None


def atomic_write_json(obj: Any, path: Path) -> None:
    tmp = temp_name(path)
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist: not a sketchfisher store (or an incomplete one)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
