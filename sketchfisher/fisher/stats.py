"""Per-task Fisher statistics over full-shape parameters (:class:`FisherStats`).

For each parameter, over the task's samples: the Welford state of ``C_i = g_i²`` (count, mean, M2),
``Σ_i |g_i|`` and ``Σ_i g_i`` (pass-1 statistics of the sketch codec). ``Î = mean``; the variance of
``C`` across samples is ``M2 / (n − 1)``. Batches enter as a whole (batch mean and M2) and are
merged with Chan et al.'s exact pairwise formula, so shards, batch sizes and resumption give the
same state up to rounding.

Each is a model-sized tensor, so a collection keeps only the ones its settings need
(``quantities``): at 7B scale each costs 8.6 GB in fp32 for the attention weights alone.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..kernels.graphs import Replays
from ..errors import GradientError, InputError
from ..layout import Layout
from .host import host_copy
from .file_form import FileForm
from .kernel_updates import KernelUpdates
from .precision import accumulator_dtype
from .welford import QUANTITIES, Welford, update_in_chunks

@dataclass
class FisherStats(KernelUpdates, FileForm):
    """Pass-1 statistics of one task: per parameter the sample count and the kept ``quantities``
    (:data:`QUANTITIES`), full shape, in ``dtype``."""

    dtype: torch.dtype = torch.float64
    welford: dict[str, Welford] = field(default_factory=dict)
    sum_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    sum_g: dict[str, torch.Tensor] = field(default_factory=dict)
    quantities: tuple[str, ...] = QUANTITIES
    sum_half: dict[str, torch.Tensor] = field(default_factory=dict)
    half_counts: dict[str, int] = field(default_factory=dict)  # per parameter, the samples the ``half`` sums hold
    abs_dtype: Optional[torch.dtype] = None  # Σ|g|'s accumulator (None: ``dtype``; bf16: stochastic rounding)
    signed_dtype: Optional[torch.dtype] = None  # Σg's and the half sum's accumulator (as ``abs_dtype``)
    # per parameter, the state the Triton update last took and what it was checked for (shape, device, dtypes): a
    # later update of the same tensors skips the checks (224 updates a batch at 7B with MLP units). Weak references:
    # statistics moved to the host or released must leave the device
    _kernel_ready: dict = field(default_factory=dict, repr=False, compare=False)
    _counts: dict = field(default_factory=dict, repr=False, compare=False)  # device -> [counts tensor, its count]

    @classmethod
    def accumulating(cls, dtype: torch.dtype, quantities: tuple[str, ...]) -> "FisherStats":
        """Empty statistics as a collection keeps them: the plain sums in :func:`accumulator_dtype`."""
        acc = accumulator_dtype(dtype)
        return cls(dtype=dtype, quantities=tuple(quantities), abs_dtype=acc, signed_dtype=acc)

    def _like(self, quantities: tuple[str, ...], half_counts: Optional[dict] = None) -> "FisherStats":
        """Empty statistics of this kind (dtypes) keeping ``quantities``."""
        return FisherStats(self.dtype, quantities=quantities, half_counts=dict(half_counts or {}),
                           abs_dtype=self.abs_dtype, signed_dtype=self.signed_dtype)

    def __post_init__(self) -> None:
        unknown = set(self.quantities) - set(QUANTITIES)
        if unknown:
            raise InputError(f"unknown statistics {sorted(unknown)}; choose from {QUANTITIES}")
        if "m2" in self.quantities and "fisher" not in self.quantities:
            raise InputError("the 'm2' statistic needs 'fisher' (the Welford mean) too")
        self.quantities = tuple(q for q in QUANTITIES if q in self.quantities)
        for what, dt in (("Σ|g|", self.abs_dtype), ("Σg", self.signed_dtype)):
            if dt not in (None, self.dtype, torch.bfloat16):
                raise InputError(f"{what} accumulates in the statistics' dtype or in bf16, not {dt}")

    @property
    def sum_dtype(self) -> dict[str, torch.dtype]:
        """The dtype each plain sum accumulates in."""
        signed = self.signed_dtype or self.dtype
        return {"abs": self.abs_dtype or self.dtype, "sum": signed, "half": signed}

    def sums(self) -> tuple[tuple[str, dict[str, torch.Tensor]], ...]:
        """``(quantity, {name: accumulator})`` of every plain sum this kind of statistics can keep."""
        return (("abs", self.sum_abs), ("sum", self.sum_g), ("half", self.sum_half))

    @property
    def half_count(self) -> int:
        """How many samples (those at even positions of the stream) the ``half`` sums hold."""
        counts = set(self.half_counts.values())
        if len(counts) > 1:
            raise InputError(f"parameters saw different half counts: {sorted(counts)}")
        return counts.pop() if counts else 0

    @property
    def count(self) -> int:
        counts = {w.count for w in self.welford.values()}
        if len(counts) > 1:
            raise InputError(f"parameters saw different sample counts: {sorted(counts)}")
        return counts.pop() if counts else 0

    @property
    def moments(self) -> int:
        return 2 if "m2" in self.quantities else 1 if "fisher" in self.quantities else 0

    def nbytes(self) -> int:
        """Bytes held by the statistics' tensors."""
        ts = [t for w in self.welford.values() for t in (w.mean, w.m2) if t is not None]
        ts += [t for _, acc in self.sums() for t in acc.values()]
        return sum(t.numel() * t.element_size() for t in ts)

    def update(self, grads: dict[str, torch.Tensor], replays: Optional[Replays] = None) -> None:
        """Add per-sample gradients ``{name: Tensor[B, *shape]}`` (storage orientation). ``replays``: the pass's
        recorded launches (:mod:`sketchfisher.kernels.graphs`), which the Welford kernel's launches go through."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise InputError(f"per-sample gradient batches disagree on batch size: {sorted(sizes)}")
        for name, g in grads.items():
            n, shape = g.shape[0], g.shape[1:]
            if n == 0:
                continue
            checked = (shape, g.device, g.dtype, self.dtype)
            w, state = self.welford.get(name), self._checked_state(name, checked)
            on_kernel = state is not None  # (the tensors the last kernel update took, as it checked them)
            if not on_kernel:
                w, state = self._state(name, g)
                kept = [s for s in state if s is not None]
                if any(s.shape != shape for s in kept):
                    raise InputError(f"gradients of {name!r} have shape {tuple(shape)}, its statistics "
                                     f"{tuple(kept[0].shape)}")
                on_kernel = bool(kept) and self._kernel_applies(g, kept)  # (no state kept: only the count)
                if on_kernel:
                    self._kernel_ready[name] = (tuple(None if t is None else weakref.ref(t) for t in state), checked)
                elif kept:
                    update_in_chunks(g, w.count, self.dtype, *state)
            if on_kernel:  # one Triton kernel, one pass over g
                self._kernel_update(name, g.reshape(n, -1).contiguous(), state, w.count, replays)
            self.advance(name, n)

    def advance(self, name: str, n: int) -> None:
        """Count a batch of ``n`` samples of ``name`` whose values the state took already (what :meth:`update` does
        after its kernel's launch; a recorded launch, :meth:`launch_update`, leaves it to the caller)."""
        w = self.welford[name]
        if "half" in self.quantities:  # the samples at even positions of the stream
            self.half_counts[name] = self.half_counts.get(name, 0) + len(range(w.count % 2, n, 2))
        w.count += n

    def _state(self, name: str, g: torch.Tensor) -> tuple[Welford, tuple[Optional[torch.Tensor], ...]]:
        """The Welford state of ``name`` and its kept accumulators (mean, M2, Σ|g|, Σg; None where not kept),
        allocated as zeros shaped like one sample of ``g`` on first use and made contiguous in :attr:`dtype`
        (state read from a store or moved elsewhere stays on its device)."""
        w = self.welford.setdefault(name, Welford())
        zeros = lambda: torch.zeros(g.shape[1:], dtype=self.dtype, device=g.device)  # noqa: E731
        ready = lambda t: zeros() if t is None else _as(t, self.dtype)  # noqa: E731
        if w.count == 0:
            w.mean = w.m2 = None
        moments, sum_dtype = self.moments, self.sum_dtype
        w.mean = ready(w.mean) if moments >= 1 else None
        w.m2 = ready(w.m2) if moments == 2 else None
        for q, acc in self.sums():
            if q in self.quantities:
                t = acc.get(name) if w.count else None
                dt = sum_dtype[q]
                acc[name] = torch.zeros(g.shape[1:], dtype=dt, device=g.device) if t is None else _as(t, dt)
        return w, self._held(name, w)

    def merge(self, other: "FisherStats") -> "FisherStats":
        """Statistics of the union of both sample sets (exact), over the quantities both keep."""
        if set(self.welford) != set(other.welford):
            raise InputError("cannot merge FisherStats over different parameter sets")
        kept = tuple(q for q in self.quantities if q in other.quantities)
        out = self._like(kept)
        for n, w in self.welford.items():
            o = other.welford[n]
            moments = out.moments
            out.welford[n] = Welford(w.count, w.mean if moments else None, w.m2 if moments == 2 else None).merged(
                Welford(o.count, o.mean if moments else None, o.m2 if moments == 2 else None))
        kept = tuple(q for q in kept if q != "half")  # (a split of one task's stream: not of a union)
        out.quantities = kept
        for (q, acc), (_, mine), (_, theirs) in zip(out.sums(), self.sums(), other.sums()):
            if q in kept:
                acc.update({n: mine[n] + theirs[n] for n in mine})
        return out

    def compact(self, quantities: tuple[str, ...], dtype: torch.dtype = torch.bfloat16) -> "FisherStats":
        """Round the sums ``"abs"`` and ``"sum"`` among ``quantities`` to ``dtype`` (bf16 by default), in place,
        once the statistics are final (no update after). Where these sums only balance and centre the
        sketches, any value gives the same expectation and the exact identity the scores rest on, as long
        as every use reads the same rounded value: a run rounds them before its first use and a store
        writes the rounded values, so a resumed run reads what the first one used. Means read back in
        :attr:`dtype`. Returns self."""
        for q, acc in self.sums():
            if q in quantities and q in self.quantities:
                for name, t in acc.items():
                    acc[name] = t.to(dtype)
        return self

    def check_finite(self, where: str) -> None:
        """Finite gradients whose squares overflow the statistics' precision leave an infinite Fisher: refused
        with the reason (a later NaN score would not say why)."""
        ts = [t for w in self.welford.values() for t in (w.mean, w.m2) if t is not None]
        ts += [t for _, acc in self.sums() for t in acc.values()]
        if not ts:
            return
        here = ts[0].device
        if not bool(torch.stack([torch.isfinite(t).all().to(here) for t in ts]).all()):
            raise GradientError(f"{where}: the pass-1 statistics overflow {str(self.dtype).replace('torch.', '')} "
                                "(some gradient's square is beyond its range); use float64 statistics "
                                "(stats_dtype=torch.float64) or scale the loss down")

    def names(self) -> list[str]:
        return list(self.welford)

    def offload(self, name: str, keep: tuple[str, ...] = QUANTITIES,
                copy: Callable[[torch.Tensor], torch.Tensor] = host_copy) -> None:
        """Move one parameter's statistics to host memory (a no-op when they are there already) and free
        those not in ``keep`` (statistics already consumed). ``copy`` makes the host copy (e.g.
        :meth:`HostStaging.copy <sketchfisher.fisher.host.HostStaging.copy>`). Call :meth:`settle` after
        the last one."""
        w = self.welford.get(name)
        if w is None:
            return
        host = lambda t: None if t is None else copy(t)  # noqa: E731
        w.mean = host(w.mean) if "fisher" in keep else None
        w.m2 = host(w.m2) if "m2" in keep else None
        for q, acc in self.sums():
            if name in acc:
                if q in keep:
                    acc[name] = host(acc[name])
                else:
                    del acc[name]

    def to_host(self, copy: Callable[[torch.Tensor], torch.Tensor] = host_copy) -> "FisherStats":
        """A copy of these statistics in host memory (``copy`` makes each tensor's host copy)."""
        out = self._like(self.quantities, self.half_counts)
        for name, w in self.welford.items():
            out.welford[name] = Welford(w.count, None if w.mean is None else copy(w.mean),
                                        None if w.m2 is None else copy(w.m2))
        for (_, acc), (_, mine) in zip(out.sums(), self.sums()):
            acc.update({name: copy(t) for name, t in mine.items()})
        return out

    def only(self, quantities: tuple[str, ...]) -> "FisherStats":
        """These statistics restricted to ``quantities`` (the same tensors, not copies)."""
        kept = tuple(q for q in self.quantities if q in quantities)
        out = self._like(kept, self.half_counts if "half" in kept else None)
        moments = out.moments
        for name, w in self.welford.items():
            out.welford[name] = Welford(w.count, w.mean if moments else None, w.m2 if moments == 2 else None)
        for (q, acc), (_, mine) in zip(out.sums(), self.sums()):
            if q in kept:
                acc.update(mine)
        return out

    def release(self, keep: tuple[str, ...]) -> None:
        """Free every statistic not in ``keep``, for every parameter (where they are)."""
        for name in list(self.welford):
            self.offload(name, keep, copy=lambda t: t)
        self.settle(keep)

    def settle(self, keep: tuple[str, ...]) -> None:
        """Declare that only ``keep`` remains (after :meth:`offload` freed the rest for every parameter)."""
        self.quantities = tuple(q for q in self.quantities if q in keep)

    def all_reduce(self, names: list[str]) -> "FisherStats":
        """Statistics of the union over all ``torch.distributed`` ranks (every rank gets the result).

        Each rank contributes (n, n·mean, M2 + n·mean², Σ|g|, Σg) per parameter (the kept ones); the
        sums are all-reduced in fp64 and turned back into a Welford state. Ranks that saw no sample
        contribute zeros; the shapes come from the ranks that did.
        """
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only; gloo takes CPU tensors
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        out = self._like(self.quantities)
        if "half" in self.quantities:
            halves = torch.tensor([float(self.half_counts.get(n, 0)) for n in names], dtype=torch.float64, device=dev)
            dist.all_reduce(halves)
            out.half_counts = {n: int(h) for n, h in zip(names, halves.tolist())}
        for name in names:
            w = self.welford.get(name, Welford())
            local = self._any_tensor(name) if w.count else None
            shape = torch.tensor(list(local.shape) if local is not None else [], dtype=torch.long, device=dev)
            dims = torch.tensor([shape.numel()], dtype=torch.long, device=dev)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX)
            full = torch.zeros(int(dims), dtype=torch.long, device=dev)
            full[: shape.numel()] = shape
            dist.all_reduce(full, op=dist.ReduceOp.MAX)
            zeros = torch.zeros(tuple(full.tolist()), dtype=torch.float64, device=dev)
            got = lambda t: t.double().to(dev) if w.count and t is not None else zeros.clone()  # noqa: E731
            count = torch.tensor([float(w.count)], dtype=torch.float64, device=dev)
            dist.all_reduce(count)
            n = int(count.item())
            mean = m2 = None
            if self.moments:
                local_mean = got(w.mean)
                parts = [w.count * local_mean] + ([got(w.m2) + w.count * local_mean.square()] if self.moments == 2 else [])
                for t in parts:
                    dist.all_reduce(t)
                mean = parts[0] / max(n, 1)
                m2 = (parts[1] - n * mean.square()).clamp_min(0).to(self.dtype) if self.moments == 2 else None
                mean = mean.to(self.dtype)  # reduced in fp64, kept in the statistics' own precision
            out.welford[name] = Welford(n, mean, m2)
            for (q, src), (_, dst) in zip(self.sums(), out.sums()):
                if q in self.quantities:
                    t = got(src.get(name))
                    dist.all_reduce(t)
                    dst[name] = t.to(self.sum_dtype[q])
        return out

    def _any_tensor(self, name: str) -> Optional[torch.Tensor]:
        w = self.welford[name]
        for t in (w.mean, *(acc.get(name) for _, acc in self.sums())):
            if t is not None:
                return t
        return None

    def _require(self, quantity: str, name: str) -> Welford:
        w = self.welford.get(name)
        if w is None or w.count == 0:
            raise InputError(f"no statistics for {name!r} (0 samples)")
        if quantity not in self.quantities:
            raise InputError(f"the statistic {quantity!r} of {name!r} is not kept (these statistics keep "
                             f"{self.quantities}: the settings did not need it, or it was freed once consumed)")
        return w

    def fisher(self, name: str) -> torch.Tensor:
        """Î = (1/n) Σ_i g_i² for one parameter, full shape."""
        return self._require("fisher", name).mean

    def mean_abs(self, name: str) -> torch.Tensor:
        """Σ|g| / n (compacted sums read in :attr:`dtype`). The means multiply by 1/n rather than divide: CUDA
        divides by a scalar that way, and the CPU then gives the same bits (preparations rounded to bf16 are
        formed from these means on whichever device reads the statistics)."""
        return self.sum_abs[name].to(self.dtype) * (1.0 / self._require("abs", name).count)

    def mean_grad(self, name: str, device: Optional[torch.device] = None,
                  moved: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Σg / n, formed on ``device`` where given (the sum moves there in its own, narrower dtype first;
        ``moved``: that sum, already moved)."""
        count = self._require("sum", name).count
        if moved is None:
            moved = self.sum_g[name].to(device or self.sum_g[name].device, non_blocking=True)
        return moved.to(self.dtype) * (1.0 / count)

    def mean_grad_half(self, name: str) -> torch.Tensor:
        """The mean gradient over the samples at even positions (the ``half`` split)."""
        self._require("half", name)
        if self.half_counts.get(name, 0) < 1:
            raise InputError(f"no samples at even positions for {name!r}")
        return self.sum_half[name].to(self.dtype) * (1.0 / self.half_counts[name])

    def block(self, layout: Layout, layer: int, block: str, what: str = "fisher") -> torch.Tensor | None:
        """A statistic (``fisher``, ``mean_abs``, ``mean_grad``) over the distinct head blocks of
        (layer, block): ``[H_b, S]``; None if not collected."""
        name = layout.param_of(layer, block)
        if name not in self.welford:
            return None
        return layout.gather(layer, block, getattr(self, what)(name).unsqueeze(0))[0]

    def fisher_block(self, layout: Layout, layer: int, block: str) -> torch.Tensor | None:
        """Î over the distinct head blocks of (layer, block): ``[H_b, S]``; None if not collected."""
        return self.block(layout, layer, block, "fisher")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` contiguous in ``dtype``: itself where it is already (each update of every weight asks)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
