"""The store manifest: everything that produced a store, checked again whenever it is reopened."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .._version import __version__
from ..compress import Codec
from ..layout import Layout
from ..metric import ScoreConfig
from .files import StoreError, StoreMismatchError, atomic_write_json

# 10: task B's single pass with scaled centring is centred by multiples of task A's centre x̄' and keeps B's own
# side mean in its statistics (its mean residual is taken away when scoring); version 9 stores of that kind are
# refused (their B sketches were centred by task A's mean of B's side transform);
# 11: every variant balanced by a power of the normaliser (no Σ|g| for balancing); with fp32 statistics the
# balance, the centres and the conflict weights in one byte with a scale per head block; the conflict test's T
# from the exact means (collect.sketches.recipe_of gives each version's preparations);
# 9: with fp32 statistics the preparations' balance and centres are rounded to bf16 (w_a from the rounded
# balance): a store's centre products are computed so; earlier stores are read with them in the score dtype;
# 8: scaled centring (each vector's γ in the shards; a sketch codec names its centring; older sketches were
# centred by the means, γ = 0, and read so);
# 7: the signed variant balanced by √(Î+ε) (stores of earlier versions with it are refused: their sketches
# carry the Σ|g| balance); int4 sketches;
# 6: the model fingerprint hashes every byte of the weights (and names the parameters it leaves out);
# 5: each sample's conflict scalars in the shards, the conflict flag; 4: the pass order, Σ|g| and Σg in bf16;
# 3: integrity records (store id, content digests, sealed manifest). Older versions are read, and never
# resumed by a newer writer (the format version is a checked setting).
FORMAT_VERSION = 11
READABLE_VERSIONS = (2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
CHECKED = ("format_version", "codec", "score", "layout", "model", "inputs", "passes", "conflicts")
VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation",
                   "_attn_implementation_autoset", "torch_dtype", "dtype")  # where and how it was loaded, not what


_FRESH: "weakref.WeakKeyDictionary[nn.Module, tuple[str, ...]]" = weakref.WeakKeyDictionary()


def mark_fresh_parameters(model: nn.Module, names: Iterable[str]) -> None:
    """Record that ``names`` were not in the checkpoint ``model`` was loaded from: the model class created them
    with a new random value on this load (a BERT saved without its pooler, a masked-LM fine-tune loaded as a
    base model). :func:`model_fingerprint` leaves them out, so the same checkpoint loaded again is the same model.
    :func:`sketchfisher.tasks.load_hf` calls this; call it for a model loaded some other way."""
    known = {n for n, _ in model.named_parameters()}
    _FRESH[model] = tuple(sorted(n for n in names if n in known))


_LOADED: "weakref.WeakKeyDictionary[nn.Module, tuple[str, dict]]" = weakref.WeakKeyDictionary()


def mark_loaded_from(model: nn.Module, files: Iterable[Path], dtype: str) -> None:
    """Record that ``model``'s weights are exactly what ``files`` hold, converted to ``dtype``: its fingerprint
    is then cached by the files' identity (path, size, modification time, inode), and reused while no
    parameter has been changed or replaced since (each parameter's version counter and storage are
    remembered). :func:`sketchfisher.tasks.load_hf` calls this."""
    identity = [(str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
                for f in sorted(files) for st in [Path(f).stat()]]
    key = hashlib.sha256(json.dumps([identity, dtype, sorted(_FRESH.get(model, ()))]).encode()).hexdigest()
    _LOADED[model] = (key, {n: (p._version, p.data_ptr()) for n, p in model.named_parameters()})


def _cache_path() -> Path:
    return Path(os.environ.get("SKETCHFISHER_CACHE", Path.home() / ".cache" / "sketchfisher")) / "fingerprints.json"


def _cached_key(model: nn.Module) -> str | None:
    """The cache key of a model loaded from files and unchanged since, else None."""
    loaded = _LOADED.get(model)
    if loaded is None:
        return None
    key, state = loaded
    now = {n: (p._version, p.data_ptr()) for n, p in model.named_parameters()}
    return key if now == state else None


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _param_digest(p: torch.Tensor) -> bytes:
    """sha256 of every byte of one tensor (fp32 and lower, as stored), read in 64 MiB slices."""
    flat = p.detach().reshape(-1)
    digest = hashlib.sha256()
    step = max(1, (64 << 20) // flat.element_size())
    for lo in range(0, flat.numel(), step):
        digest.update(flat[lo:lo + step].contiguous().cpu().view(torch.uint8).numpy())  # (the buffer, not a copy)
    return digest.digest()


def model_fingerprint(model: nn.Module, layout: Layout) -> dict[str, str]:
    """What determines a model's gradients, not where it was loaded from: the config without paths and
    versions, every parameter's name, shape and dtype, and the sha256 of every byte of every parameter, except
    those the checkpoint lacked (:func:`mark_fresh_parameters`), which are named in ``weights_cover``. The
    parameters are hashed on several threads (hashlib releases the GIL); a model loaded from files and not
    changed since reuses the digest cached under those files' identity (:func:`mark_loaded_from`)."""
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):
        fields = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG}
        config_text = json.dumps(fields, sort_keys=True, default=str)
    else:
        config_text = repr(config)
    params = list(model.named_parameters())
    shapes = "\n".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in params)
    fresh = set(_FRESH.get(model, ()))
    hashed = [(n, p) for n, p in params if n not in fresh]
    key = _cached_key(model)
    cached = _read_cache().get(key) if key is not None else None
    if isinstance(cached, str):
        weights_hex = cached
    else:
        if any(hasattr(p, "full_tensor") for _, p in hashed):
            # sharded parameters (FSDP2 DTensors): each gathered whole in turn, in the same order on every rank
            # (a collective), hashed and freed, so the digest is the unsharded model's whatever the sharding
            digests = [_param_digest(p.full_tensor() if hasattr(p, "full_tensor") else p) for _, p in hashed]
        else:
            with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
                digests = list(pool.map(lambda item: _param_digest(item[1]), hashed))
        weights = hashlib.sha256()
        for (name, _), d in zip(hashed, digests):
            weights.update(name.encode() + b"\0" + d)
        weights_hex = weights.hexdigest()
        if key is not None:  # a best effort: a cache that cannot be written is only slower
            try:
                _cache_path().parent.mkdir(parents=True, exist_ok=True)
                atomic_write_json({**_read_cache(), key: weights_hex}, _cache_path())
            except OSError:
                pass
    cover = ("every byte of every parameter" if not fresh else
             f"every byte of the {len(hashed)} parameters the checkpoint holds; left out, newly initialised on "
             f"each load: {', '.join(sorted(fresh))}")
    return {"class": type(model).__name__, "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
            "params_sha256": hashlib.sha256(shapes.encode()).hexdigest(), "weights_sha256": weights_hex,
            "weights_cover": cover}


def new_store_id() -> str:
    """A random id for a new store: every file the store writes carries it."""
    return uuid.uuid4().hex


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest with its own digest (of everything else in it), so that an edit is detected."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return {**body, "digest": hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()}


def check_seal(manifest: dict[str, Any], where: str) -> None:
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return  # a version this library cannot read: the reader says so
    if version < 3 and "digest" not in manifest:
        return  # written before stores were sealed
    if seal(manifest).get("digest") != manifest.get("digest"):
        raise StoreError(f"{where}: manifest.json was changed after collection (its digest does not match); "
                         "the settings it states cannot be trusted")


def build_manifest(model: nn.Module, layout: Layout, codec: Codec, cfg: ScoreConfig,
                   inputs: dict[str, Any] | None = None, passes: float = 2, conflicts: bool = True) -> dict[str, Any]:
    """Everything that produced a store; ``inputs`` records how the CLI made the batches (loss, lengths);
    ``passes`` the pass order (2 per task, or 1.5: task B once, balanced by task A's statistics alone);
    ``conflicts`` whether the shards hold each sample's conflict scalars."""
    return {"inputs": inputs or {}, "format_version": FORMAT_VERSION, "library_version": __version__,
            "codec": codec.to_dict(), "score": cfg.to_dict(), "layout": layout.to_dict(),
            "model": model_fingerprint(model, layout), "passes": passes, "conflicts": conflicts, "tasks": {},
            "complete": False}


def passes_of(manifest: dict[str, Any]) -> float:
    """A store's pass order (stores written before the 1.5-pass order record none: 2)."""
    return manifest.get("passes", 2)


def conflicts_of(manifest: dict[str, Any]) -> bool:
    """Whether a store's shards hold the conflict scalars (stores before format 5 record nothing: no)."""
    return bool(manifest.get("conflicts", False))


def check_same(stored: dict[str, Any], wanted: dict[str, Any], where: str) -> None:
    """Raise :class:`StoreMismatchError` naming every field that differs between two manifests."""
    diffs = []
    for key in CHECKED:
        a, b = stored.get(key), wanted.get(key)
        if key == "inputs":  # stores written by the library (not the CLI) record none; paths are not checked:
            a, b = _content(a or {}), _content(b or {})  # the same files moved are the same inputs
        if key == "passes":
            a, b = passes_of(stored), passes_of(wanted)
        if key == "conflicts":
            a, b = conflicts_of(stored), conflicts_of(wanted)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            shown = ", ".join(f"{f}: stored {_short(a.get(f))} vs requested {_short(b.get(f))}" for f in fields[:4])
            diffs.append(f"{key} ({shown})")
        else:
            diffs.append(f"{key} (stored {_short(a)} vs requested {_short(b)})")
    if diffs:
        raise StoreMismatchError(f"{where} was written with different settings: " + "; ".join(diffs)
                                 + ". Use a new store directory, or the original settings.")


def _content(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs a store's samples depend on, without where they were: the task files' content hashes, not
    their paths; the model is identified by its fingerprint, not by its folder."""
    out = {k: v for k, v in inputs.items() if k != "model"}
    for key, value in inputs.items():
        if key.startswith("task_") and isinstance(value, dict):
            out[key] = {k: v for k, v in value.items() if k != "path"}
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


REQUIRED = ("format_version", "codec", "score", "layout", "model", "tasks", "complete")


def read_manifest(path) -> dict[str, Any]:
    """A store's manifest, checked to be one: a JSON object with every required field, unedited."""
    from .files import read_json

    manifest = read_json(path)
    if not isinstance(manifest, dict):
        raise StoreError(f"{path} is not a store manifest (a JSON object); found a {type(manifest).__name__}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise StoreError(f"{path} lacks the fields {missing}: not a complete store manifest")
    check_seal(manifest, str(path))
    return manifest

