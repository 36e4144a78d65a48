"""One collection pass: run the model over a task's batches and hand each batch's capture to a consumer.

Every pass in the library goes through here: in-memory collection (:mod:`.stage1`), pass 2 of
the sketches (:mod:`.sketches`), the store writer, exact re-scoring of candidates and the
benchmarks. A pass is (model, loss, batches, weights) plus what to capture per batch: token
factors from batched hooks (:func:`factor_pass`) or full per-sample gradients from the autograd
oracle (:func:`gradient_pass`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..capture import BatchFactors, FactorCapture, linear_modules, per_sample_gradients
from ..capture.hooks import fp32_reductions
from ..capture.oracle import LossFn, batch_size_of
from ..errors import CaptureUnsupported, GradientError, InputError
from ..fisher import FisherStats
from ..kernels.graphs import Replays
from ..layout import Layout
from ..layout.adapters import trains
from ..progress import progress

logger = logging.getLogger(__name__)
Skip = Callable[[int], bool]


def trainable_weights(model: nn.Module, layout: Layout, modules: str = "attention") -> list[str]:
    """Trainable weight names to collect: the layout's (``"attention"``) or every linear map (``"all"``)."""
    if modules == "attention":
        names = list(layout.params)
    elif modules == "all":
        names = list(dict.fromkeys([*layout.params, *(m + ".weight" for m in linear_modules(model))]))
        other = [f"{m}.{n}" if m else n for m, mod in model.named_modules()
                 if not isinstance(mod, (nn.Linear, nn.Embedding))
                 for n, p in mod.named_parameters(recurse=False) if p.ndim >= 2 and (f"{m}.{n}" if m else n) not in names]
        if other:  # e.g. MoE experts kept as one [experts, out, in] tensor, custom routers, convolutions
            logger.warning("modules='all' collects nn.Linear weights; %d matrix parameters of other modules (MoE "
                           "experts stored fused, routers, convolutions) are not collected: %s", len(other), other[:3])
    else:
        raise InputError(f"modules must be 'attention' or 'all', got {modules!r}")
    named = dict(model.named_parameters())
    trained = {n: trains(model, n, named[n]) for n in names}  # (an adapted weight trains through its adapter)
    frozen = [n for n in names if not trained[n]]
    if frozen:
        logger.info("not collecting %d frozen parameters (their scores are NaN): %s", len(frozen), frozen[:3])
    names = [n for n in names if trained[n]]
    if not names:
        raise InputError("every weight to collect is frozen (requires_grad=False); nothing to score")
    return names


def module_of(weight: str) -> str:
    """The module that owns a weight parameter (``blocks.0.attn.q.weight`` → ``blocks.0.attn.q``)."""
    return weight.rsplit(".", 1)[0]


def factor_pass(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], weights: list[str], *,
                skip: Skip = lambda index: False, desc: str = "pass", show_progress: bool = False,
                total: int | None = None) -> Iterator[tuple[int, BatchFactors]]:
    """``(batch index, factors)`` of every batch whose index ``skip`` does not reject, with hooks on
    the modules owning ``weights`` (entered once for the whole pass). A batch with non-finite losses or factors
    raises :class:`GradientError` once its consumer hands it back, before the next batch runs, or where the
    consumer calls its ``settle()`` first: the device is not stopped after each backward pass."""
    modules = list(dict.fromkeys(module_of(w) for w in weights))
    total = total if total is not None else sized(batches)
    start: int | None = 0  # sample id of the batch's first sample (None once a batch's size is unknown)
    with FactorCapture(model, modules) as cap:
        for index, batch in enumerate(progress(batches, desc=desc, enabled=show_progress, total=total)):
            size = batch_size_of(batch)
            if not skip(index):
                named = partial(naming_samples, desc, index, start)
                with named():
                    captured = cap.run(loss_fn, batch, defer_screen=True)
                captured.screen.context = named
                size = captured.batch_size
                yield index, captured
                # finite losses and factors: read once the consumer has queued its work on the batch (a consumer
                # that keeps anything beyond memory settles before it writes: BatchFactors.settle)
                captured.settle()
            start = None if start is None or size is None else start + size


@contextmanager
def naming_samples(desc: str, index: int, start: int | None) -> Iterator[None]:
    """Errors raised for a batch name the pass, the batch and, where known, the samples' ids (their
    positions in the task's iteration order)."""
    try:
        yield
    except GradientError as exc:
        ids = "" if start is None or exc.positions is None else f", sample ids {[start + p for p in exc.positions]}"
        raise GradientError(f"{desc}, batch {index}{ids}: {exc}", exc.positions) from None
    except InputError as exc:
        raise InputError(f"{desc}, batch {index}: {exc}") from None


def gradient_pass(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], weights: list[str], *,
                  desc: str = "pass", show_progress: bool = False) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """``(batch index, {weight: full per-sample gradients [B, *shape]})`` for the Exact codec.

    Each batch runs once with batched factor capture, the full per-sample gradients are formed from the
    factors, and their sum is checked against the batch's own autograd gradient of every weight. Where
    the capture cannot attribute a module to samples (batch-shared or routed inputs), or the sum differs
    (the loss reaches a weight other than through its module's output: a penalty on the weight, a tied
    use), the batch is redone by per-sample autograd, each sample alone. Either way every sample's
    gradient is exact (tests compare it with the autograd oracle)."""
    modules = list(dict.fromkeys(module_of(w) for w in weights))
    named = dict(model.named_parameters())
    start: int | None = 0
    for index, batch in enumerate(progress(batches, desc=desc, enabled=show_progress, total=sized(batches))):
        with naming_samples(desc, index, start):
            grads = _from_factors(model, loss_fn, batch, modules, weights, named)
            if grads is None:
                grads = next(per_sample_gradients(model, loss_fn, [batch], weights, sliced=True))
        yield index, grads
        size = next(iter(grads.values())).shape[0] if grads else None
        start = None if start is None or size is None else start + size


def _from_factors(model, loss_fn, batch, modules, weights, named) -> dict[str, torch.Tensor] | None:
    """Per-sample gradients from one batched capture, or None where they would not be exact."""
    try:
        with FactorCapture(model, modules) as cap:
            captured = cap.run(loss_fn, batch, check=[named[w] for w in weights])
    except CaptureUnsupported as exc:
        logger.info("per-sample autograd for this batch: %s", exc)
        return None
    grads = {w: captured.grad(module_of(w)) for w in weights}
    for w, whole in zip(weights, captured.batch_grads):
        total = grads[w].sum(0)
        # rounding only: float32 sums of the factors' products against autograd's gradient in the weight's dtype
        rtol = 1e-4 if whole is None else max(1e-4, 16 * torch.finfo(whole.dtype).eps)
        whole = torch.zeros_like(total) if whole is None else whole.to(total)
        if not (bool(torch.isfinite(whole).all()) and bool(torch.isfinite(total).all())):
            return None  # per-sample autograd names the sample and the weight
        if float((total - whole).norm()) > rtol * float(whole.norm()) + 1e-30:
            logger.info("per-sample autograd for this batch: %s's gradient reaches beyond its module's output", w)
            return None
    return grads


def sized(batches: Iterable[Any]) -> int | None:
    """The number of batches when the iterable knows it (a list, a DataLoader), for progress totals."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


class PassBuffers:
    """A pass's per-sample gradient buffers (:meth:`BatchFactors.grad <sketchfisher.capture.BatchFactors.grad>`'s
    ``into``) for the batch size at hand, one set per slot (a module's position in its layer,
    :mod:`sketchfisher.collect.layers`), each keyed by shape: every layer's gradient of that position is written
    into the same place. A batch of another size (the last) lets the others go."""

    def __init__(self) -> None:
        self.size: Optional[int] = None
        self.buffers: dict = {}

    def slot(self, batch_size: int, slot: int) -> dict:
        if batch_size != self.size:
            self.size, self.buffers = batch_size, {}
        return self.buffers.setdefault(slot, {})


def fold_factors(stats: FisherStats, captured: BatchFactors, weights: list[str], low: bool = False,
                 into: Optional[dict] = None, replays: Optional[Replays] = None) -> None:
    """Fold a batch into ``stats``, one module's per-sample gradients at a time (bounded memory). ``low``: a bf16
    model's formed in bf16 on a GPU (:meth:`BatchFactors.grad <sketchfisher.capture.BatchFactors.grad>`), for
    sketch collections, whose side vectors read the same numbers (:func:`block_gradients`). ``into`` and
    ``replays``: the pass's gradient buffers and recorded launches (:meth:`BatchFactors.grad`,
    :mod:`sketchfisher.kernels.graphs`)."""
    with fp32_reductions():  # (bf16 products: set once for the batch's modules)
        for weight in weights:
            stats.update({weight: captured.grad(module_of(weight), low=low, into=into)}, replays=replays)


def block_gradients(captured: BatchFactors, module: str, blocks: list) -> torch.Tensor:
    """``[B, H_b, size]``: per-sample gradients of one (layer, block)'s head blocks ``blocks`` of ``module``, the
    numbers a sketch collection's statistics folded (:func:`fold_factors` with ``low=True``): bf16-rounded for a bf16
    model on a GPU, so that a side vector and its task's statistics agree entry by entry (a leave-one-out
    normaliser subtracts a sample's own g² from its task's Fisher); else each block formed from the factors alone."""
    if captured.rounds(module):
        whole = captured.grad(module, low=True)
        return torch.stack([hb.flat(whole) for hb in blocks], 1).float()
    return torch.stack([hb.grad_from_factors(captured.A[module], captured.D[module]).flatten(-2) for hb in blocks], 1)
