"""The codec protocol: what a representation of per-sample contributions needs from a collection and
what it costs. Every consumer (``sf.analyze``, the pass plan, the planner, stores, the CLI) reads a codec
through these methods only; nothing outside this package asks which codec it holds.

A codec is one of two families:

* **one-pass** (:class:`Codec`, ``two_pass = False``; ``sf.Exact``, ``sf.Factors``): the representation is
  written while the statistics are folded; ``representation()`` gives the per-task container.
* **side codecs** (:class:`SideCodec`, ``two_pass = True``; ``sf.Sketch``): pass 2 turns every sample's
  head-block gradients into the variant's balanced, centred i-side (task A) or j-side (task B) vectors
  once the statistics are known, and the codec maps each ``[n, H_b, S]`` batch to what it keeps
  (:meth:`SideCodec.apply_heads`), stores it (:meth:`SideCodec.encode` / :meth:`SideCodec.decode`) and
  scores two sides against each other (:meth:`SideCodec.block_scores`). Only side codecs go into stores.

A new codec subclasses one of them as a frozen dataclass and is registered with
:func:`sketchfisher.compress.codec.register_codec` (``sf.register_codec``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Literal, Optional, Protocol

import torch

if TYPE_CHECKING:  # annotations only: the layout and the metric are plain data here
    from ..layout import Layout
    from ..metric import BlockScores, ScoreConfig


class Representation(Protocol):
    """Per-task per-sample contributions of a one-pass codec."""

    def add(self, captured: Any) -> None:
        """Add one captured batch (a ``{name: [B, *shape]}`` dict, or a ``BatchFactors``)."""

    def block(self, layout: "Layout", layer: int, block: str) -> Optional[torch.Tensor]:
        """Exact per-sample gradients of the distinct head blocks ``[n, H_b, S]``; None when absent."""

    def nbytes_per_sample(self) -> float:
        """Mean stored bytes per sample."""


class Codec:
    """Base class of every codec. Subclasses are frozen dataclasses whose fields are the user's settings.

    Class attributes: ``name`` (the registry key, serialised into stores and results), ``source`` (what a
    pass must capture per batch: ``"gradients"``, full per-sample gradients, or ``"factors"``, token
    factors from batched hooks), ``two_pass`` (see the module docstring) and ``summary`` (one line for
    help texts)."""

    name: ClassVar[str] = ""
    source: ClassVar[Literal["gradients", "factors"]] = "factors"
    two_pass: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    variance_reduction = False  # side codecs: balance and centre the side vectors

    # -- identity -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The serialised settings: ``{"codec": name, field: value, ...}`` (JSON)."""
        return {"codec": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    # -- what it needs --------------------------------------------------------------------------
    def statistics(self, cfg: "ScoreConfig", passes: float) -> dict[str, set[str]]:
        """Pass-1 statistics (:data:`sketchfisher.fisher.QUANTITIES`) per task (``"a"``, ``"b"``) beyond the
        normaliser's, for the pass order ``passes``."""
        return {"a": set(), "b": set()}

    def pass_orders(self, cfg: "ScoreConfig") -> tuple[float, ...]:
        """The pass orders this codec can run with ``cfg``, the default first (one-pass codecs: one pass per
        task, planned as ``2`` so that every codec has one order name)."""
        return (2,)

    def check_layout(self, layout: "Layout") -> None:
        """Refuse a layout the codec cannot represent (raise :class:`~sketchfisher.InputError`)."""

    # -- what it costs --------------------------------------------------------------------------
    def bytes_per_sample(self, head_block_sizes: list[int], factor_width: int, tokens: int) -> float:
        """Bytes of one sample's representation of the attention weights. ``head_block_sizes`` lists the size
        of every distinct head block of the model, ``factor_width`` is Σ (in + out) over the projections,
        ``tokens`` the tokens per sample."""
        raise NotImplementedError

    def device_bytes_per_sample(self, head_block_sizes: list[int], factor_width: int, tokens: int) -> float:
        """Device bytes one sample's representation holds while collecting (default: as stored)."""
        return self.bytes_per_sample(head_block_sizes, factor_width, tokens)

    # -- one-pass codecs ------------------------------------------------------------------------
    def representation(self) -> Optional[Representation]:
        """An empty per-task container (None for side codecs, which write in pass 2)."""
        return None

    def describe(self) -> str:
        """A short label for tables (``Sketch(k=256, fp16)``)."""
        fields = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                           if getattr(self, f.name) != f.default)
        return f"{type(self).__name__}({fields})"


class SideCodec(Codec):
    """A codec that keeps, per sample and distinct head block, a transform of the variant's side vector
    (pass 2, after both tasks' statistics). Subclasses define :meth:`apply_heads`, :meth:`width`,
    :meth:`encode`/:meth:`decode` and :meth:`block_scores`; the side vectors, balancing and centring are
    the library's (:mod:`sketchfisher.compress.sketch_scores`)."""

    two_pass: ClassVar[bool] = True

    def statistics(self, cfg: "ScoreConfig", passes: float) -> dict[str, set[str]]:
        """Variance reduction centres by the task means of each side's transform and balances by both tasks' Σ|g|
        where both are known before the side passes (two passes per task; the signed variant by the Fisher); where
        task B runs once, by a power of task A's normaliser, which needs nothing more
        (:func:`~sketchfisher.compress.sketch_scores.fisher_balance`)."""
        if not self.variance_reduction:
            return {"a": set(), "b": set()}
        from ..metric import MEAN_OF
        from .sketch_scores import balances_by_fisher

        balance = set() if balances_by_fisher(cfg) or passes == 1.5 else {"abs"}
        return {"a": balance | {MEAN_OF[cfg.spec.i_side]}, "b": balance | {MEAN_OF[cfg.spec.j_side]}}

    def pass_orders(self, cfg: "ScoreConfig") -> tuple[float, ...]:
        """1.5 (task B once) needs normaliser ``"a"`` and variance reduction; it is then the default."""
        return (1.5, 2) if self.variance_reduction and cfg.normalizer == "a" else (2,)

    def width(self, size: int) -> int:
        """Values kept per sample for a head block of ``size`` entries."""
        raise NotImplementedError

    def apply_heads(self, layer: int, block: int, v: torch.Tensor) -> torch.Tensor:
        """Map every head of one (layer, block): ``v [n, H, size]`` → ``[n, H, width(size)]``."""
        raise NotImplementedError

    def encode(self, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stored form of ``[..., width]`` vectors: ``{"vec": ..., optional "scale": ...}``."""
        return {"vec": vectors.float()}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`encode`, in fp64."""
        return parts["vec"].double()

    def stored_width(self, size: int) -> int:
        """The last dimension of a stored ``"vec"`` for a block of ``size`` entries (packed forms are narrower)."""
        return self.width(size)

    def noise_variance(self, parts: dict[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """The known variance of each decoded coordinate's storage error, per vector, when the storage adds a
        random error of known size (a dithered quantiser); None when it adds none or none is known."""
        return None

    def bytes_per_block(self, size: int) -> int:
        """Stored bytes of one sample's head block of ``size`` entries: the encoded vector and its two exact
        fp64 scalars (‖x̃‖² and the cross term)."""
        raise NotImplementedError

    def bytes_per_sample(self, head_block_sizes: list[int], factor_width: int, tokens: int) -> float:
        return float(sum(self.bytes_per_block(s) for s in head_block_sizes))

    def block_scores(self, a: tuple, b: tuple, e: torch.Tensor, size: int,
                     residual: Optional[tuple] = None) -> "BlockScores":
        """Scores (and standard errors) of one (layer, block) from both sides' decoded ``(vectors, ‖·‖²,
        cross)`` and the centres' product ``e [H_b]``; ``residual``: task B's mean residual to take away from its
        vectors (a single pass over B with scaled centring)."""
        raise NotImplementedError

    def fused_sides(self, layout: "Layout", cfg: "ScoreConfig", side: str) -> Any:
        """An optional fast path for pass 2 (``None``: the torch path): an object with ``applies(factor)``
        and ``__call__(grad, layer, block, prep) -> (vectors, ‖·‖², cross)``."""
        return None


def centres_b_from_a(codec: Any, passes: float) -> bool:
    """Whether task B's single pass (``passes=1.5``) is centred during the pass, by a direction from task A's
    statistics: task A's own centre x̄'. With scaled centring any direction keeps the scores exact and each
    sample takes its own multiple of it, so B's sketches are final as they are made (B's mean residual is taken
    away when scoring). Codecs centred by the means centre B afterwards by its own mean."""
    return (passes == 1.5 and getattr(codec, "variance_reduction", False)
            and getattr(codec, "centring", "mean") == "scaled")


class SketchSide:
    """One side's (i or j) pass-2 output of a side codec, for every (layer, block): encoded vectors, exact
    norms ‖ṽ‖² and cross terms, batch by batch.

    A batch is kept as it was encoded: all its blocks on one device side by side along the head axis. Blocks are cut
    out when read (:meth:`get`, :meth:`conflict`), after the batches that share a layout are joined, so a pass does no
    per-block work on the host for them (224 blocks a batch at 7B with MLP units)."""

    def __init__(self, codec: SideCodec):
        self.codec = codec
        # runs of batches: (layout {key: (start, width)}, encoded {name: [n, ΣH, ...]}, scalars [[n, ΣH], ...])
        self._runs: list[tuple[dict, dict[str, torch.Tensor], list[torch.Tensor]]] = []
        self._joined = 0  # how many of the runs are joined already (the batches after them are not)
        self.n = 0

    def add(self, key: tuple[int, str], vectors: torch.Tensor, norm2: torch.Tensor, cross: torch.Tensor,
            gamma: Optional[torch.Tensor] = None, conflict: Optional[torch.Tensor] = None) -> None:
        """Add a batch for one (layer, block): mapped ``[B, H_b, width]``, ``‖·‖² [B, H_b]``, cross ``[B, H_b]``,
        scaled centring's γ ``[B, H_b]`` (None: 0) and, where collected, each sample's exact conflict scalars."""
        self.add_batch({key: (vectors, norm2, cross, torch.zeros_like(norm2) if gamma is None else gamma,
                              *([] if conflict is None else [conflict]))})

    def add_batch(self, blocks: dict) -> None:
        """:meth:`add` for every (layer, block) of one batch, ``{key: (vectors, ‖·‖², cross, γ[, conflict])}``,
        encoded together: the blocks on one device are stacked along the head axis and encoded in one call
        (a per-vector operation, so the same as block by block)."""
        by_device: dict = {}
        for key, value in blocks.items():
            by_device.setdefault((value[0].device, value[0].shape[-1], len(value)), []).append(key)
        for keys in by_device.values():
            layout, start = {}, 0
            for k in keys:
                width = blocks[k][0].shape[1]
                layout[k] = (start, width)
                start += width
            encoded = self.codec.encode(torch.cat([blocks[k][0] for k in keys], 1))
            scalars = [torch.cat([blocks[k][i] for k in keys], 1).double() for i in range(1, len(blocks[keys[0]]))]
            self._runs.append((layout, encoded, scalars))

    def add_encoded(self, key: tuple[int, str], encoded: dict[str, torch.Tensor], norm2: torch.Tensor,
                    cross: torch.Tensor, gamma: torch.Tensor, conflict: Optional[torch.Tensor] = None) -> None:
        """Add one (layer, block)'s samples as stored: the codec's ``encoded`` tensors ``[n, H_b, ...]`` and the
        fp64 scalars (a saved side read back)."""
        width = norm2.shape[1]
        scalars = [norm2, cross, gamma, *([] if conflict is None else [conflict])]
        self._runs.append(({key: (0, width)}, encoded, scalars))

    def _joined_runs(self) -> list[tuple[dict, dict[str, torch.Tensor], list[torch.Tensor]]]:
        """The runs with consecutive batches of one layout joined along the sample axis (in order)."""
        if self._joined < len(self._runs):
            runs: list = []
            for layout, encoded, scalars in self._runs:
                if runs and runs[-1][0] == layout and len(runs[-1][2]) == len(scalars):
                    runs[-1][1].append(encoded)
                    runs[-1][2].append(scalars)
                else:
                    runs.append((layout, [encoded], [scalars]))
            self._runs = [(layout, {name: torch.cat([e[name] for e in encs]) for name in encs[0]},
                           [torch.cat(parts) for parts in zip(*scals)]) for layout, encs, scals in runs]
            self._joined = len(self._runs)
        return self._runs

    def keys(self) -> list[tuple[int, str]]:
        """The (layer, block)s this side holds, in the order they were first added."""
        return list(dict.fromkeys(key for layout, _, _ in self._runs for key in layout))

    def _cut(self, key: tuple[int, str]) -> Iterator[tuple[Callable[[torch.Tensor], torch.Tensor], dict, list]]:
        """For each joined run that holds ``key``, in order: ``(cut, encoded, scalars)``, ``cut`` taking the block's
        heads out of a run's tensor."""
        for layout, encoded, scalars in self._joined_runs():
            if key in layout:
                start, width = layout[key]
                yield (lambda t, s=start, w=width: t.narrow(1, s, w)), encoded, scalars

    def parts(self, key: tuple[int, str]) -> list[tuple]:
        """One block's stored runs, in order: ``(encoded, ‖·‖², cross, γ)`` cut out of the runs that hold it."""
        return [({n: cut(t) for n, t in encoded.items()}, *(cut(t) for t in scalars[:3]))
                for cut, encoded, scalars in self._cut(key)]

    def conflict(self, key: tuple[int, str]) -> Optional[torch.Tensor]:
        """Every sample's conflict scalar ``[n, H_b]`` (fp64) of one (layer, block); None when not collected."""
        parts = [cut(scalars[3]) if len(scalars) > 3 else None for cut, _, scalars in self._cut(key)]
        return None if not parts or any(p is None for p in parts) else torch.cat(parts)

    def get(self, key: tuple[int, str]) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(decoded vectors ``[n, H_b, width]`` fp64, norms² ``[n, H_b]``, cross ``[n, H_b]``); None when absent."""
        return decode_side(self.codec, self.parts(key))


class DecodedSide(tuple):
    """One side of one (layer, block): the tuple ``(vectors, ‖·‖², cross)`` (fp64), with ``noise``: each
    vector's known per-coordinate storage-error variance ``[n, H_b]`` (:meth:`SideCodec.noise_variance`), or
    None."""

    noise: Optional[torch.Tensor] = None
    gamma: Optional[torch.Tensor] = None  # scaled centring's γ per vector [n, H_b] (None: centred by the mean)


def decode_side(codec: SideCodec, parts: Optional[list]) -> Optional[DecodedSide]:
    """Concatenate stored batches ``(encoded, norm2, cross[, γ])`` into fp64 tensors; None when absent. The
    encoded parts are joined first and decoded in one call (decoding is per vector)."""
    if not parts:
        return None
    encoded = {name: torch.cat([p[0][name] for p in parts]) for name in parts[0][0]}
    vec = codec.decode(encoded)
    out = DecodedSide((vec, torch.cat([p[1].double() for p in parts]), torch.cat([p[2].double() for p in parts])))
    noise = codec.noise_variance(encoded)
    out.noise = None if noise is None else noise.to(vec.device)
    if all(len(p) > 3 and p[3] is not None for p in parts):
        gamma = torch.cat([p[3].double() for p in parts]).to(vec.device)
        out.gamma = gamma if bool(gamma.any()) else None
    return out
