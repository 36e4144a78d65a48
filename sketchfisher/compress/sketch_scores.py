"""Sketched Stage 6 scores of one (layer, block), on plain tensors.

Pass 1 gives exact per-task statistics; :func:`prepare_block` turns them into the per-entry
quantities pass 2 needs (:class:`BlockPrep`): the denominator, the balancing weights and the task
centres. :func:`side_vector` forms a batch's balanced i-side (task A) or j-side (task B) vectors;
:class:`~sketchfisher.compress.sketch_block.SketchBlock` scores sketched sides against each other with standard
errors. The variant
(i-side and j-side transforms) comes from :attr:`ScoreConfig.spec`; nothing here is per variant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..metric import ScoreConfig, i_side, shift
from .onebyte import Coded, OneByte, narrower, nbytes, values
from .sketch import Sketch

Side = str  # "a": task A's i-side vectors, "b": task B's j-side vectors


@dataclass
class BlockPrep:
    """What pass 2 needs of one (layer, block), all ``[H_b, S]`` except ``e [H_b]``: the side vectors are
    ``x'_i = f_i(g_i)·w_a`` and ``y'_j = f_j(g_j)·w_b`` (so ``x'·y' = f_i f_j / (Î + ε + λ)``), centred by
    ``x̄'`` and ``ȳ'``. Without variance reduction ``w_b``, ``x̄'`` and ``ȳ'`` are None (1, 0, 0).
    Leave-one-out keeps ``(Î_A, ε + λ, balance)`` to form each sample's own denominator. ``w_b``, the centres and
    the conflict weights may be kept in one byte (:class:`~sketchfisher.compress.onebyte.OneByte`); the accessors
    return them as kept, :func:`~sketchfisher.compress.onebyte.values` reads them."""

    w_a: Optional[torch.Tensor]       # balance / (Î + ε + λ) (None during task B's single pass)
    w_b: Optional[Coded]              # 1 / balance
    x_bar: Optional[Coded]            # balanced i-side centre
    y_bar: Optional[Coded]            # balanced j-side centre
    e: torch.Tensor                   # ⟨x̄', ȳ'⟩ (fp64)
    loo: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None  # (Î_A, ε + λ [H_b, 1], balance)
    u_a: Optional[Coded] = None  # [1, H_b, S]: ḡ_B·W; task A's conflict scalars are g_i · u_a
    u_b: Optional[Coded] = None  # [2, H_b, S]: ḡ_A·W and task A's half mean ·W (B's scalars g_j · u_b)
    moments: Optional[dict] = None  # fp64 [H_b]: "ab" = ḡ_A·W·ḡ_B (T), "aa" = ḡ_A·W·ḡ_A, "bb" = ḡ_B·W·ḡ_B
    sketched_centres: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # R c, ‖c‖² cache

    def u(self, side: Side) -> Optional[Coded]:
        """The other task's mean gradient over the denominator: a sample's conflict scalar is ``g · u``."""
        return self.u_a if side == "a" else self.u_b

    def inverse_denominator(self) -> torch.Tensor:
        """``1 / (Î + ε + λ)`` from the balance weights (``w_a · w_b``), in ``w_a``'s dtype."""
        return self.w_a if self.w_b is None else self.w_a * values(self.w_b, self.w_a.dtype)

    def centre(self, side: Side) -> Optional[Coded]:
        return self.x_bar if side == "a" else self.y_bar

    def other(self, side: Side) -> Optional[Coded]:
        return self.y_bar if side == "a" else self.x_bar

    def weight(self, side: Side) -> Optional[Coded]:
        """Per-entry factor of the transformed gradient (None: 1)."""
        return self.w_a if side == "a" else self.w_b

    @property
    def device(self) -> torch.device:
        return (self.w_a if self.w_a is not None else self.w_b).device

    def to(self, device: torch.device) -> "BlockPrep":
        """The same preparation on ``device`` (the statistics may live elsewhere than a layer's gradients)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return BlockPrep(move(self.w_a), move(self.w_b), move(self.x_bar), move(self.y_bar), self.e,
                         None if self.loo is None else tuple(move(t) for t in self.loo), move(self.u_a),
                         move(self.u_b), self.moments)

    def nbytes(self) -> int:
        ts = [self.w_a, self.w_b, self.x_bar, self.y_bar, *(self.loo or ()), self.u_a, self.u_b]
        return sum(nbytes(t) for t in ts)


def prepare_block(fisher: torch.Tensor, fisher_a: Optional[torch.Tensor], mean_i_a: Optional[torch.Tensor],
                  mean_j_b: Optional[torch.Tensor], abs_a: Optional[torch.Tensor], abs_b: Optional[torch.Tensor],
                  n_a: int, n_b: int, cfg: ScoreConfig, codec: Sketch, mean_g_a: Optional[torch.Tensor] = None,
                  mean_g_b: Optional[torch.Tensor] = None, half_a: Optional[torch.Tensor] = None,
                  u_dtype=None, side_dtype=None, balance: str = "fisher") -> BlockPrep:
    """Pass-2 quantities of one (layer, block) from plain ``[H_b, S]`` statistics.

    ``fisher`` is the normaliser Î (A, or A ∪ B), ``fisher_a`` task A's (leave-one-out only);
    ``mean_i_a`` the mean of the i-side transform over task A and ``mean_j_b`` of the j-side transform
    over task B (:data:`sketchfisher.metric.MEAN_OF`). ``balance``: ``"fisher"`` balances each entry by a power of
    the denominator (:func:`fisher_balance`, every variant; what task B's single pass uses, as B's statistics are
    not known before it); ``"abs"`` by the square root of the tasks' pooled mean |g| from ``abs_a``/``abs_b``
    (``abs_b=None``: task A's alone, the single pass's rule in stores of format 10 and before), the signed variant
    by the denominator. ``mean_j_b=None``
    leaves the j-side uncentred (``ȳ' = None``, ``e = 0``): a single pass over task B centres its
    sketches afterwards. Without variance reduction only the denominator is used. ``mean_g_a``/``mean_g_b``
    (the tasks' mean gradients, where kept) give the conflict weights ``u_b = ḡ_A/(Î+ε+λ)`` and
    ``u_a = ḡ_B/(Î+ε+λ)`` (:mod:`sketchfisher.interference.conflicts`), with ``half_a`` (task A's mean over
    half its samples) beside ``u_b``; they are kept in ``u_dtype`` (a torch dtype, or ``"fp8"`` for one byte with a
    scale per head block, :mod:`~sketchfisher.compress.onebyte`; default ``cfg.dtype``). The conflict test's moments
    (:func:`conflict_moments`) come from the exact means, whatever the weights' rounding. Built in ``cfg.dtype``.

    ``side_dtype`` (e.g. bf16 or ``"fp8"``; None: ``cfg.dtype``) keeps the balance ``w_b`` and both centres in fewer
    bytes: any positive balance and any centre leave the scores exact as long as every use reads the same rounded
    values, and ``w_a`` is then ``1 / ((Î + ε + λ) · w_b)`` (:func:`a_weight`), so that the product of the two
    weights is the denominator to ``cfg.dtype``'s precision whatever ``w_b``'s rounding. The values rounded to
    ``side_dtype`` are computed in fp64 first, so that the CPU and a GPU round them alike (a store's reader forms
    its centre products from them again, on either device).
    """
    dt = cfg.dtype
    if side_dtype is not None and side_dtype != dt:
        fisher, fisher_a, mean_i_a, mean_j_b, abs_a, abs_b = (None if t is None else t.double() for t in
                                                             (fisher, fisher_a, mean_i_a, mean_j_b, abs_a, abs_b))
    lam = shift(fisher, cfg)
    denom = fisher + lam
    zeros = torch.zeros(fisher.shape[0], dtype=torch.float64, device=fisher.device)
    # the conflict weights (A's with its half mean beside it), unrounded for the moments, then kept narrower
    over_a = None if mean_g_a is None else over_denominator([m for m in (mean_g_a, half_a) if m is not None], denom)
    over_b = None if mean_g_b is None else over_denominator([mean_g_b], denom)
    moments = conflict_moments({"a": mean_g_a, "b": mean_g_b},
                               {"a": None if over_a is None else over_a[0], "b": None if over_b is None else over_b[0]})
    u = {"a": None if over_b is None else narrower(over_b, u_dtype or dt),
         "b": None if over_a is None else narrower(over_a, u_dtype or dt)}
    del over_a, over_b
    if not codec.variance_reduction:
        balance = torch.ones_like(fisher)
        return BlockPrep((balance / denom).to(dt), None, None, None, zeros, _loo(fisher_a, lam, balance, cfg),
                         u["a"], u["b"], moments)
    if balance not in ("fisher", "abs"):
        raise ValueError(f"balance must be 'fisher' or 'abs', got {balance!r}")
    balance = (fisher_balance(denom, cfg) if balance == "fisher" or balances_by_fisher(cfg)
               else abs_balance(abs_a, abs_b, n_a, n_b))
    if side_dtype is None or side_dtype == dt:
        w_a, w_b = (balance / denom).to(dt), balance.reciprocal().to(dt)
        x_bar = (mean_i_a / denom).mul_(balance).to(dt)
    else:  # the balance and the centres rounded; w_a from the rounded balance (the denominator stays exact)
        w_b = narrower(balance.reciprocal(), side_dtype, positive=True)
        balance = values(w_b, denom.dtype).reciprocal()
        w_a = a_weight(denom, w_b, dt)
        x_bar = narrower((mean_i_a / denom).mul_(balance), side_dtype)
    loo = _loo(fisher_a, lam, balance, cfg)
    del balance, denom
    prep = BlockPrep(w_a, w_b, x_bar, None, zeros, loo, u["a"], u["b"], moments)
    return prep if mean_j_b is None else with_j_centre(prep, mean_j_b)


def a_weight(denom: torch.Tensor, w_b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Task A's side weight ``w_a = 1 / ((Î + ε + λ) · w_b)`` for a balance ``w_b`` kept in fewer bytes: the product
    ``w_a · w_b`` is the denominator to ``dtype``'s precision. Computed the same way when the preparation is
    built and when ``w_a`` is rebuilt after task B's single pass (which does not need it)."""
    return (denom * values(w_b, denom.dtype)).reciprocal().to(dtype)


def rebuild_a_weight(prep: BlockPrep, fisher: torch.Tensor, cfg: ScoreConfig) -> BlockPrep:
    """``prep`` with ``w_a`` again (:func:`a_weight`), from task A's Fisher (normaliser ``"a"``) and ``w_b``, in the
    precision :func:`prepare_block` used."""
    fisher = fisher.to(prep.w_b.device)
    if narrowed(prep.w_b, cfg.dtype):
        fisher = fisher.double()
    return replace(prep, w_a=a_weight(fisher + shift(fisher, cfg), prep.w_b, cfg.dtype))


def balances_by_fisher(cfg: ScoreConfig) -> bool:
    """Whether the ``"abs"`` rule (stores of format 10 and before) balanced a variant by the denominator rather
    than by √mean|g|: ``signed``, whose two sides are g/(Î+ε+λ) and g."""
    return cfg.spec.i_side == "identity" and cfg.spec.j_side == "identity"


MAGNITUDE_POWER = {"identity": 0.5, "abs": 0.5, "square": 1.0}
"""An entry's typical |f(g)| as a power of its Fisher E g² (|g| ~ Î^½, g² ~ Î), per side transform."""


def balance_exponent(cfg: ScoreConfig) -> float:
    """The power of the denominator that balances the two sides entry by entry: with ``x' = f_i(g)·b/(Î+ε+λ)`` and
    ``y' = f_j(g)/b``, ``b = (Î+ε+λ)^((1 + p_j − p_i)/2)`` makes both about ``(Î+ε+λ)^((p_i + p_j − 1)/2)``, which
    minimises the sketched inner product's variance ‖x′‖²‖y′‖² for Gaussian-like entries: ¼ for ``paper``
    (g², |g|), ½ for ``signed`` and ``symmetric``."""
    return (1.0 + MAGNITUDE_POWER[cfg.spec.j_side] - MAGNITUDE_POWER[cfg.spec.i_side]) / 2


def fisher_balance(denom: torch.Tensor, cfg: ScoreConfig) -> torch.Tensor:
    """The balance ``(Î+ε+λ)^``:func:`balance_exponent` (square roots where the power is ½ or ¼, so that every
    device rounds alike). It needs no statistic beyond the normaliser: pass 1 keeps no Σ|g| to balance by."""
    power = balance_exponent(cfg)
    root = denom.sqrt()
    return root if power == 0.5 else root.sqrt() if power == 0.25 else denom.pow(power)


def abs_balance(abs_a: torch.Tensor, abs_b: Optional[torch.Tensor], n_a: int, n_b: int) -> torch.Tensor:
    """√ of the mean |g| (over both tasks, or task A's alone when ``abs_b`` is None); 1 where it is 0."""
    m = abs_a if abs_b is None else (abs_a * n_a + abs_b * n_b) / (n_a + n_b)
    return torch.where(m > 0, m.sqrt(), 1.0)


def over_denominator(means: list[torch.Tensor], denom: torch.Tensor) -> torch.Tensor:
    """``[len(means), H_b, S]``: each mean ``[H_b, S]`` over the denominator, in the means' dtype, each quotient
    formed in the wider of the two dtypes and rounded once (no wide intermediate tensor)."""
    dtype = means[0].dtype
    out = torch.empty((len(means), *denom.shape), dtype=dtype, device=denom.device)
    for o, m in zip(out, means):
        torch.div(m.to(denom.device), denom, out=o)
    return out


DOT_CHUNK = 4096
"""Entries summed in the products' own precision before the partial sums are added in fp64 (:func:`dot64`)."""


def dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Σ_S x·y`` per head block, fp64 ``[H_b]``, of ``[H_b, S]`` tensors: each product in the inputs' precision
    (fp32 statistics: a relative rounding of 2⁻²⁴ per entry), summed in chunks of at most :data:`DOT_CHUNK` entries,
    and the chunks' sums added in fp64, so that no fp64 copy of a model-sized tensor is made."""
    p = x * y.to(x.device)
    h, s = p.shape
    chunk = math.gcd(s, DOT_CHUNK)
    return p.reshape(h, s // chunk, chunk).sum(-1).sum(-1, dtype=torch.float64)


def conflict_moments(means: dict[str, Optional[torch.Tensor]], weighted: dict[str, Optional[torch.Tensor]],
                     known: Optional[dict] = None) -> Optional[dict]:
    """The Fisher-weighted inner products of the task means a block's conflict test needs, fp64 ``[H_b]``
    (:func:`dot64`), from the exact means ``means = {"a": ḡ_A, "b": ḡ_B}`` ``[H_b, S]`` and the same means over the
    denominator before any rounding, ``weighted = {"a": ḡ_A·W, "b": ḡ_B·W}`` with ``W = 1 / (Î + ε + λ)`` (any may
    be None or absent): ``aa = ḡ_A·W·ḡ_A``, ``bb = ḡ_B·W·ḡ_B`` and ``ab = T = ḡ_A·W·ḡ_B`` (from ḡ_A and ḡ_B·W) as far
    as they are known; added to ``known``. The conflict weights may be rounded (to one byte); these products are not.
    A product already in ``known`` is kept."""
    out = dict(known or {})
    for name, (x, y) in {"aa": ("a", "a"), "bb": ("b", "b"), "ab": ("a", "b")}.items():
        if name not in out and means.get(x) is not None and weighted.get(y) is not None:
            out[name] = dot64(means[x], weighted[y])
    return out or None


def _loo(fisher_a: Optional[torch.Tensor], lam: torch.Tensor, balance: torch.Tensor, cfg: ScoreConfig):
    """What leave-one-out keeps to form each sample's own denominator (None for other normalisers)."""
    return (fisher_a.to(cfg.dtype), lam.to(cfg.dtype), balance.to(cfg.dtype)) if cfg.normalizer == "loo" else None


def with_j_centre(prep: BlockPrep, mean_j_b: torch.Tensor) -> BlockPrep:
    """``prep`` with task B's centre ``ȳ' = mean_j_b · w_b`` (the j-side mean, balanced as B's side vectors)
    and ``e = ⟨x̄', ȳ'⟩`` (summed in fp64). One formula for every pass order: the single pass over task B
    adds its centre after the pass, from ``w_b``, as a store written that way is prepared when read."""
    w_b = values(prep.w_b, torch.float64) if narrowed(prep.w_b, torch.float32) else prep.w_b  # (narrow centres: rounded alike anywhere)
    y_bar = mean_j_b.to(prep.w_b.device) * w_b
    y_bar = narrower(y_bar, "fp8") if isinstance(prep.w_b, OneByte) else y_bar.to(prep.w_b.dtype)
    return replace(prep, y_bar=y_bar, e=(values(prep.x_bar, torch.float64) * values(y_bar, torch.float64)).sum(-1))


def narrowed(t: Coded, dtype: torch.dtype) -> bool:
    """Whether ``t`` is kept in fewer bytes than ``dtype`` (one byte, or a narrower float)."""
    return isinstance(t, OneByte) or t.element_size() < torch.empty((), dtype=dtype).element_size()


def residual_centre(prep: BlockPrep, codec: Sketch, layer: int, block: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Task B's mean residual after its single pass with scaled centring: ``(R m [H_b, k], ‖m‖² [H_b])`` (fp64 norm).

    During the pass each ``y'_j`` lost its own multiple of ``x̄'``, ``ỹ_j = y'_j − β_j x̄'``; the residuals' mean is
    ``m = ȳ' − b x̄'`` with ``b = ⟨x̄', ȳ'⟩ / ‖x̄'‖²`` (so ``m ⊥ x̄'``), from B's own mean ``ȳ'`` in ``prep``. The scores
    sketch ``ỹ_j − m`` (``R ỹ_j − R m`` by linearity), the part of B that neither its own mean nor x̄' explains, as
    two passes per task would centre it; ``⟨x̃_i, m⟩`` is exact from ``⟨x'_i, ȳ'⟩``, ``e`` and α_i
    (:class:`SketchBlock`). ``m`` is formed from the preparation's rounded centres, so every reader of a collection
    forms the same one."""
    from ..layout import block_index

    x, y = values(prep.x_bar, torch.float64), values(prep.y_bar, torch.float64)
    xx = x.square().sum(-1)
    b = torch.where(xx > 0, prep.e.to(xx.device) / xx.clamp_min(torch.finfo(xx.dtype).tiny), torch.zeros_like(xx))
    m = y - b[:, None] * x
    rm = codec.apply_heads(layer, block_index(block), m[None].float())[0]
    return rm, m.square().sum(-1)


def side_vector(g: torch.Tensor, prep: BlockPrep, side: Side, count: int, cfg: ScoreConfig) -> torch.Tensor:
    """Balanced i-side (``"a"``) or j-side (``"b"``) vectors ``[B, H_b, S]`` from block gradients.

    ``count`` is task A's sample count (leave-one-out needs it)."""
    g = g.to(cfg.dtype)  # fp32 by default: the CUDA sjlt kernels take fp32/bf16/fp16, not fp64
    if side == "b":
        v = cfg.spec.j_side_of(g)
        return v if prep.w_b is None else v * values(prep.w_b, v.dtype)
    if prep.loo is not None:
        fisher_a, lam, balance = prep.loo
        return i_side(g, fisher_a, lam, count, cfg, weight=balance)
    return cfg.spec.i_numerator(g) * prep.w_a


def conflict_scalars(g: torch.Tensor, prep: BlockPrep, side: Side, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Each sample's conflict scalars ``[B, H_b, m]`` from its block gradients ``g [B, H_b, S]``: ``g · u`` for each
    of the ``m`` weight vectors (the other task's mean gradient over the denominator; for task B also task A's
    half mean); None when the collection keeps no task means."""
    u = prep.u(side)
    return None if u is None else torch.einsum("bhs,mhs->bhm", g.to(dtype), values(u.to(g.device), dtype))


def sketch_sides(v: torch.Tensor, prep: BlockPrep, side: Side, codec: Sketch, layer: int, block: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre side vectors ``v [B, H_b, S]`` by the side's centre and sketch them: ``(sketches [B, H_b, k],
    ‖ṽ‖² [B, H_b], cross [B, H_b], own [B, H_b])`` where cross is ``⟨v, other side's centre⟩`` and own is
    ``⟨ṽ, this side's centre⟩`` (what :func:`scale_centring` needs). The fused CUDA kernel returns the same."""
    other, centre = values(prep.other(side), v.dtype), values(prep.centre(side), v.dtype)
    zeros = torch.zeros(v.shape[:2], dtype=v.dtype, device=v.device)
    cross = zeros if other is None else (v * other).sum(-1)
    own = zeros
    if centre is not None:
        v = v - centre
        own = (v * centre).sum(-1)
    sk = codec.apply_heads(layer, block, v)
    return sk, v.square().sum(-1), cross, own


def scale_centring(sk: torch.Tensor, norm2: torch.Tensor, own: torch.Tensor, prep: BlockPrep, side: Side,
                   codec: Sketch, layer: int, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled centring of mean-centred sketches: ``(R ṽ, ‖ṽ‖², γ)`` with ``ṽ = v − (1 + γ) c`` and
    ``γ = ⟨v − c, c⟩ / ‖c‖²``, the best multiple of the side's centre ``c`` to take away from each sample
    (the residual is never longer than ``v − c``). By linearity ``R ṽ = R(v − c) − γ R c``, and
    ``‖ṽ‖² = ‖v − c‖² − γ ⟨v − c, c⟩``. Scores take ``α = 1 + γ`` back exactly (:class:`SketchBlock`).
    γ is 0 where the codec centres by the mean alone, or the side has no centre in its pass."""
    sketched = sketched_centre(prep, side, codec, layer, block, sk.device, sk.dtype, norm2.dtype)
    if sketched is None:
        return sk, norm2, torch.zeros_like(norm2)
    rc, c2 = sketched
    gamma = torch.where(c2 > 0, own / c2.clamp_min(torch.finfo(c2.dtype).tiny), torch.zeros_like(own))
    size = prep.centre(side).shape[-1]
    norm2 = (norm2 - gamma * own).clamp_min(0) + rounding_allowance(norm2, gamma, c2, size, sk.dtype)
    return sk - gamma[..., None].to(sk.dtype) * rc, norm2, gamma


def sketched_centre(prep: BlockPrep, side: Side, codec: Sketch, layer: int, block: int, device: torch.device,
                    dtype: torch.dtype, norm_dtype: torch.dtype) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(R c [H_b, k], ‖c‖² [H_b])`` of the side's centre where the codec centres by scaled multiples of it
    (:func:`scale_centring`), else None; formed once per preparation and kept in it (a one-byte centre read once)."""
    centre = prep.centre(side)
    if centre is None or getattr(codec, "centring", "mean") != "scaled":
        return None
    key = (side, layer, block, device)
    if key not in prep.sketched_centres:
        c = values(centre.to(device))
        prep.sketched_centres[key] = (codec.apply_heads(layer, block, c[None].to(dtype))[0].contiguous(),
                                      c.double().square().sum(-1).to(norm_dtype))
    return prep.sketched_centres[key]


def rounding_allowance(norm2: torch.Tensor, gamma: torch.Tensor, c2: torch.Tensor, size: int, dtype: torch.dtype
                       ) -> torch.Tensor:
    """What the error bars add to a scaled-centred vector's ``‖ṽ‖²`` for the rounding of the centring itself:
    ``ṽ = (v − c) − γ c`` is formed, sketched and its norm taken in ``dtype``, and where a sample is nearly a
    multiple of the centre (a sample with a tiny gradient in the block: γ ≈ −1) the two parts cancel, leaving a
    rounding residue ~ eps·‖v − c‖ in the sketch while ``‖ṽ‖²`` is ~0. Without an allowance such a sample's
    pairs get a standard error √k times smaller than their error. The allowance is a sum's rounding bound,
    ``eps · √size · (‖v − c‖² + γ²‖c‖²)``: relative ~3e-5 in fp32 and ~5e-14 in fp64 of the parts, so nothing
    for a sample that does not cancel."""
    eps = torch.finfo(dtype).eps
    return eps * size ** 0.5 * (norm2 + gamma.square() * c2)
