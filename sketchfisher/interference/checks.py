"""Properties every Stage 6 result must have, as an API: each returns a tidy row (check, passed,
deviation, detail).

``sf.run_sanity_checks`` (:mod:`sketchfisher.pipeline`) runs all of them on a model, a loss and two
tasks; the test suite runs the same functions. Checks that need new runs take the ``analyze``
function as an argument. They use the exact path (``sf.Factors()`` by default) so that a failure
points at the layout or the metric, not at sketch noise.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..layout import BLOCKS, layout_for
from ..metric import ScoreConfig, contract, x_side, y_side

RTOL = 1e-6


def _dev(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-300)
    return float((a - b).abs().max()) / scale


def head_additivity(result: Any) -> dict:
    """Σ over distinct head blocks equals the score over the whole unsliced block (λ not slice-relative)."""
    ctx = result.context
    cfg: ScoreConfig = ctx.cfg
    if cfg.slice_relative:
        return {"check": "head_additivity", "passed": None, "deviation": float("nan"),
                "detail": "skipped: ridge_rel makes λ slice-relative, additivity does not hold by design"}
    stats = ctx.normalizer_stats()
    worst, layout = 0.0, result.layout
    for layer in range(layout.num_layers):
        for b, block in enumerate(layout.block_names):
            ga, gb = ctx.rep_a.block(layout, layer, block), ctx.rep_b.block(layout, layer, block)
            fisher = stats.fisher_block(layout, layer, block)
            if ga is None or gb is None or fisher is None:
                continue
            whole = contract(x_side(ga.flatten(1)[:, None], fisher.reshape(1, -1), stats.count, cfg),
                             y_side(gb.flatten(1)[:, None], cfg))[..., 0]
            first = [int((layout.head_index(block) == h).nonzero()[0]) for h in range(len(layout.head_blocks(layer, block)))]
            summed = result.scores[:, :, layer, first, b].sum(-1)
            worst = max(worst, _dev(summed, whole.to(summed.dtype)))
    return {"check": "head_additivity", "passed": worst <= RTOL * 10, "deviation": worst,
            "detail": "max relative deviation of Σ_heads from the unsliced score"}


def symmetry(result: Any) -> dict:
    """The symmetric variant with the same samples on both sides is a symmetric matrix."""
    s = result.scores
    dev = _dev(s, s.transpose(0, 1))
    return {"check": "symmetry", "passed": dev <= RTOL, "deviation": dev, "detail": "max |M − Mᵀ| / max |M|"}


def head_masking(analyze: Any, model: nn.Module, loss_fn: Any, task_a: Iterable[Any], task_b: Iterable[Any],
                 layer: int, heads: list[int], **kw: Any) -> dict:
    """Masking heads' attention output before the O projection gives them zero Q/O scores (and K/V
    when a whole kv group is masked)."""
    layout = kw.get("layout") or layout_for(model)
    module = model.get_submodule(layout.module_of(layer, "O"))
    dv = layout.dims.v_head_dim
    keep = torch.ones(layout.num_heads * dv)
    for h in heads:
        keep[h * dv:(h + 1) * dv] = 0
    handle = module.register_forward_pre_hook(lambda m, args: (args[0] * keep.to(args[0]),) + tuple(args[1:]))
    try:
        s = analyze(model, loss_fn, task_a, task_b, **kw).scores
    finally:
        handle.remove()
    gs = layout.dims.group_size
    blocks = [0, 3] + ([1, 2] if all(g * gs + r in heads for g in {h // gs for h in heads} for r in range(gs)) else [])
    masked = s[:, :, layer][:, :, heads][..., blocks]
    others = [h for h in range(layout.num_heads) if h not in heads]
    alive = s[:, :, layer][:, :, others]
    passed = bool((masked == 0).all()) and bool((alive.abs().sum((0, 1)) > 0).all())
    return {"check": "head_masking", "passed": passed, "deviation": float(masked.abs().max()),
            "detail": f"layer {layer}, heads {heads}: blocks {[BLOCKS[b] for b in blocks]} must score 0"}


def loss_scaling(analyze: Any, model: nn.Module, loss_fn: Any, task_a: list, task_b: list, factor: float = 3.0,
                 **kw: Any) -> list[dict]:
    """Scaling task A's loss leaves scores unchanged; scaling task B's multiplies them by the factor
    (``paper`` and ``symmetric`` use |g_j|; use a positive factor).

    C_i/(Î + ε) is scale-free only if ε scales with the loss² too, so the A-scaled run uses
    ε·factor²; otherwise a model whose Î is near ε (a converged one) shows an ε effect, not a bug.
    """
    marked_a = [("A", b) for b in task_a]
    marked_b = [("B", b) for b in task_b]

    def scaled(which: str):
        def fn(m: nn.Module, batch: Any) -> torch.Tensor:
            tag, inner = batch
            return loss_fn(m, inner) * (factor if tag == which else 1.0)
        return fn

    plain = [("-", b) for b in task_b]
    eps = kw.pop("eps", 1e-10)
    base = analyze(model, loss_fn, task_a, task_b, eps=eps, **kw).scores
    sa = analyze(model, scaled("A"), marked_a, plain, eps=eps * factor ** 2, **kw).scores
    sb = analyze(model, scaled("B"), [("-", b) for b in task_a], marked_b, eps=eps, **kw).scores
    da, db = _dev(sa, base), _dev(sb, factor * base)
    return [{"check": "loss_scale_A_invariant", "passed": da <= 1e-4, "deviation": da, "detail": f"×{factor} on A"},
            {"check": "loss_scale_B_linear", "passed": db <= 1e-4, "deviation": db, "detail": f"×{factor} on B"}]
