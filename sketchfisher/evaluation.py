"""Comparing an approximate result with the exact one, and testing what the conflict map predicts: the numbers
the accuracy and conflict notebooks report."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from .errors import InputError


def compare(exact: torch.Tensor, approx: torch.Tensor, stderr: torch.Tensor | None = None, top: int = 50) -> dict:
    """Spearman over all finite scores, median relative error, top-``top`` recall and, when ``stderr``
    is given, the fraction of exact scores inside the nominal 95% intervals (±1.96·stderr), over all scores
    (``coverage95``) and over the largest 1% of exact scores (``coverage95_top1pct``)."""
    if exact.shape != approx.shape:
        raise InputError(f"shapes differ: exact {tuple(exact.shape)} vs approx {tuple(approx.shape)}")
    e, a = exact.flatten().double(), approx.flatten().double()
    ok = torch.isfinite(e) & torch.isfinite(a)
    e, a = e[ok], a[ok]
    if e.numel() < 2:
        raise InputError("need at least two finite scores to compare")
    top = min(top, e.numel())
    rel = (a - e).abs() / e.abs().clamp_min(1e-30)
    out = {"spearman": float(spearmanr(e.numpy(), a.numpy()).statistic), "median_rel_err": float(rel.median()),
           f"top{top}_recall": len(set(torch.topk(e, top).indices.tolist()) & set(torch.topk(a, top).indices.tolist()))
           / top}
    if stderr is not None:
        se = stderr.flatten().double()[ok]
        inside = (a - e).abs() <= 1.959964 * se
        out["coverage95"] = float(inside.double().mean())
        out["coverage95_top1pct"] = float(inside[torch.topk(e, max(1, e.numel() // 100)).indices].double().mean())
    return out


def block_step_effects(res: Any, model: torch.nn.Module, loss_fn: Callable, task_b: Iterable[Any],
                       scales: Iterable[float] = (1e-4,), blocks: Optional[int] = None) -> pd.DataFrame:
    """What the conflict map predicts, tested one head block at a time.

    For every distinct head block of ``res.head_conflicts()`` (``res`` from an exact codec, which keeps every
    per-sample gradient), a diagonally Fisher-preconditioned step on task A restricted to that block,
    ``θ_S ← θ_S − η (Î + ε)⁻¹ ḡ_A``, with ``η`` chosen so that the block's largest weight change is ``scale``;
    then task B's mean loss under ``loss_fn`` over ``task_b`` is measured and the step undone. To first order
    the change is ``−η T`` (``T`` the table's column). One row per block and scale: ``layer, head, block, T,
    scale, eta, predicted, measured``. ``blocks`` keeps only the first N blocks."""
    if not hasattr(res.context.rep_a, "full"):
        raise InputError("block_step_effects needs every per-sample gradient of task A: analyze with sf.Exact() or "
                         "sf.Factors()")
    table = res.head_conflicts()
    table = table.head(blocks) if blocks else table
    ctx, layout, task_b = res.context, res.layout, list(task_b)

    def loss_b() -> float:
        with torch.no_grad():
            return float(torch.cat([loss_fn(model, b).detach() for b in task_b]).double().mean())

    base, rows = loss_b(), []
    for row in table.to_dict("records"):
        hb = layout.head_block(row["layer"], row["block"], row["head"])
        param = model.get_parameter(hb.param_name)
        mean = ctx.rep_a.full(hb.param_name).double().mean(0)
        direction = mean / (ctx.stats_a.fisher(hb.param_name).double() + res.cfg.eps)
        mask = torch.zeros_like(param, dtype=torch.bool)
        hb.select(mask).fill_(True)
        step = torch.where(mask.to(direction.device), direction, torch.zeros_like(direction)).to(param.device)
        for scale in scales:
            eta = float(scale) / max(float(step.abs().max()), 1e-300)
            saved = param.detach().clone()
            with torch.no_grad():
                param -= (eta * step).to(param.dtype)
            measured = loss_b() - base
            with torch.no_grad():
                param.copy_(saved)
            rows.append({"layer": row["layer"], "head": row["head"], "block": row["block"], "T": row["T"],
                         "scale": float(scale), "eta": eta, "predicted": -eta * row["T"], "measured": measured})
    return pd.DataFrame(rows)


def step_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Per scale of :func:`block_step_effects`: the Spearman correlation of measured and predicted changes
    over blocks, the slope of measured on predicted through the origin (1 is exact first order) and the
    fraction of blocks whose sign is predicted."""
    rows = []
    for scale, g in effects.groupby("scale"):
        m, q = g["measured"].to_numpy(), g["predicted"].to_numpy()
        rows.append({"scale": scale, "blocks": len(g), "spearman": float(spearmanr(m, q).statistic),
                     "slope": float((m * q).sum() / (q * q).sum()),
                     "sign_agreement": float((np.sign(m) == np.sign(q)).mean())})
    return pd.DataFrame(rows)


def finetune_frozen(model: torch.nn.Module, loss_fn: Callable, batches: list, frozen: Iterable[Any], steps: int,
                    lr: float, seed: int) -> None:
    """``steps`` Adam steps on ``batches`` (cycled in an order drawn from ``seed``), the entries of the head blocks
    in ``frozen`` (:class:`~sketchfisher.layout.HeadBlock` s) held fixed: their gradient is zeroed before every
    step, so Adam never moves them. The model is left in eval mode."""
    masks: dict[str, torch.Tensor] = {}
    for hb in frozen:
        param = model.get_parameter(hb.param_name)
        hb.select(masks.setdefault(hb.param_name, torch.zeros_like(param, dtype=torch.bool))).fill_(True)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    order = np.random.default_rng(seed).permutation(len(batches))
    torch.manual_seed(seed)
    model.train()
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batches[order[step % len(order)]]).mean().backward()
        for name, mask in masks.items():
            grad = model.get_parameter(name).grad
            if grad is not None:
                grad.masked_fill_(mask, 0.0)
        opt.step()
    model.eval()


def contradicting_targets(batches: list, seed: int = 0) -> list:
    """A task that conflicts with ``batches`` (masked-token batches with ``labels``) by construction: the same
    inputs, every masked position's target replaced by the target of another masked position of the same batch
    (a fixed random derangement, so no target keeps its own word unless the two words are equal). Training on
    the original raises this task's loss."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        labels = batch["labels"].clone()
        where = labels != -100
        values = labels[where]
        if values.numel() < 2:
            raise InputError("each batch needs at least two masked positions to swap targets between")
        shift = int(torch.randint(1, values.numel(), (1,), generator=g))
        order = torch.randperm(values.numel(), generator=g)
        moved = values.clone()
        moved[order] = values[order.roll(shift)]
        labels[where] = moved
        out.append({**batch, "labels": labels})
    return out
