"""Stage 1: run the model over a task and keep each sample's representation plus Fisher statistics."""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from .capture import FactorCapture, linear_modules, per_sample_gradients
from .capture.oracle import LossFn
from .compress import Exact, ExactContributions, FactorContributions, Factors, Sketch
from .errors import InputError
from .fisher import FisherStats
from .layout import Layout
from .progress import progress

logger = logging.getLogger(__name__)
CODECS = (Exact, Factors, Sketch)


def trainable_weights(model: nn.Module, layout: Layout, modules: str = "attention") -> list[str]:
    """Trainable weight names to collect: the layout's (``"attention"``) or every linear map (``"all"``)."""
    if modules == "attention":
        names = list(layout.params)
    elif modules == "all":
        names = list(dict.fromkeys([*layout.params, *(m + ".weight" for m in linear_modules(model))]))
    else:
        raise InputError(f"modules must be 'attention' or 'all', got {modules!r}")
    named = dict(model.named_parameters())
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        logger.info("not collecting %d frozen parameters (their scores are NaN): %s", len(frozen), frozen[:3])
    names = [n for n in names if named[n].requires_grad]
    if not names:
        raise InputError("every weight to collect is frozen (requires_grad=False); nothing to score")
    return names


def collect(model: nn.Module, loss_fn: LossFn, batches: Iterable[Any], layout: Layout, codec: Any, *,
            modules: str = "attention", desc: str = "collect", show_progress: bool = False,
            stats_dtype: torch.dtype = torch.float64):
    """Per-sample representation (``codec``) and :class:`FisherStats` of one task.

    For ``sf.Sketch`` this is pass 1 only (statistics; the representation is None): the sketches
    need both tasks' statistics first (:mod:`sketchfisher.sketching`). Parameters with
    ``requires_grad=False`` are not collected; their scores come out NaN. ``stats_dtype`` is the
    precision of the model-sized pass-1 statistics (fp64 by default; fp32 halves their memory, which
    matters on GPUs at 7B scale: 4 tensors of the attention size).
    """
    if not isinstance(codec, CODECS):
        raise InputError(f"codec must be one of: sf.Exact(), sf.Factors(rank=None), sf.Sketch(k, kind, seed); "
                         f"got {codec!r}")
    names = trainable_weights(model, layout, modules)
    stats = FisherStats(dtype=stats_dtype)
    if isinstance(codec, Exact):
        rep = ExactContributions()
        for grads in progress(per_sample_gradients(model, loss_fn, batches, names), desc=desc, enabled=show_progress):
            rep.append(grads)
            stats.update(grads)
    else:
        rep = FactorContributions(rank=codec.rank) if isinstance(codec, Factors) else None
        module_names = [n.rsplit(".", 1)[0] for n in names]
        with FactorCapture(model, module_names) as cap:
            for batch in progress(batches, desc=desc, enabled=show_progress):
                bf = cap.run(loss_fn, batch)
                for module, name in zip(module_names, names):  # stream: one module's gradients at a time
                    stats.update({name: bf.grad(module)})
                if rep is not None:
                    rep.append(bf.A, bf.D, bf.lengths)
    if stats.count == 0:
        raise InputError(f"{desc}: the task yielded no samples")
    return rep, stats
