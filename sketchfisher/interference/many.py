"""Any pair of tasks collected once (:mod:`sketchfisher.collect.many`), and the N × N summary of which task pairs
conflict where."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch

from .._version import __version__
from ..collect.many import TaskSketches, denominator
from ..compress.base import DecodedSide, SketchSide
from ..errors import InputError
from ..layout import Layout
from ..metric import ScoreConfig
from ..store.files import (StoreError, atomic_save_tensors, atomic_write_json, check_inside, content_digest,
                           load_tensors, read_json)
from .context import ResultContext, SketchSource
from .result import DEFAULT_MAX_BYTES, InterferenceResult


class _PairSide:
    """One task's side as one pair reads it: its sketches, the cross term with the partner's centre and the
    partner's conflict scalars (``pick`` selects the partner's columns)."""

    def __init__(self, side: Any, column: int, pick):
        self.side, self.column, self.pick = side, column, pick
        self.n = side.n

    def get(self, key: tuple[int, str]) -> Optional[DecodedSide]:
        got = self.side.get(key)
        if got is None:
            return None
        out = DecodedSide((got[0], got[1], got[2][..., self.column]))
        out.noise, out.gamma = got.noise, got.gamma
        return out

    def conflict(self, key: tuple[int, str]) -> Optional[torch.Tensor]:
        c = self.side.conflict(key)
        return None if c is None else self.pick(c, self.column)


class _PairMoments:
    """The conflict test's task-mean products of one pair, per block, from the statistics (fp64)."""

    def __init__(self, tasks: "TaskSet", a: str, b: str):
        self.tasks, self.a, self.b, self.cache = tasks, a, b, {}

    def get(self, key: tuple[int, str]) -> Optional[dict]:
        if key not in self.cache:
            stats = {t: self.tasks.collection.stats[t] for t in (self.a, self.b)}
            if self.tasks.layout.param_of(*key) not in stats[self.a].welford:
                self.cache[key] = None
            else:
                layout = self.tasks.layout
                wa = denominator(stats[self.a], layout, key, self.tasks.cfg)  # (the pair's denominator: task A's)
                ga, gb = (stats[t].block(layout, *key, "mean_grad").double() for t in (self.a, self.b))
                self.cache[key] = {"ab": (ga * wa * gb).sum(-1), "aa": (ga * wa * ga).sum(-1),
                                   "bb": (gb * wa * gb).sum(-1), "n_even": torch.tensor(
                                       float(stats[self.a].half_counts[self.tasks.layout.param_of(*key)]),
                                       dtype=torch.float64)}
        return self.cache[key]


def centre_products(collection: TaskSketches) -> dict[tuple[int, str], torch.Tensor]:
    """``e[key] [N, N, H_b]``: ``⟨x̄'_a, ȳ'_b⟩`` of every ordered pair of tasks (fp64; 0 without centres)."""
    out = {}
    names = collection.names
    for key in collection.preps[names[0]]:
        preps = [collection.preps[t][key] for t in names]
        if preps[0].x_bar is None:
            out[key] = torch.zeros(len(names), len(names), preps[0].w_a.shape[0], dtype=torch.float64)
            continue
        x = torch.stack([p.x_bar.double() for p in preps])
        y = torch.stack([p.y_bar.double() for p in preps])
        out[key] = torch.einsum("ahs,bhs->abh", x, y).cpu()
    return out


class TaskSet:
    """Tasks collected once (``sf.analyze_tasks``): :meth:`pair` is any ordered pair's
    :class:`~sketchfisher.InterferenceResult` (scores, error bars, the conflict test, every table and plot);
    :meth:`conflicts` and :meth:`matrix` summarise every pair; :meth:`save` writes it to a folder that
    ``sf.open_tasks`` reads back without the model."""

    def __init__(self, collection: TaskSketches, layout: Layout, cfg: ScoreConfig, codec: Any,
                 max_bytes: int = DEFAULT_MAX_BYTES, e: Optional[dict] = None, inputs: Optional[dict] = None):
        self.collection, self.layout, self.cfg, self.codec, self.max_bytes = collection, layout, cfg, codec, max_bytes
        self.e = centre_products(collection) if e is None else e
        self.inputs = dict(inputs or {})  # what made the batches (the CLI's record: model, loss, files), JSON

    @property
    def names(self) -> list[str]:
        return list(self.collection.names)

    def _index(self, name: str) -> int:
        if name not in self.collection.names:
            raise InputError(f"no task {name!r}; the tasks are {self.names}")
        return self.collection.names.index(name)

    def pair(self, a: str, b: str) -> InterferenceResult:
        """Task ``a``'s samples (i-side, its Fisher the denominator) against task ``b``'s (j-side)."""
        ia, ib = self._index(a), self._index(b)
        if ia == ib:
            raise InputError(f"a pair needs two different tasks, got {a!r} twice")
        col = self.collection
        e = {key: products[ia, ib] for key, products in self.e.items()}
        side_a = _PairSide(col.sides[a]["a"], ib, lambda c, u: c[..., u:u + 1])   # g_i · ḡ_B W_A
        side_b = _PairSide(col.sides[b]["b"], ia, lambda c, s: c[..., s, :])      # g_j · ḡ_A W_A and its half
        source = SketchSource(side_a, side_b, e, _PairMoments(self, a, b))
        ctx = ResultContext.of(self.layout, self.cfg, self.codec, col.stats[a], col.stats[b], source)
        return InterferenceResult.from_context(ctx, self.max_bytes)

    def conflicts(self, level: float = 0.05, family: Optional[str] = None) -> pd.DataFrame:
        """The conflict test of every ordered pair of tasks (``res.head_conflicts(level)`` of each, with the
        columns ``task_a`` and ``task_b`` first), for the unit family ``family`` (default: the first)."""
        frames = []
        for a in self.names:
            for b in self.names:
                if a == b:
                    continue
                res = self.pair(a, b)
                res = res if family is None else res.units(family)
                df = res.head_conflicts(level)
                df.insert(0, "task_b", b)
                df.insert(0, "task_a", a)
                frames.append(df)
        return pd.concat(frames, ignore_index=True)

    def matrix(self, level: float = 0.05, family: Optional[str] = None, block: Optional[str] = None,
               table: Optional[pd.DataFrame] = None) -> pd.DataFrame:
        """N × N: how many unit blocks each ordered pair flags as conflicting (rows task A, columns task B; the
        diagonal is empty), over every block or only ``block`` (``"Q"``, ``"V"``, …). ``table``: a
        :meth:`conflicts` table already computed."""
        table = self.conflicts(level, family) if table is None else table
        if block is not None:
            table = table[table["block"] == block]
        counts = table.groupby(["task_a", "task_b"])["conflict"].sum()
        out = pd.DataFrame(float("nan"), index=pd.Index(self.names, name="task_a"),
                           columns=pd.Index(self.names, name="task_b"))
        for (a, b), n in counts.items():
            out.loc[a, b] = float(n)
        out.attrs.update(level=level, block=block, tested=int(len(table) // max(1, len(counts))))
        return out


    def save(self, path: str | Path, inputs: Optional[dict] = None) -> Path:
        """Write the task set to the folder ``path`` (created; it must not hold another task set): ``tasks.json``
        (settings, task names, each file's content digest), each task's statistics and both sides' sketches as
        safetensors. Nothing is pickled; :func:`open_tasks` checks every digest when it reads a file.
        ``inputs`` (JSON; default :attr:`inputs`): what made the batches, recorded for re-scoring pairs exactly
        later (``sketchfisher verify DIR --pair A,B`` reads the model, loss and task files from it)."""
        root = Path(path)
        if (root / MANIFEST).exists():
            raise StoreError(f"{root} holds a task set already; choose another folder")
        root.mkdir(parents=True, exist_ok=True)
        col, files = self.collection, {}
        for i, t in enumerate(col.names):
            tensors, meta = col.stats[t].to_tensors()
            files[f"stats-{i}.safetensors"] = _save(root / f"stats-{i}.safetensors", tensors, meta)
            for side in ("a", "b"):
                files[f"sides-{i}-{side}.safetensors"] = _save(root / f"sides-{i}-{side}.safetensors",
                                                                _side_tensors(col.sides[t][side]),
                                                                {"samples": str(col.sides[t][side].n)})
        files["centres.safetensors"] = _save(root / "centres.safetensors",
                                             {f"{layer}.{block}": e for (layer, block), e in self.e.items()}, {})
        self.inputs = dict(self.inputs if inputs is None else inputs)
        atomic_write_json({"format": FORMAT, "version": 1, "library_version": __version__, "tasks": col.names,
                           "codec": self.codec.to_dict(), "score": self.cfg.to_dict(), "layout": self.layout.to_dict(),
                           "files": files, "inputs": self.inputs}, root / MANIFEST)
        return root


MANIFEST, FORMAT = "tasks.json", "sketchfisher-tasks"


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_save_tensors(tensors, path, meta)
    return content_digest(tensors)


def _side_tensors(side: Any) -> dict[str, torch.Tensor]:
    """One side's per-block parts joined over its batches: ``layer.block.<encoded name>``, ``.norm2``, ``.cross``,
    ``.gamma``, ``.conflict``."""
    out = {}
    for layer, block in side.keys():
        parts, p = side.parts((layer, block)), f"{layer}.{block}"
        for name in parts[0][0]:
            out[f"{p}.enc.{name}"] = torch.cat([q[0][name] for q in parts])
        for i, name in ((1, "norm2"), (2, "cross"), (3, "gamma")):
            out[f"{p}.{name}"] = torch.cat([q[i] for q in parts])
        conflict = side.conflict((layer, block))
        if conflict is not None:
            out[f"{p}.conflict"] = conflict
    return out


def _side_of(codec: Any, tensors: dict[str, torch.Tensor], n: int) -> SketchSide:
    side = SketchSide(codec)
    groups: dict = {}
    for name, t in tensors.items():
        layer, block, rest = name.split(".", 2)
        groups.setdefault((int(layer), block), {})[rest] = t
    for key, g in groups.items():
        enc = {name[4:]: t for name, t in g.items() if name.startswith("enc.")}
        side.add_encoded(key, enc, g["norm2"], g["cross"], g["gamma"], g.get("conflict"))
    side.n = n
    return side


def open_tasks(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> TaskSet:
    """A task set written by :meth:`TaskSet.save`, read back without the model: any pair, its conflict test and
    the N × N summary. Every file is checked against the digest ``tasks.json`` records; nothing is unpickled."""
    from ..compress.codec import codec_from_dict
    from ..fisher import FisherStats
    from ..store.integrity import check_digest

    root = Path(path)
    manifest = read_json(root / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != 1:
        raise StoreError(f"{root / MANIFEST} is not a sketchfisher task set of version 1")
    try:
        names, files = list(manifest["tasks"]), dict(manifest["files"])
        codec, cfg = codec_from_dict(manifest["codec"]), ScoreConfig.from_dict(manifest["score"])
        layout = Layout.from_dict(manifest["layout"])
        inputs = dict(manifest.get("inputs") or {})
    except (InputError, KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"{root / MANIFEST}: invalid settings: {type(exc).__name__}: {exc}") from None

    def read(name: str) -> tuple[dict, dict]:
        if name not in files:
            raise StoreError(f"{root / MANIFEST} records no file {name}")
        file = check_inside(root, root / name)
        tensors, meta = load_tensors(file)
        check_digest(file, tensors, files[name])
        return tensors, meta

    stats, sides = {}, {}
    for i, t in enumerate(names):
        stats[t] = FisherStats.from_tensors(*read(f"stats-{i}.safetensors"))
        sides[t] = {}
        for side in ("a", "b"):
            tensors, meta = read(f"sides-{i}-{side}.safetensors")
            sides[t][side] = _side_of(codec, tensors, int(meta.get("samples", stats[t].count)))
    e_tensors, _ = read("centres.safetensors")
    e = {(int(k.split(".", 1)[0]), k.split(".", 1)[1]): v for k, v in e_tensors.items()}
    return TaskSet(TaskSketches(names, stats, sides, preps={}), layout, cfg, codec, max_bytes, e=e, inputs=inputs)


__all__ = ["TaskSet", "open_tasks"]
