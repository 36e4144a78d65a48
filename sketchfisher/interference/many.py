"""Any pair of tasks collected once (:mod:`sketchfisher.collect.many`), and the N × N summary of which task pairs
conflict where."""

from __future__ import annotations

from typing import Any, Optional

import pandas as pd
import torch

from ..collect.many import TaskSketches, conflict_weights
from ..compress.base import DecodedSide
from ..errors import InputError
from ..layout import Layout
from ..metric import ScoreConfig
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
                w, g, _ = conflict_weights(self.tasks.layout, stats, key, self.tasks.cfg)
                wa, ga, gb = w[0], g[0], g[1]  # (the pair's denominator is task A's)
                self.cache[key] = {"ab": (ga * wa * gb).sum(-1), "aa": (ga * wa * ga).sum(-1),
                                   "bb": (gb * wa * gb).sum(-1), "n_even": torch.tensor(
                                       float(stats[self.a].half_counts[self.tasks.layout.param_of(*key)]),
                                       dtype=torch.float64)}
        return self.cache[key]


class TaskSet:
    """Tasks collected once (``sf.analyze_tasks``): :meth:`pair` is any ordered pair's
    :class:`~sketchfisher.InterferenceResult` (scores, error bars, the conflict test, every table and plot);
    :meth:`conflicts` and :meth:`matrix` summarise every pair."""

    def __init__(self, collection: TaskSketches, layout: Layout, cfg: ScoreConfig, codec: Any,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        self.collection, self.layout, self.cfg, self.codec, self.max_bytes = collection, layout, cfg, codec, max_bytes

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
        e = {key: (col.preps[a][key].x_bar.double() * col.preps[b][key].y_bar.double()).sum(-1)
             if col.preps[a][key].x_bar is not None else torch.zeros(col.preps[a][key].w_a.shape[0], dtype=torch.float64)
             for key in col.preps[a]}
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


__all__ = ["TaskSet"]
