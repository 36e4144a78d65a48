"""The slow, obviously-correct per-sample gradient oracle.

One forward pass per batch, then one ``torch.autograd.grad`` call per sample's loss. It is the
reference every fast path is tested against, and the engine behind ``sf.Exact()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import contextlib
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..errors import GradientError, InputError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode (dropout off) and restore each one's mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def batch_size_of(batch: Any) -> int | None:
    """Samples in a batch, when its layout says so: a tensor's first axis, or that of a mapping's
    ``input_ids`` (else its first tensor) or of a sequence's first tensor; None when it cannot tell."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        first = batch.get("input_ids")
        if not isinstance(first, torch.Tensor):
            first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim), None)
        return None if first is None or not first.ndim else int(first.shape[0])
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].ndim:
        return int(batch[0].shape[0])
    return None


def check_losses(losses: Any, where: str, expected: int | None = None, finite: bool = True) -> torch.Tensor:
    """``loss_fn`` must return one finite loss per sample: a 1-D floating tensor ``[B]``, with ``B`` the
    batch's sample count ``expected`` when that is known. ``finite=False`` leaves out the check of the values
    (it waits for the device), for a caller that checks them later."""
    if not isinstance(losses, torch.Tensor):
        raise InputError(f"loss_fn must return a torch.Tensor of shape [B], got {type(losses).__name__} ({where})")
    if losses.ndim != 1 or losses.shape[0] == 0:
        raise InputError(
            f"loss_fn must return one loss per sample, shape [B] with B >= 1; got shape {tuple(losses.shape)} "
            f"({where}). Use reduction='none' and reduce over tokens only."
        )
    if expected is not None and losses.shape[0] != expected:
        raise InputError(f"loss_fn returned {losses.shape[0]} losses for a batch of {expected} samples ({where}); "
                         "it must return exactly one loss per sample")
    if not losses.is_floating_point():
        raise InputError(f"loss_fn must return a floating tensor, got dtype {losses.dtype} ({where})")
    if not losses.requires_grad:
        raise InputError(f"loss_fn's losses do not require grad ({where}); are the parameters frozen or is it under no_grad?")
    bad = (~torch.isfinite(losses.detach())).nonzero().flatten().tolist() if finite else []
    if bad:
        raise GradientError(f"loss_fn returned non-finite losses for batch positions {bad} ({where})", bad)
    return losses


def per_sample_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[Any],
    param_names: Sequence[str],
    sliced: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield, per batch, ``{param_name: Tensor[B, *param.shape]}`` of per-sample gradients in fp32.

    Gradients are of each sample's own loss ``loss_fn(model, batch)[b]``; the model runs in eval
    mode. Parameters that the loss does not reach get exact zeros. NaN/inf raises
    :class:`GradientError` naming the sample and parameter.

    By default (the test oracle) the batch runs forward once and each sample's loss backward through
    the whole batch's graph: B backward passes of the full batch. ``sliced=True`` (the Exact codec) runs
    each sample forward and backward on its own (its batch row, padding width unchanged) where the batch
    is a mapping of batch-first tensors (or one tensor): B passes of one sample, the cost of a plain
    per-sample loop.
    """
    named = dict(model.named_parameters())
    missing = [n for n in param_names if n not in named]
    if missing:
        raise InputError(f"parameters {missing[:3]} not found in {type(model).__name__}")
    params = [named[n] for n in param_names]
    frozen = [n for n, p in zip(param_names, params) if not p.requires_grad]
    if frozen:
        raise InputError(f"parameters {frozen[:3]} have requires_grad=False; unfreeze them or leave them out")
    seen = 0
    with eval_mode(model):
        for batch_no, batch in enumerate(batches):
            if sliced and sliceable(batch):
                out = _one_at_a_time(model, loss_fn, batch, param_names, params, batch_no, seen)
                seen += batch_size_of(batch)
                yield out
                continue
            losses = check_losses(loss_fn(model, batch), f"batch {batch_no}", batch_size_of(batch))
            out = {n: torch.empty((losses.shape[0], *p.shape), dtype=torch.float32, device=p.device)
                   for n, p in zip(param_names, params)}
            for b in range(losses.shape[0]):
                grads = torch.autograd.grad(losses[b], params, retain_graph=b + 1 < losses.shape[0],
                                            allow_unused=True)
                for name, g in zip(param_names, grads):
                    if g is None:
                        out[name][b].zero_()
                        continue
                    if not torch.isfinite(g).all():
                        raise GradientError(
                            f"non-finite gradient for sample {seen + b} (batch {batch_no}, position {b}) "
                            f"in {name!r}", [b]
                        )
                    out[name][b].copy_(g)
            seen += losses.shape[0]
            yield out


def sliceable(batch: Any) -> bool:
    """A batch whose samples can be cut out one by one: a tensor, or a mapping of batch-first tensors."""
    n = batch_size_of(batch)
    if n is None:
        return False
    if isinstance(batch, torch.Tensor):
        return True
    return isinstance(batch, Mapping) and all(not isinstance(v, torch.Tensor) or (v.ndim and v.shape[0] == n)
                                              for v in batch.values())


def _one_at_a_time(model: nn.Module, loss_fn: LossFn, batch: Any, names: Sequence[str], params: list,
                   batch_no: int, seen: int) -> dict[str, torch.Tensor]:
    n = batch_size_of(batch)
    out = {name: torch.empty((n, *p.shape), dtype=torch.float32, device=p.device) for name, p in zip(names, params)}
    for b in range(n):
        one = batch[b:b + 1] if isinstance(batch, torch.Tensor) else \
            {k: v[b:b + 1] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = check_losses(loss_fn(model, one), f"batch {batch_no}, sample {seen + b} alone", 1)
        grads = torch.autograd.grad(loss[0], params, allow_unused=True)
        for name, g in zip(names, grads):
            if g is None:
                out[name][b].zero_()
            else:
                out[name][b].copy_(g)
    for name, t in out.items():  # one check per parameter and batch
        bad = (~torch.isfinite(t)).flatten(1).any(1)
        if bool(bad.any()):
            b = int(bad.nonzero()[0])
            raise GradientError(f"non-finite gradient for sample {seen + b} (batch {batch_no}, position {b}) "
                                f"in {name!r}", bad.nonzero().flatten().tolist())
    return out

