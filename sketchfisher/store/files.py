"""Safe file primitives for stores: atomic writes, safetensors/JSON only, errors that name the file."""

from __future__ import annotations

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
