"""A batch's work after its capture, one layer at a time, recorded once per layer and replayed batch after batch.

For every module of a layer, the pass forms the per-sample gradient from the factors into a buffer of the module's
own (one per position in the layer, so a layer's gradients are alive together), then folds each into the pass's
statistics and runs each (layer, block)'s side kernel on it. Those statistics updates and side launches read only
the gradient buffers, the statistics' state and the preparations, all of which stay where they are through a pass;
so the second time a layer runs they are recorded as one CUDA graph (:mod:`sketchfisher.kernels.graphs`, kind
``"layers"``) and from then on the layer costs the host one replay instead of two host calls or more per module.
The host still forms the gradients (one ``bmm`` each: their inputs, the factors, lie at new addresses every batch)
and counts each batch into the statistics (:meth:`~sketchfisher.fisher.FisherStats.advance`); the recorded updates
read the count before the batch from a device tensor written before each replay
(:meth:`~sketchfisher.fisher.FisherStats.counts_on`).

Why: at a 7B model with MLP units a batch has 224 modules, and each cost the host about 240 µs in task B's pass
(the side call, the product and the statistics update), 53 ms a batch, on hosts where that made the host, not the
device, pace the pass (docs/benchmarks.md). A layer that cannot be recorded (statistics not yet on the kernel path,
a CPU batch, recording turned off or failed) runs the same launches one by one, with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from ..fisher import FisherStats
from ..kernels.graphs import Replays
from ..layout import Layout
from .passes import PassBuffers, module_of


@dataclass(frozen=True)
class Part:
    """One module of a layer: the weight it owns and the (layer, block)s sketched from its gradient."""

    module: str
    weight: str
    blocks: tuple = ()  # ((layer, block), ...)


def layer_parts(where: Iterable[tuple]) -> list[tuple[Part, ...]]:
    """``[((layer, block), head blocks, module, weight), ...]`` grouped into each layer's parts, in order of first
    appearance (blocks of one module, as a fused QKV projection's, share its part)."""
    layers: dict[Any, dict[str, list]] = {}
    for key, _, module, weight in where:
        modules = layers.setdefault(key[0], {})
        modules.setdefault(module, [weight, []])[1].append(key)
    return [tuple(Part(module, weight, tuple(keys)) for module, (weight, keys) in modules.items())
            for modules in layers.values()]


def weight_groups(layout: Layout, weights: Iterable[str]) -> list[tuple[Part, ...]]:
    """``weights`` as parts without blocks, grouped by their layer in ``layout`` (weights it does not hold, e.g.
    other linear maps of ``modules="all"``, one a group)."""
    layer_of = {layout.param_of(*key): key[0] for key in layout.groups()}
    groups: dict[Any, list[Part]] = {}
    for w in weights:
        groups.setdefault(layer_of.get(w, ("alone", w)), []).append(Part(module_of(w), w))
    return [tuple(parts) for parts in groups.values()]


class LayerWork:
    """One pass's work on each batch after the capture (see the module): the per-sample gradients, folded into
    ``fold`` (statistics, when the pass keeps any) and sketched by ``fused`` (the fused side kernels, when the pass
    sketches) with the preparations ``preps``, layer by layer."""

    def __init__(self, fold: Optional[FisherStats] = None, fused: Any = None, preps: Optional[dict] = None):
        self.fold, self.fused, self.preps = fold, fused, preps
        self.buffers = PassBuffers()
        self.statistics = Replays("statistics")  # (a weight's own recorded update, where its layer is not recorded)
        self.layers = Replays("layers")

    def gradients(self, captured: Any, parts: tuple[Part, ...]) -> list[torch.Tensor]:
        """Each part's per-sample gradient (bf16 where the batch rounds it), in the buffer of its position."""
        n = captured.batch_size
        return [captured.grad(p.module, low=True, into=self.buffers.slot(n, i)) for i, p in enumerate(parts)]

    def run(self, captured: Any, parts: tuple[Part, ...]) -> dict:
        """Fold and sketch one layer of a batch: ``{(layer, block): the side kernel's outputs}`` (empty when the pass
        does not sketch); the statistics have counted the batch when it returns."""
        grads = self.gradients(captured, parts)
        launches = [[(key, self._launcher(key, g)) for key in p.blocks] for p, g in zip(parts, grads)]
        states = [self.fold.ready_state(p.weight, g) for p, g in zip(parts, grads)] if self.fold is not None else []
        # (a recording reads one count for the layer's updates: every weight of it must have seen the same samples)
        if (self.layers.records(grads) and all(s is not None for s in states)
                and (self.fold is None or len({self.fold.welford[p.weight].count for p in parts}) == 1)):
            return self._recorded(parts, grads, launches, states)
        out = {}
        for p, g, blocks in zip(parts, grads, launches):
            if self.fold is not None:
                self.fold.update({p.weight: g}, replays=self.statistics)
            for key, _ in blocks:
                out[key] = self.fused(g, *key, self.preps[key])
        return out

    def _launcher(self, key: tuple, g: torch.Tensor):
        """The side kernel of ``key`` set up for its preparation on ``g``'s device (moved there first, once)."""
        return self.fused.launcher(*key, prep_on(self.preps, key, g.device), g.device)

    def _recorded(self, parts: tuple[Part, ...], grads: list, launches: list, states: list) -> dict:
        """The layer's updates and launches through its recording (made the second time, replayed after)."""
        n, device = grads[0].shape[0], grads[0].device
        counts = self.fold.counts_on(device, self.fold.welford[parts[0].weight].count) if self.fold is not None else None
        places, total = [], 0  # per part: [(key, launch, offset, shape)] in one fp32 tensor for the layer
        for blocks in launches:
            places.append([])
            for key, launch in blocks:
                shape = (n, launch.H, launch.width())
                places[-1].append((key, launch, total, shape))
                total += shape[0] * shape[1] * shape[2]
        kept = [tuple(t for t in s if t is not None) for s in states]

        def work(*inputs: torch.Tensor) -> Optional[torch.Tensor]:  # (reads only its inputs and the launches' set-up)
            flat = torch.empty(total, dtype=torch.float32, device=device) if total else None
            for i, g in enumerate(grads):
                if self.fold is not None:
                    self.fold.launch_update(g, states[i], counts)
                for _, launch, offset, shape in places[i]:
                    launch.run(g, out=_block(flat, offset, shape))
            return flat

        key = ("layer", tuple(p.weight for p in parts), tuple(launch for blocks in launches for _, launch in blocks))
        inputs = [*grads, *(t for s in kept for t in s), *([] if counts is None else [counts])]
        flat = self.layers(key, work, *inputs)
        if self.fold is not None:
            for p in parts:
                self.fold.advance(p.weight, n)
        return {key: self.fused.outputs(launch, _block(flat, offset, shape))
                for blocks in places for key, launch, offset, shape in blocks}


def _block(flat: torch.Tensor, offset: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """One block's outputs ``[n, H, k + 3 + m]`` in a layer's tensor, from ``offset`` on."""
    return flat[offset:offset + shape[0] * shape[1] * shape[2]].view(shape)


def prep_on(preps: dict, key: tuple, device: torch.device) -> Any:
    """``preps[key]`` on ``device``, moved there (and kept so) the first time (statistics read from disk, or another
    card's)."""
    prep = preps[key]
    if prep.device != device:
        prep = preps[key] = prep.to(device)
    return prep


__all__ = ["LayerWork", "Part", "layer_parts", "prep_on", "weight_groups"]
