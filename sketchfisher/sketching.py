"""Two-pass sketch collection and sketched Stage 6 scores (SEMANTICS §5).

Pass 1 accumulates exact per-task statistics (Welford of g², Σ|g|, Σg) for both tasks. Pass 2 runs
the model again, forms each sample's head-block gradients from its factors (one block at a time),
turns them into the variant's i-side (task A) or j-side (task B) vectors, and sketches them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from .capture import FactorCapture
from .capture.oracle import LossFn
from .compress import kernels
from .compress.sketch import Sketch, SketchSide
from .errors import InputError
from .fisher import FisherStats
from .layout import BLOCKS, Layout, block_index
from .metric import ScoreConfig, ridge
from .progress import progress


@dataclass
class BlockPrep:
    """Pass-1 quantities of one (layer, block), all ``[H_b, S]`` except ``e [H_b]``."""

    denom: torch.Tensor      # Î + ε + λ (normaliser)
    fisher_a: Optional[torch.Tensor]  # task A's Î, kept only for leave-one-out (it is model-sized)
    balance: torch.Tensor    # √m, m = mean|g| over A ∪ B (ones without variance reduction)
    x_bar: torch.Tensor      # balanced i-side centre (zeros without variance reduction)
    y_bar: torch.Tensor      # balanced j-side centre
    e: torch.Tensor          # ⟨x̄', ȳ'⟩


def prepare(layout: Layout, layer: int, block: str, stats_a: FisherStats, stats_b: FisherStats,
            norm_stats: FisherStats, cfg: ScoreConfig, codec: Sketch) -> Optional[BlockPrep]:
    """Pass-1 quantities of one (layer, block); ``norm_stats`` holds the normaliser Î (A, or A ∪ B)."""
    fisher = norm_stats.block(layout, layer, block, "fisher")
    if fisher is None:
        return None
    fisher_a = stats_a.block(layout, layer, block, "fisher")
    denom = fisher + cfg.eps + ridge(fisher, cfg)
    if not codec.variance_reduction:
        zeros = torch.zeros_like(fisher)
        kept_a = fisher_a if cfg.normalizer == "loo" else None
        return _cast(BlockPrep(denom, kept_a, torch.ones_like(fisher), zeros, zeros, zeros.sum(-1)), cfg)
    n_a, n_b = stats_a.count, stats_b.count
    abs_a, abs_b = stats_a.block(layout, layer, block, "mean_abs"), stats_b.block(layout, layer, block, "mean_abs")
    m = (abs_a * n_a + abs_b * n_b) / (n_a + n_b)
    balance = torch.where(m > 0, m.sqrt(), torch.ones_like(m))
    if cfg.variant == "paper":
        x_bar, y_bar = fisher_a / denom, abs_b
    elif cfg.variant == "signed":
        x_bar, y_bar = stats_a.block(layout, layer, block, "mean_grad") / denom, \
            stats_b.block(layout, layer, block, "mean_grad")
    else:
        x_bar, y_bar = abs_a / denom, abs_b
    x_bar, y_bar = x_bar * balance, y_bar / balance
    kept_a = fisher_a if cfg.normalizer == "loo" else None
    return _cast(BlockPrep(denom, kept_a, balance, x_bar, y_bar, (x_bar * y_bar).sum(-1)), cfg)


def _cast(prep: BlockPrep, cfg: ScoreConfig) -> BlockPrep:
    """Side vectors are built in ``cfg.dtype``; the exact scalar e keeps fp64."""
    t = lambda x: None if x is None else x.to(cfg.dtype)  # noqa: E731
    return BlockPrep(t(prep.denom), t(prep.fisher_a), t(prep.balance), t(prep.x_bar), t(prep.y_bar), prep.e.double())


def prepare_all(layout: Layout, stats_a: FisherStats, stats_b: FisherStats, cfg: ScoreConfig, codec: Sketch) -> dict:
    """:func:`prepare` for every (layer, block)."""
    norm_stats = stats_a.merge(stats_b) if cfg.normalizer == "pooled" else stats_a  # merged once
    return {(layer, block): prepare(layout, layer, block, stats_a, stats_b, norm_stats, cfg, codec)
            for layer in range(layout.num_layers) for block in BLOCKS}


def side_transform(side: str, variant: str) -> str:
    """The entry-wise function of g in the variant's i-side (``"a"``) or j-side (``"b"``) vector."""
    if side == "b":
        return "identity" if variant == "signed" else "abs"
    return {"paper": "square", "signed": "identity", "symmetric": "abs"}[variant]


def side_vector(g: torch.Tensor, prep: BlockPrep, side: str, count: int, cfg: ScoreConfig) -> torch.Tensor:
    """Balanced i-side (``"a"``) or j-side (``"b"``) vectors ``[B, H_b, S]`` from block gradients."""
    g = g.to(cfg.dtype)  # fp32 by default: the CUDA sjlt kernels take fp32/bf16/fp16, not fp64
    num = kernels.TRANSFORM_FNS[side_transform(side, cfg.variant)](g)
    if side == "b":
        return num / prep.balance
    denom = prep.denom
    if cfg.normalizer == "loo":
        if count < 2:
            raise InputError(f"normalizer='loo' needs at least 2 task-A samples, got {count}")
        loo = (count * prep.fisher_a.double() - g.double().square()) / (count - 1)  # fp64: cancellation
        denom = loo.clamp_min(0).to(cfg.dtype) + (prep.denom - prep.fisher_a)
    return num / denom * prep.balance


def sketch_batches(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Sketch,
                   preps: dict, side: str, count: int, cfg: ScoreConfig, skip: Callable[[int], bool] = lambda i: False,
                   ) -> Iterator[tuple[int, int, dict]]:
    """Pass 2 over one task, batch by batch: ``(batch index, batch size, {(layer, block): (sketches
    [B, H_b, k], ‖x̃‖² [B, H_b], cross [B, H_b])})``. Batches for which ``skip(index)`` is true are
    not run (resumption) and yield nothing."""
    keys = [key for key, prep in preps.items() if prep is not None]
    modules = sorted({layout.head_blocks(*key)[0].param_name.rsplit(".", 1)[0] for key in keys})
    fused = FusedSides(layout, codec, cfg, side)
    with FactorCapture(model, modules) as cap:
        for index, batch in enumerate(batches):
            if skip(index):
                continue
            bf = cap.run(loss_fn, batch)
            out = {}
            last = (None, None)  # (module, its per-sample gradient): blocks of one fused module share it
            for layer, block in keys:
                prep = preps[(layer, block)]
                hbs = layout.head_blocks(layer, block)
                module = hbs[0].param_name.rsplit(".", 1)[0]
                if fused.applies(bf.A[module]):
                    if last[0] != module:
                        last = (None, None)  # free the previous module's gradient first
                        last = (module, bf.grad(module))
                    out[(layer, block)] = fused(last[1], layer, block, prep)
                    continue
                g = torch.stack([hb.grad_from_factors(bf.A[module], bf.D[module]).flatten(-2) for hb in hbs], 1)
                v = side_vector(g, prep, side, count, cfg)
                centre = prep.x_bar if side == "a" else prep.y_bar
                other = prep.y_bar if side == "a" else prep.x_bar
                cross = (v * other).sum(-1)
                v = v - centre
                sk = torch.stack([codec.map(layer, block_index(block), h, v.shape[-1]).apply(v[:, h])
                                  for h in range(v.shape[1])], 1)
                out[(layer, block)] = (sk, v.square().sum(-1), cross)
            yield index, bf.batch_size, out


class FusedSides:
    """Pass 2 for sjlt on CUDA in one Triton kernel per (layer, block): the side vectors, their cross
    terms and norms and the sketches, read straight out of the module's per-sample gradient
    (:func:`sketchfisher.compress.kernels.sketch_heads`). Computes what the torch path of
    :func:`sketch_batches` computes (``tests/test_gpu.py``); leave-one-out task-A sides and
    non-fp32 score dtypes take the torch path."""

    def __init__(self, layout: Layout, codec: Sketch, cfg: ScoreConfig, side: str):
        self.layout, self.codec, self.cfg, self.side = layout, codec, cfg, side
        self.enabled = (codec.kind == "sjlt" and cfg.dtype == torch.float32 and kernels.available()
                        and not (side == "a" and cfg.normalizer == "loo"))
        self._geometry: dict = {}

    def applies(self, factor: torch.Tensor) -> bool:
        return self.enabled and factor.is_cuda

    def geometry(self, layer: int, block: str, device: torch.device):
        """Hash keys ``[H_b, 2]``, element offsets ``[H_b]``, size, columns and row stride of the head blocks."""
        if (layer, block) not in self._geometry:
            hbs = self.layout.head_blocks(layer, block)
            hb = hbs[0]
            size, cols_p = hb.numel, hb.param_shape[1]
            if hb.storage_axis == 0:
                offsets, cols = [b.start * cols_p for b in hbs], cols_p
            else:
                offsets, cols = [b.start for b in hbs], hb.width
            keys = [self.codec.map(layer, block_index(block), h, size).hash_key() for h in range(len(hbs))]
            self._geometry[(layer, block)] = (kernels.to_device(torch.tensor(keys, dtype=torch.int64), device),
                                              kernels.to_device(torch.tensor(offsets, dtype=torch.int64), device),
                                              size, cols, cols_p)
        return self._geometry[(layer, block)]

    def __call__(self, grad: torch.Tensor, layer: int, block: str, prep: BlockPrep):
        keys, offsets, size, cols, row_stride = self.geometry(layer, block, grad.device)
        if self.side == "a":
            weight, centre, other = prep.balance / prep.denom, prep.x_bar, prep.y_bar
        else:
            weight, centre, other = prep.balance.reciprocal(), prep.y_bar, prep.x_bar
        return kernels.sketch_heads(grad, keys, offsets, size, cols, row_stride, self.codec.k, self.codec.s,
                                    transform=side_transform(self.side, self.cfg.variant), weight=weight,
                                    centre=centre, other=other)


def sketch_task(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Sketch,
                preps: dict, side: str, count: int, cfg: ScoreConfig, desc: str, show_progress: bool) -> SketchSide:
    """Pass 2 over one task in memory: every sample's sketched ``side`` vectors."""
    out = SketchSide(codec)
    for _, size, blocks in progress(sketch_batches(model, loss_fn, batches, layout, codec, preps, side, count, cfg),
                                    desc=desc, enabled=show_progress):
        for key, (sk, norm2, cross) in blocks.items():
            out.add(key, sk, norm2, cross)
        out.n += size
    return out


@dataclass
class SketchBlock:
    """Sketched scores of one (layer, block): ⟨R x̃_i, R ỹ_j⟩ + c_i + d_j − e with JL standard errors."""

    xa: torch.Tensor   # [nA, H_b, k]
    na: torch.Tensor   # ‖x̃_i‖² [nA, H_b]
    ca: torch.Tensor   # ⟨x'_i, ȳ'⟩ [nA, H_b]
    yb: torch.Tensor   # [nB, H_b, k]
    nb: torch.Tensor
    db: torch.Tensor
    e: torch.Tensor    # [H_b]
    k: int
    fpc: float         # finite-population correction (srht), else 1

    @property
    def n_a(self) -> int:
        return self.xa.shape[0]

    @property
    def row_bytes(self) -> int:
        return 8 * (self.xa.shape[1] * self.xa.shape[2] + 3 * self.yb.shape[0] * self.xa.shape[1])

    def rows(self, lo: int, hi: int):
        term = torch.einsum("ihk,jhk->ijh", self.xa[lo:hi], self.yb)
        scores = term + self.ca[lo:hi, None, :] + self.db[None, :, :] - self.e[None, None, :]
        var = (term.square() + self.na[lo:hi, None, :] * self.nb[None, :, :]) / self.k * self.fpc
        return scores, var.sqrt()


def sketch_provider(layout: Layout, side_a: SketchSide, side_b: SketchSide, preps: dict, codec: Sketch):
    """Provider for :mod:`sketchfisher.interference.engine` from the two sides' sketches."""
    def provider(layer: int, block: str) -> Optional[SketchBlock]:
        prep = preps.get((layer, block))
        a, b = side_a.get((layer, block)), side_b.get((layer, block))
        if prep is None or a is None or b is None:
            return None
        fpc = 1.0
        if codec.kind == "srht":
            P = codec.map(layer, 0, 0, layout.head_blocks(layer, block)[0].numel).padded
            fpc = max(P - codec.k, 0) / max(P - 1, 1)
        return SketchBlock(*a, *b, prep.e.double(), codec.k, fpc)
    return provider


def collect_sketches(model: nn.Module, loss_fn: LossFn, task_a: Iterable[Any], task_b: Iterable[Any],
                     layout: Layout, codec: Sketch, cfg: ScoreConfig, stats_a: FisherStats, stats_b: FisherStats,
                     show_progress: bool = False):
    """Pass 2 for both tasks given their pass-1 statistics; returns a score provider and the two sides."""
    for name, task in (("task_a", task_a), ("task_b", task_b)):
        if iter(task) is task:
            raise InputError(f"{name} is a one-shot iterator; Sketch needs two passes, pass a list or a DataLoader")
    preps = prepare_all(layout, stats_a, stats_b, cfg, codec)
    side_a = sketch_task(model, loss_fn, task_a, layout, codec, preps, "a", stats_a.count, cfg, "sketch A",
                         show_progress)
    side_b = sketch_task(model, loss_fn, task_b, layout, codec, preps, "b", stats_a.count, cfg, "sketch B",
                         show_progress)
    if side_a.n != stats_a.count or side_b.n != stats_b.count:
        raise InputError(f"pass 2 saw {side_a.n}/{side_b.n} samples but pass 1 saw {stats_a.count}/{stats_b.count}: "
                         "the tasks must yield the same batches on every pass")
    return sketch_provider(layout, side_a, side_b, preps, codec), side_a, side_b

