"""Comparing an approximate result with the exact one: the numbers the accuracy notebooks report."""

from __future__ import annotations

import torch
from scipy.stats import spearmanr

from .errors import InputError


def compare(exact: torch.Tensor, approx: torch.Tensor, stderr: torch.Tensor | None = None, top: int = 50) -> dict:
    """Spearman over all finite scores, median relative error, top-``top`` recall and, when ``stderr``
    is given, the fraction of exact scores inside the nominal 95% intervals (±1.96·stderr)."""
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
        out["coverage95"] = float(((a - e).abs() <= 1.959964 * se).double().mean())
    return out
