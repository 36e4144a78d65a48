"""A block's launches recorded once as a CUDA graph and replayed batch after batch: one host call instead of many.

At a 7B model's 224 (layer, block)s a batch, a pass's side kernels cost the host more than the device: each call
checks its arguments, allocates its outputs and goes through Triton's launcher twice. What a call reads besides the
per-sample gradient (the preparations, made once a pass) sits at the same addresses all pass long, and the pass
writes each module's gradient into a buffer of its own position in the layer
(:meth:`~sketchfisher.capture.BatchFactors.grad`'s ``into``), so the launches of one (block, batch size) read the same memory every batch. :class:`Replays` records
them the second time they run (the first compiles the kernels) and afterwards replays the recording, returning a
copy of its output.

A recording is keyed by the caller's key and by each input's address, shape, strides and dtype: a replay reads the
inputs where the recording read them, so it runs only where the inputs of this call are those very tensors' places.
Anything else a recording reads must stay put while its key can come again (the callers key by the object that holds
it). Recording needs CUDA graphs; where one cannot be made, the :class:`Replays` logs why once and runs every call
directly from then on (the same numbers).

Each :class:`Replays` serves one kind of launch, and :data:`RECORDED` says which kinds are recorded: ``"layers"``
(every statistics update and side-kernel launch of one layer of a batch, :mod:`sketchfisher.collect.layers`) and
``"statistics"`` (one parameter's Welford update, where its layer is not recorded whole). Measured end to end on
three H100s at a 7B shape (docs/benchmarks.md), recorded statistics updates took task A's first pass 1.0 s shorter on
average over five pairs (1.1-1.8 s in four, 0.5 s longer in one); recording each layer whole took a card from 2.91x to
2.58x a plain pass. (Recording each block's side launches on their own made task A's sketch pass 0.8-1.2 s longer in
three of four runs; layers replaced it.) ``SKETCHFISHER_GRAPHS`` sets it: ``0`` (none), ``statistics`` (the
statistics one parameter a recording), ``layers`` (the default: whole layers, and the statistics where a layer is not
recorded; ``1`` and ``all`` say the same).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)
KINDS = ("statistics", "layers")
_SETTINGS = {"0": (), "off": (), "statistics": ("statistics",), "layers": ("statistics", "layers"), "1": KINDS,
             "all": KINDS}


def recorded_kinds(setting: str) -> frozenset:
    """The kinds of launch recorded for a ``SKETCHFISHER_GRAPHS`` setting."""
    if setting not in _SETTINGS:
        raise ValueError(f"SKETCHFISHER_GRAPHS must be one of {sorted(_SETTINGS)}, got {setting!r}")
    return frozenset(_SETTINGS[setting])


RECORDED = recorded_kinds(os.environ.get("SKETCHFISHER_GRAPHS", "layers"))
PER_KEY = 4  # recordings kept per caller key (inputs at other addresses: run directly)


class Replays:
    """Recordings of ``fn(*inputs) -> Tensor or None`` calls of one ``kind`` (:data:`KINDS`), those of one CUDA
    device sharing one memory pool and recorded on one side stream (see the module); a call's device is its first
    input's."""

    def __init__(self, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"a recorded launch's kind is one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.graphs: dict = {}  # full key -> (graph, its output)
        self.seen: set = set()  # full keys run once directly (their kernels compiled)
        self.count: dict = {}  # caller key -> recordings made
        self.pools: dict = {}  # device -> the memory pool its recordings share
        self.streams: dict = {}  # device -> the side stream recordings are made on
        self.broken = False
        self.replayed = 0

    @property
    def active(self) -> bool:
        """Whether calls may be recorded (this kind is, and none has failed to record)."""
        return self.kind in RECORDED and not self.broken

    def records(self, inputs) -> bool:
        """Whether calls on ``inputs`` may be recorded (:attr:`active`, and every input on a CUDA device)."""
        return self.active and all(t.is_cuda for t in inputs)

    def __call__(self, key: Any, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        if not self.records(inputs):
            return fn(*inputs)
        full = (key, *((t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device) for t in inputs))
        kept = self.graphs.get(full)
        if kept is None:
            if self.count.get(key, 0) >= PER_KEY:  # (enough recordings of this key: no more, nothing remembered)
                return fn(*inputs)
            if full not in self.seen:
                self.seen.add(full)
                return fn(*inputs)
            kept = self._record(full, key, fn, inputs)
            if kept is None:
                return fn(*inputs)
        graph, out = kept
        graph.replay()
        self.replayed += 1
        return None if out is None else out.clone()  # (the recording's output is overwritten by its next replay)

    def forget(self, key: Any) -> None:
        """Drop the recordings of ``key`` (what they read is about to go)."""
        self.graphs = {full: kept for full, kept in self.graphs.items() if full[0] is not key}
        self.seen = {full for full in self.seen if full[0] is not key}
        self.count.pop(key, None)

    def _record(self, full: tuple, key: Any, fn: Callable[..., torch.Tensor], inputs: tuple) -> Any:
        device = inputs[0].device
        here = torch.cuda.current_stream(device)
        stream = self.streams.get(device)
        if stream is None:
            stream = self.streams[device] = torch.cuda.Stream(device)
        stream.wait_stream(here)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(stream):
                # (thread_local: the host-staging thread may page-lock memory meanwhile)
                graph.capture_begin(pool=self.pools.get(device), capture_error_mode="thread_local")
                try:
                    out = fn(*inputs)
                finally:
                    graph.capture_end()
        except Exception as exc:  # noqa: BLE001  (any failure: every call runs directly, with the same numbers)
            logger.warning("CUDA graphs are off for this pass (each block's launches run one by one): %s", exc)
            self.broken = True
            return None
        here.wait_stream(stream)
        if device not in self.pools:
            self.pools[device] = graph.pool()
        self.count[key] = self.count.get(key, 0) + 1
        self.graphs[full] = (graph, out)
        return self.graphs[full]


__all__ = ["KINDS", "RECORDED", "Replays", "recorded_kinds"]
