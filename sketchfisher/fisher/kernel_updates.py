"""The Welford kernel's side of :class:`~sketchfisher.fisher.FisherStats.update`: whether a batch goes to the
Triton update, the state it last took (checked once, then launched straight away), and the launch itself, directly
or as a recording replayed batch after batch (:mod:`sketchfisher.kernels.graphs`)."""

from __future__ import annotations

from typing import Optional

import torch

from .. import kernels
from ..kernels.graphs import Replays
from .welford import Welford


class KernelUpdates:
    """:class:`~sketchfisher.fisher.FisherStats`'s kernel path (a mixin: it reads the statistics' ``welford``,
    plain sums, ``dtype``, ``_kernel_ready`` and ``_counts``)."""

    def _kernel_update(self, name: str, g: torch.Tensor, state: tuple, count: int, replays: Optional[Replays]) -> None:
        """The Welford kernel on ``g [n, N]``; through ``replays`` (one recording per parameter) it reads the count from
        a device tensor of these statistics (set once per count), so that one recording serves every batch of a
        pass."""
        if replays is None or not replays.active:
            kernels.welford_update(g, *state[:4], count=count, sum_half=state[4], dtype=self.dtype)
            return
        kept = tuple(t is not None for t in state)

        def launch(g: torch.Tensor, *tensors: torch.Tensor) -> None:
            given = iter(tensors)
            self.launch_update(g, tuple(next(given) if k else None for k in kept), next(given))

        replays(("welford", name, kept, self.dtype), launch, g, *(t for t in state if t is not None),
                self.counts_on(g.device, count))

    def ready_state(self, name: str, g: torch.Tensor) -> Optional[tuple[Optional[torch.Tensor], ...]]:
        """The state tensors (mean, M2, Σ|g|, Σg, half sum) that a batch ``g [n, *shape]`` of ``name`` folds into,
        where its last update took the kernel path with these very tensors for gradients like ``g``; None where the
        batch must go through :meth:`update` (a first update, moved or replaced state, another shape or device)."""
        return self._checked_state(name, (g.shape[1:], g.device, g.dtype, self.dtype))

    def launch_update(self, g: torch.Tensor, state: tuple, counts: torch.Tensor) -> None:
        """The Welford kernel folding ``g [n, *shape]`` into ``state`` (:meth:`ready_state`), reading the count before
        the batch from ``counts`` (:meth:`counts_on`): device work only, which a CUDA graph can record once for every
        batch; the caller counts the batch (:meth:`advance`)."""
        kernels.welford_update(g.reshape(g.shape[0], -1), *state[:4], count=0, sum_half=state[4], dtype=self.dtype,
                               counts=counts)

    def counts_on(self, device: torch.device, count: int) -> torch.Tensor:
        """An int64 tensor on ``device`` holding :func:`~sketchfisher.kernels.update_counts` of ``count`` (written
        in stream order where the count changed: the launches queued before read the one before)."""
        held = self._counts.get(device)
        if held is None:
            held = self._counts[device] = [torch.zeros(3, dtype=torch.int64, device=device), None]
        if held[1] != count:
            values = torch.tensor(kernels.update_counts(count), dtype=torch.int64)
            held[0].copy_(values.pin_memory() if held[0].is_cuda else values, non_blocking=True)
            held[1] = count
        return held[0]

    def _checked_state(self, name: str, checked: tuple) -> Optional[tuple[Optional[torch.Tensor], ...]]:
        """The state of ``name`` where it is the same tensors the last kernel update took, for a gradient of the same
        ``checked`` (shape, device, dtypes) after a first update; else None."""
        ready, w = self._kernel_ready.get(name), self.welford.get(name)
        if ready is None or w is None or not w.count or ready[1] != checked:
            return None
        state = self._held(name, w)
        return state if all(now is (then if then is None else then()) for now, then in zip(state, ready[0])) else None

    def _held(self, name: str, w: Welford) -> tuple[Optional[torch.Tensor], ...]:
        """The state tensors of ``name`` as held now (mean, M2, Σ|g|, Σg, half sum)."""
        return w.mean, w.m2, self.sum_abs.get(name), self.sum_g.get(name), self.sum_half.get(name)

    def _kernel_applies(self, g: torch.Tensor, state: tuple[Optional[torch.Tensor], ...]) -> bool:
        """Whether the Triton update takes this batch: CUDA gradients and state on its device, Triton present."""
        device = g.device
        return (g.is_cuda and g.dtype in kernels.DTYPES and self.dtype in (torch.float32, torch.float64)
                and all(s.device == device for s in state if s is not None) and kernels.available())
