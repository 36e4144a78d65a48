"""Reopening a store without the model: settings, statistics and lazily loaded sketches.

Scoring a store is Stage 6's business: :class:`sketchfisher.interference.stored.Store` extends
:class:`StoreReader` with ``result()``."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

import torch

from ..compress import Codec, SideCodec, codec_from_dict, decode_side
from ..compress.base import centres_b_from_a
from ..errors import InputError
from ..fisher import FisherStats
from ..layout import Layout, units_layout
from ..layout.adapters import base_model
from ..metric import ScoreConfig
from .files import StoreError, check_inside, load_named, load_tensors, read_metadata
from .integrity import check_digest, check_header, index_entry
from .manifest import READABLE_VERSIONS, build_manifest, check_same, conflicts_of, passes_of, read_manifest

TASKS = ("a", "b")


class LazySide:
    """One side's encoded vectors, read from the shards one (layer, block) at a time. With ``digests`` (one dict
    per shard: ``layer.block`` → digest) every block read is checked against what was written; with
    ``widths`` (``(layer, block)`` → the codec's width) so is the vectors' width."""

    def __init__(self, files: list[Path], codec: SideCodec, digests: Optional[list[dict[str, str]]] = None,
                 widths: Optional[Any] = None):
        self.files, self.codec, self.digests, self.widths = files, codec, digests, widths

    def get(self, key: tuple[int, str]):
        layer, block = key
        name = f"{layer}.{block}"
        parts = []
        for n, path in enumerate(self.files):
            tensors = load_named(path, name + ".")
            if f"{name}.vec" not in tensors:
                if self.digests is not None and name in self.digests[n]:
                    raise StoreError(f"{path}: block {name} is recorded but its tensors are missing")
                return None
            if self.digests is not None:
                check_digest(path, tensors, self.digests[n].get(name, ""), f"block {name}")
            width = None if self.widths is None else self.widths(key)
            if width is not None and tensors[f"{name}.vec"].shape[-1] != width:
                raise StoreError(f"{path}: block {name} has vectors of width {tensors[f'{name}.vec'].shape[-1]}, "
                                 f"the manifest's codec {self.codec.describe()} writes {width}")
            encoded = {k[len(name) + 1:]: v for k, v in tensors.items()
                       if k[len(name) + 1:] not in ("norm2", "cross", "gamma", "conflict")}
            parts.append((encoded, tensors[f"{name}.norm2"], tensors[f"{name}.cross"], tensors.get(f"{name}.gamma")))
        return decode_side(self.codec, parts)

    def conflict(self, key: tuple[int, str]):
        """Every sample's conflict scalar ``[n, H_b]`` (fp64) of one (layer, block); None when the store has
        none (written before they were collected, or without the conflict test)."""
        name = f"{key[0]}.{key[1]}"
        parts = []
        for n, path in enumerate(self.files):
            tensors = load_named(path, name + ".")
            if f"{name}.conflict" not in tensors:
                return None
            if self.digests is not None:
                check_digest(path, tensors, self.digests[n].get(name, ""), f"block {name}")
            parts.append(tensors[f"{name}.conflict"].double())
        return torch.cat(parts)


class StoreReader:
    """A complete sketch store's files: manifest, settings, statistics and shards (no model needed).

    Opening checks the manifest (sealed, complete, readable version), that the shards are exactly the
    recorded ones, each naming this store, its task and its batch, and no file is a symlink or leaves the
    store (reading only the files' headers); contents are checked against their digests as they are read,
    and :meth:`verify` reads and checks everything."""

    def __init__(self, path: str | Path, unverified: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path / "manifest.json")
        version = self.manifest.get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{self.path}: store format version {version!r}, this library reads {READABLE_VERSIONS}")
        if version < 3:
            later = [k for k in ("store_id", "files", "digest", "passes", "conflicts") if k in self.manifest]
            if later:  # fields no writer of that version wrote: an edited claim of an old format
                raise StoreError(f"{self.path}: the manifest claims format version {version} but holds "
                                 f"{', '.join(later)}, which only later versions write; it contradicts itself")
            if not unverified:
                raise StoreError(f"{self.path}: format version {version} stores carry no digests, so nothing in it "
                                 "can be checked; open it with sf.open_store(path, unverified=True) to read it as it "
                                 "is, or collect it again")
        if not self.manifest.get("complete"):
            raise StoreError(f"{self.path}: collection has not finished; rerun the same collect command to resume")
        self.checked = version >= 3  # stores written before integrity records are read as they are
        try:
            self.layout = Layout.from_dict(self.manifest["layout"])
            codec = self.manifest["codec"]
            if version < 8 and isinstance(codec, dict) and codec.get("codec") == "sketch":
                codec = {**codec, "centring": "mean"}  # written before scaled centring: γ = 0 throughout
            self.codec = codec_from_dict(codec)
            self.cfg = ScoreConfig.from_dict(self.manifest["score"])
        except (InputError, KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"{self.path}: manifest settings are invalid: {type(exc).__name__}: {exc}") from None
        if version < 7 and self.cfg.variant == "signed" and getattr(self.codec, "variance_reduction", False):
            raise StoreError(f"{self.path}: format version {version} wrote signed-variant sketches balanced by "
                             "Σ|g|; this library balances them by √(Î+ε) and would misread them: collect again")
        if version < 10 and centres_b_from_a(self.codec, passes_of(self.manifest)):
            raise StoreError(f"{self.path}: format version {version} centred task B's single pass by task A's mean of "
                             "B's side transform, which this library no longer reads: collect again")
        if not self.codec.two_pass:
            raise StoreError(f"{self.path}: stores hold side codecs' vectors, the manifest names codec "
                             f"{self.manifest['codec']!r}")
        self.digests: dict[str, list[dict[str, str]]] = {}
        self.shards = {t: self._shards(t) for t in TASKS}

    def _shards(self, task: str) -> list[Path]:
        folder = self.path / "pass2" / task
        files = sorted(folder.glob("*.safetensors"))
        if not self.checked:
            indices = [int(p.stem) if p.stem.isdigit() else -1 for p in files]
            if indices != list(range(len(indices))):
                raise StoreError(f"{folder}: shards {[p.name for p in files][:8]} are not the batches 0..{len(files) - 1}")
            return files
        recorded = sorted(k.rsplit("/", 1)[1] for k in self.manifest.get("files", {}) if k.startswith(f"pass2/{task}/"))
        found = sorted(p.name for p in files)
        if found != recorded:
            extra, missing = sorted(set(found) - set(recorded)), sorted(set(recorded) - set(found))
            raise StoreError(f"{folder}: the shards are not the recorded ones (extra: {extra[:4]}, missing: "
                             f"{missing[:4]})")
        sizes = self.manifest["tasks"][task]["batch_sizes"]
        if len(sizes) != len(files) or sum(sizes) != self.manifest["tasks"][task]["samples"]:
            raise StoreError(f"{folder}: {len(files)} shards for {len(sizes)} recorded batches of "
                             f"{self.manifest['tasks'][task]['samples']} samples")
        self.digests[task] = []
        for index, path in enumerate(files):
            check_inside(self.path, path)
            meta = read_metadata(path)
            check_header(path, meta, self.manifest["store_id"], task, index, sizes[index])
            if index_entry(meta) != self.manifest["files"][f"pass2/{task}/{path.name}"]:
                raise StoreError(f"{path}: its block digests are not the recorded ones (changed or replaced)")
            self.digests[task].append(json.loads(meta["blocks"]))
        return files

    @functools.cached_property
    def stats(self) -> dict[str, FisherStats]:
        out = {}
        for t in TASKS:
            path = self.path / "pass1" / f"{t}.safetensors"
            tensors, meta = load_tensors(check_inside(self.path, path) if self.checked else path)
            if self.checked:
                check_header(path, meta, self.manifest["store_id"], t)
                if meta.get("digest") != self.manifest["files"].get(f"pass1/{path.name}"):
                    raise StoreError(f"{path}: not the statistics this store recorded (replaced)")
                check_digest(path, tensors, meta["digest"])
            out[t] = FisherStats.from_tensors(tensors, meta)
        return out

    def verify(self) -> int:
        """Read every file and check every digest (statistics, every block of every shard); the number of
        files checked. A store written before integrity records cannot be verified (StoreError)."""
        if not self.checked:
            raise StoreError(f"{self.path}: format version {self.manifest['format_version']} stores carry no "
                             "integrity records to verify against")
        self.__dict__.pop("stats", None)
        self.stats  # noqa: B018 (reads and checks both statistics files)
        for t, side in self.sides().items():
            for path, digests in zip(side.files, side.digests):
                tensors, _ = load_tensors(path)
                for group, digest in digests.items():
                    check_digest(path, {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == group}, digest,
                                 f"block {group}")
                if {k.rsplit(".", 1)[0] for k in tensors} != set(digests):
                    raise StoreError(f"{path}: holds blocks that are not recorded")
        return 2 + sum(len(self.shards[t]) for t in TASKS)

    def check(self, model: Any = None, codec: Optional[Codec] = None, cfg: Optional[ScoreConfig] = None) -> None:
        """Raise :class:`StoreMismatchError` if the store was written with another model/codec/settings."""
        if model is not None:
            model = base_model(model)  # (a PEFT model: collected as its base model, adapters injected)
            wanted = build_manifest(model, units_layout(model, *self.layout.unit_settings()), codec or self.codec,
                                    cfg or self.cfg, self.manifest.get("inputs"), passes_of(self.manifest),
                                    conflicts_of(self.manifest))
            check_same(self.manifest, wanted, f"store {self.path}")

    @property
    def passes(self) -> float:
        """The pass order that wrote the store: 2 per task, or 1.5 (task B once, balanced by task A alone)."""
        return passes_of(self.manifest)

    def sides(self) -> dict[str, LazySide]:
        widths = (lambda key: self.codec.stored_width(self.layout.head_blocks(*key)[0].numel)) if self.checked else None
        return {t: LazySide(self.shards[t], self.codec, self.digests.get(t), widths) for t in TASKS}

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        nbytes = sum(p.stat().st_size for t in TASKS for p in self.shards[t])
        samples = sum(m["tasks"][t]["samples"] for t in TASKS)
        return {"path": str(self.path), "format_version": m["format_version"], "library_version": m["library_version"],
                "passes": self.passes,
                "model": m["model"]["class"], "layout": m["layout"]["model_type"], "codec": m["codec"],
                "score": m["score"], "samples": {t: m["tasks"][t]["samples"] for t in TASKS},
                "shards": {t: len(self.shards[t]) for t in TASKS}, "sketch_bytes": nbytes,
                "bytes_per_sample": nbytes / max(1, samples)}

