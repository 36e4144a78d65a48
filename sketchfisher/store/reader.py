"""Reopening a store without the model: settings, statistics and lazily loaded sketches.

Scoring a store is Stage 6's business: :class:`sketchfisher.interference.stored.Store` extends
:class:`StoreReader` with ``result()``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from ..compress import Sketch, codec_from_dict
from ..compress.sketch import decode
from ..errors import InputError
from ..fisher import FisherStats
from ..layout import Layout, layout_for
from ..metric import ScoreConfig
from .files import StoreError, load_named, load_tensors, read_json
from .manifest import FORMAT_VERSION, build_manifest, check_same

TASKS = ("a", "b")


class LazySide:
    """One side's sketches, read from the shards one (layer, block) at a time."""

    def __init__(self, files: list[Path]):
        self.files = files

    def get(self, key: tuple[int, str]):
        layer, block = key
        name = f"{layer}.{block}"
        parts = []
        for path in self.files:
            tensors = load_named(path, name + ".")
            if f"{name}.vec" not in tensors:
                return None
            parts.append((tensors[f"{name}.vec"], tensors.get(f"{name}.scale"), tensors[f"{name}.norm2"],
                          tensors[f"{name}.cross"]))
        return decode(parts)


class StoreReader:
    """A complete sketch store's files: manifest, settings, statistics and shards (no model needed)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_json(self.path / "manifest.json")
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise StoreError(f"{self.path}: store format version {version!r}, this library reads {FORMAT_VERSION}")
        if not self.manifest.get("complete"):
            raise StoreError(f"{self.path}: collection has not finished; rerun the same collect command to resume")
        self.layout = Layout.from_dict(self.manifest["layout"])
        try:
            self.codec = codec_from_dict(self.manifest["codec"])
            self.cfg = ScoreConfig.from_dict(self.manifest["score"])
        except InputError as exc:
            raise StoreError(f"{self.path}: manifest settings are invalid: {exc}") from None
        if not isinstance(self.codec, Sketch):
            raise StoreError(f"{self.path}: stores hold sketches, the manifest names codec {self.manifest['codec']!r}")
        self.shards = {t: self._shards(t) for t in TASKS}

    def _shards(self, task: str) -> list[Path]:
        files = sorted((self.path / "pass2" / task).glob("*.safetensors"))
        indices = [int(p.stem) for p in files]
        if indices != list(range(len(indices))):
            raise StoreError(f"{self.path}/pass2/{task}: shards {indices[:8]}... are not the batches 0..{len(files) - 1}")
        return files

    @functools.cached_property
    def stats(self) -> dict[str, FisherStats]:
        return {t: FisherStats.from_tensors(*load_tensors(self.path / "pass1" / f"{t}.safetensors")) for t in TASKS}

    def check(self, model: Any = None, codec: Any = None, cfg: Optional[ScoreConfig] = None) -> None:
        """Raise :class:`StoreMismatchError` if the store was written with another model/codec/settings."""
        if model is not None:
            wanted = build_manifest(model, layout_for(model), codec or self.codec, cfg or self.cfg,
                                    self.manifest.get("inputs"))
            check_same(self.manifest, wanted, f"store {self.path}")

    def sides(self) -> dict[str, LazySide]:
        return {t: LazySide(self.shards[t]) for t in TASKS}

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        nbytes = sum(p.stat().st_size for t in TASKS for p in self.shards[t])
        samples = sum(m["tasks"][t]["samples"] for t in TASKS)
        return {"path": str(self.path), "format_version": m["format_version"], "library_version": m["library_version"],
                "model": m["model"]["class"], "layout": m["layout"]["model_type"], "codec": m["codec"],
                "score": m["score"], "samples": {t: m["tasks"][t]["samples"] for t in TASKS},
                "shards": {t: len(self.shards[t]) for t in TASKS}, "sketch_bytes": nbytes,
                "bytes_per_sample": nbytes / max(1, samples)}

