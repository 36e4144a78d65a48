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


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and restored
    once, at import (before any writer thread runs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what a plain open() would give: safetensors itself writes 0600


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
    os.chmod(tmp, FILE_MODE)
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
    """One writer of a store at a time, and who it is.

    The exclusion is a kernel lock (``fcntl.flock``) on the store's ``.lock`` file: two processes can never both
    hold it, and a writer that dies (crash, kill) releases it with its process, so there is no stale lock to take
    over and no race in taking one over. ``lock.json`` says who holds it (host, pid, start time); it is written
    to a temporary file and renamed into place, so it is never empty (a full disk fails the run before it
    begins, leaving no lock). A ``lock.json`` of a writer that is gone (this host, a pid that no longer runs; an
    unreadable file) is replaced with a warning; one from another host, whose process cannot be checked, is
    refused with how to remove it."""

    def __init__(self, root: Path):
        self.path = Path(root) / "lock.json"
        self.held = False
        self._fd: int | None = None

    def __enter__(self) -> "StoreLock":
        import logging
        import socket
        import time

        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._fd = os.open(self.path.parent / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._exclusive()
        except BlockingIOError:
            other = self._holder()
            self._release()
            where = "this host" if other.get("host") == me["host"] else f"host {other.get('host')!r}"
            raise StoreError(f"{self.path.parent} is being written by pid {other.get('pid')} on {where} since "
                             f"{other.get('started')}; wait for it to finish") from None
        if self.path.exists():
            other = self._holder()
            if other.get("host") not in (None, me["host"]) or (other.get("host") == me["host"] and _alive(other.get("pid"))
                                                                 and other.get("pid") != me["pid"]):
                self._release()
                where = "this host" if other.get("host") == me["host"] else f"host {other.get('host')!r}"
                raise StoreError(f"{self.path.parent} is marked as written by pid {other.get('pid')} on {where} since "
                                 f"{other.get('started')}; wait for it to finish (if that run is gone, delete "
                                 f"{self.path})")
            logging.getLogger(__name__).warning("taking over the lock of a writer that is gone: %s", other or "(empty)")
        try:
            atomic_write_json(me, self.path)
        except OSError as exc:
            self._release()
            raise StoreError(f"cannot write {self.path}: {exc}") from None
        self.held = True
        return self

    def _exclusive(self) -> None:
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if isinstance(exc, BlockingIOError):
                raise
            raise StoreError(f"{self.path.parent}: the file system does not support locks ({exc}); write the store "
                             "on a local or lock-capable file system") from None

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # (closing releases the flock)
            self._fd = None

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
        self._release()


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
    """Write ``obj`` under a temporary name, then rename it into place: the file is whole or absent (a failed
    write, such as a full disk, leaves nothing behind)."""
    tmp = temp_name(path)
    try:
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist: not a sketchfisher store (or an incomplete one)") from None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path}: {exc}") from None
