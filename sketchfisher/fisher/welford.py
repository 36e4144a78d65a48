"""Per-task Fisher statistics over full-shape parameters (SEMANTICS §2).

For each parameter, over the task's samples: the Welford state of ``C_i = g_i²`` (count, mean, M2),
and ``Σ_i |g_i|`` (pass-1 statistic used for sketch balancing). ``Î = mean``; the variance of
``C`` across samples is ``M2 / (n − 1)``. Batches enter as a whole (batch mean and M2) and are
merged with Chan et al.'s exact pairwise formula, so shards, batch sizes and resumption give the
same state up to rounding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .. import kernels
from ..errors import InputError
from ..layout import Layout


@dataclass
class Welford:
    """Elementwise (count, mean, M2) of a stream of equally shaped tensors."""

    count: int = 0
    mean: torch.Tensor | None = None
    m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
        """Add a batch ``x [B, *shape]``."""
        x = x.to(dtype)
        n = x.shape[0]
        if n == 0:
            return
        mean = x.mean(0)
        m2 = (x - mean).square().sum(0)
        self._merge(n, mean, m2)

    def _merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.count == 0:
            self.count, self.mean, self.m2 = n, mean.clone(), m2.clone()
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def merged(self, other: "Welford") -> "Welford":
        out = Welford(self.count, None if self.mean is None else self.mean.clone(),
                      None if self.m2 is None else self.m2.clone())
        if other.count:
            out._merge(other.count, other.mean, other.m2)
        return out

    def variance(self) -> torch.Tensor:
        """Unbiased variance across samples, ``M2 / (n − 1)``."""
        if self.count < 2:
            raise InputError(f"variance needs at least 2 samples, have {self.count}")
        return self.m2 / (self.count - 1)


@dataclass
class FisherStats:
    """Pass-1 statistics of one task: per parameter Welford state of g² and Σ|g|, full shape."""

    dtype: torch.dtype = torch.float64
    welford: dict[str, Welford] = field(default_factory=dict)
    sum_abs: dict[str, torch.Tensor] = field(default_factory=dict)
    sum_g: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def count(self) -> int:
        counts = {w.count for w in self.welford.values()}
        if len(counts) > 1:
            raise InputError(f"parameters saw different sample counts: {sorted(counts)}")
        return counts.pop() if counts else 0

    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """Add per-sample gradients ``{name: Tensor[B, *shape]}`` (storage orientation)."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise InputError(f"per-sample gradient batches disagree on batch size: {sorted(sizes)}")
        for name, g in grads.items():
            if self._fused_update(name, g):
                continue
            self.welford.setdefault(name, Welford()).update(g.to(self.dtype).square(), self.dtype)
            gd = g.to(self.dtype)
            for acc, value in ((self.sum_abs, gd.abs().sum(0)), (self.sum_g, gd.sum(0))):
                acc[name] = acc[name] + value if name in acc else value

    def _fused_update(self, name: str, g: torch.Tensor) -> bool:
        """The same update in one Triton kernel for CUDA batches (one pass over ``g``); False where it does not apply."""
        if not (g.is_cuda and g.shape[0] > 0 and g.dtype in kernels.DTYPES and self.dtype in (torch.float32, torch.float64)
                and kernels.available()):
            return False
        w = self.welford.setdefault(name, Welford())
        shape = g.shape[1:]
        if w.count == 0:
            w.mean, w.m2 = (torch.zeros(shape, dtype=self.dtype, device=g.device) for _ in range(2))
        if name not in self.sum_abs:
            self.sum_abs[name] = torch.zeros(shape, dtype=self.dtype, device=g.device)
            self.sum_g[name] = torch.zeros(shape, dtype=self.dtype, device=g.device)
        state = (w.mean, w.m2, self.sum_abs[name], self.sum_g[name])
        if any(s.device != g.device or s.dtype != self.dtype or not s.is_contiguous() or s.shape != shape for s in state):
            return False  # state from elsewhere (another device or dtype): the torch update below
        kernels.welford_update(g.reshape(g.shape[0], -1).contiguous(), *state, count=w.count)
        w.count += g.shape[0]
        return True

    def merge(self, other: "FisherStats") -> "FisherStats":
        """Statistics of the union of both sample sets (exact)."""
        if set(self.welford) != set(other.welford):
            raise InputError("cannot merge FisherStats over different parameter sets")
        return FisherStats(self.dtype, {n: w.merged(other.welford[n]) for n, w in self.welford.items()},
                           {n: self.sum_abs[n] + other.sum_abs[n] for n in self.sum_abs},
                           {n: self.sum_g[n] + other.sum_g[n] for n in self.sum_g})

    def names(self) -> list[str]:
        return list(self.welford)

    def all_reduce(self, names: list[str]) -> "FisherStats":
        """Statistics of the union over all ``torch.distributed`` ranks (every rank gets the result).

        Each rank contributes (n, n·mean, M2 + n·mean², Σ|g|, Σg) per parameter; the sums are
        all-reduced in fp64 and turned back into a Welford state. Ranks that saw no sample
        contribute zeros; the shapes come from the ranks that did.
        """
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only; gloo takes CPU tensors
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        out = FisherStats(self.dtype)
        for name in names:
            w = self.welford.get(name, Welford())
            shape = torch.tensor(list(w.mean.shape) if w.count else [], dtype=torch.long, device=dev)
            dims = torch.tensor([shape.numel()], dtype=torch.long, device=dev)
            dist.all_reduce(dims, op=dist.ReduceOp.MAX)
            full = torch.zeros(int(dims), dtype=torch.long, device=dev)
            full[: shape.numel()] = shape
            dist.all_reduce(full, op=dist.ReduceOp.MAX)
            size = tuple(full.tolist())
            zeros = torch.zeros(size, dtype=torch.float64, device=dev)
            mean = w.mean.double().to(dev) if w.count else zeros
            parts = [torch.tensor([float(w.count)], dtype=torch.float64, device=dev), w.count * mean,
                     (w.m2.double().to(dev) if w.count else zeros) + w.count * mean.square(),
                     self.sum_abs[name].double().to(dev) if w.count else zeros.clone(),
                     self.sum_g[name].double().to(dev) if w.count else zeros.clone()]
            for t in parts:
                dist.all_reduce(t)
            n = int(parts[0].item())
            mean = parts[1] / max(n, 1)
            out.welford[name] = Welford(n, mean, (parts[2] - n * mean.square()).clamp_min(0))
            out.sum_abs[name], out.sum_g[name] = parts[3], parts[4]
        return out

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors and string metadata for safetensors (``name::mean`` etc.)."""
        tensors, counts = {}, {}
        for name, w in self.welford.items():
            if w.count == 0:
                continue
            tensors.update({f"{name}::mean": w.mean, f"{name}::m2": w.m2, f"{name}::sum_abs": self.sum_abs[name],
                            f"{name}::sum_g": self.sum_g[name]})
            counts[name] = w.count
        return {k: v.contiguous() for k, v in tensors.items()}, {"counts": json.dumps(counts), "dtype": str(self.dtype)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> "FisherStats":
        counts = json.loads(metadata["counts"])
        out = cls(dtype=getattr(torch, metadata["dtype"].replace("torch.", "")))
        for name, count in counts.items():
            out.welford[name] = Welford(int(count), tensors[f"{name}::mean"], tensors[f"{name}::m2"])
            out.sum_abs[name] = tensors[f"{name}::sum_abs"]
            out.sum_g[name] = tensors[f"{name}::sum_g"]
        return out

    def fisher(self, name: str) -> torch.Tensor:
        """Î = (1/n) Σ_i g_i² for one parameter, full shape."""
        w = self.welford.get(name)
        if w is None or w.count == 0:
            raise InputError(f"no statistics for {name!r} (0 samples)")
        return w.mean

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.sum_abs[name] / self.welford[name].count

    def mean_grad(self, name: str) -> torch.Tensor:
        return self.sum_g[name] / self.welford[name].count

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


@dataclass
class EMAFisher:
    """Exponential moving average ``F_t = β F_{t−1} + (1−β) C_t`` with ``F_0 = 0``.

    :meth:`value` is the bias-corrected ``F̂_t = F_t / (1 − β^t)``; a constant stream returns the
    constant at every step.
    """

    beta: float = 0.99
    steps: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise InputError(f"EMAFisher.beta must be in [0, 1), got {self.beta!r}")

    def update(self, grads: dict[str, torch.Tensor]) -> None:
        """Add per-sample gradients ``{name: Tensor[B, *shape]}``: B steps in batch order."""
        sizes = {g.shape[0] for g in grads.values()}
        if len(sizes) != 1:
            raise InputError(f"per-sample gradient batches disagree on batch size: {sorted(sizes)}")
        for name, g in grads.items():
            f = self.state.get(name)
            f = torch.zeros(g.shape[1:], dtype=torch.float64, device=g.device) if f is None else f
            for c in g.to(torch.float64).square():
                f = self.beta * f + (1.0 - self.beta) * c
            self.state[name] = f
        self.steps += sizes.pop()

    def value(self, name: str) -> torch.Tensor:
        if self.steps == 0:
            raise InputError("EMAFisher has seen no samples")
        return self.state[name] / (1.0 - self.beta ** self.steps)
