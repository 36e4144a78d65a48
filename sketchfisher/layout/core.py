"""Layouts: which entries of which parameter belong to (layer, block, unit).

Conventions (docs/semantics.md, "Layout"): a linear layer is ``y = x Wᵀ`` with ``W ∈ R^{out×in}``. A Q/K/V head
owns a contiguous range of *output* rows, an O head a contiguous range of *input* columns.
HF ``Conv1D`` stores ``Wᵀ``, so the storage axis flips while the logical role does not.

Units are the general form of heads: an MLP channel group owns the same rows of the projections that
produce its hidden units (GATE, UP) and the same columns of the one that consumes them (DOWN), exactly
as a head owns rows of Q/K/V and columns of O. A :class:`Layout` holds one *family* of units (the
attention heads, or the MLP channel groups) with the same number of units in every block; a collection
over several families uses their :meth:`Layout.union`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

from ..errors import LayoutError
from .spec import Dims

BLOCKS: tuple[str, ...] = ("Q", "K", "V", "O")
MLP_BLOCKS: tuple[str, ...] = ("GATE", "UP", "DOWN")
ALL_BLOCKS: tuple[str, ...] = BLOCKS + MLP_BLOCKS
Role = Literal["out", "in"]


def block_index(block: str) -> int:
    """The block's identity among every block kind (Q, K, V, O, GATE, UP, DOWN; another linear layer's
    block is named by its module pattern, ``"layers.*.mlp.gate"``, and identified by a stable hash of that
    name): what seeds its sketch maps. For attention it is also the position on the score tensor's last
    axis; in general that position is :meth:`Layout.position`."""
    if block in ALL_BLOCKS:
        return ALL_BLOCKS.index(block)
    if not isinstance(block, str) or not block or block.upper() in ALL_BLOCKS:
        raise LayoutError(f"block must be one of {ALL_BLOCKS} or a linear layer's module pattern, got {block!r}")
    return len(ALL_BLOCKS) + zlib.crc32(block.encode()) % (1 << 24)


@dataclass(frozen=True, order=True)
class HeadKey:
    """A query head's block in one layer. For K/V under GQA several keys share one storage block."""

    layer: int
    block: str
    head: int


@dataclass(frozen=True)
class HeadBlock:
    """The entries of ``param_name`` that belong to one head block.

    ``role="out"``: logical rows ``[start, stop)`` of ``W`` (Q/K/V); ``role="in"``: logical
    columns (O). ``transposed`` marks Conv1D storage (``Wᵀ``).
    """

    key: HeadKey
    param_name: str
    param_shape: tuple[int, int]
    role: Role
    start: int
    stop: int
    transposed: bool = False

    @property
    def module_name(self) -> str:
        """The module that owns the weight (``param_name`` without its final ``.weight``)."""
        return self.param_name.rsplit(".", 1)[0]

    @property
    def storage_axis(self) -> int:
        """Axis of the stored weight that the head range indexes (0 rows, 1 columns)."""
        logical = 0 if self.role == "out" else 1
        return 1 - logical if self.transposed else logical

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def numel(self) -> int:
        other = self.param_shape[1 - self.storage_axis]
        return self.width * other

    def select(self, t: torch.Tensor) -> torch.Tensor:
        """The head's entries of ``t``, shaped ``[..., *param_shape]`` (leading batch dims allowed).

        Returns a view with the head axis narrowed; rank and other axes are unchanged.
        """
        if tuple(t.shape[-2:]) != self.param_shape:
            raise LayoutError(
                f"{self.key}: tensor of shape {tuple(t.shape)} does not end in the shape of "
                f"{self.param_name} {self.param_shape}"
            )
        axis = t.ndim - 2 + self.storage_axis
        return t.narrow(axis, self.start, self.width)

    def select_bias(self, b: torch.Tensor) -> torch.Tensor:
        """The head's entries of a bias shaped ``[..., out]``. The O bias is not head-attributable."""
        if self.role != "out":
            raise LayoutError(f"{self.key}: the O-projection bias is shared by all heads and has no head block")
        out = self.param_shape[1] if self.transposed else self.param_shape[0]
        if b.ndim == 0 or b.shape[-1] != out:
            raise LayoutError(f"{self.key}: bias of shape {tuple(b.shape)} does not end in {out}")
        return b.narrow(b.ndim - 1, self.start, self.width)

    def select_factors(self, A: torch.Tensor, D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slice token factors ``A [..., T, in]``, ``D [..., T, out]``: Q/K/V narrow D, O narrows A."""
        if self.role == "out":
            return A, D.narrow(-1, self.start, self.width)
        return A.narrow(-1, self.start, self.width), D

    def grad_from_factors(self, A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        """This block of ``g = Dᵀ A`` in storage orientation, formed only for the block: ``[..., rows, cols]``.

        Equals ``select(g_storage)``; for Conv1D (``transposed``) that is ``Aᵀ D`` restricted to the block.
        """
        A, D = self.select_factors(A, D)
        left, right = (A, D) if self.transposed else (D, A)
        return left.transpose(-1, -2).float() @ right.float()

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """``select(t)`` flattened over the parameter axes: ``[..., numel]`` (storage order)."""
        s = self.select(t)
        return s.reshape(*s.shape[:-2], -1)


@dataclass(frozen=True)
class Layout:
    """Resolved QK-OV layout of one model: head blocks for every (layer, block, head).

    Built by :func:`sketchfisher.layout_for`; ``blocks[(layer, block)]`` holds the *distinct*
    storage blocks (H for Q/O, H_kv for K/V) and ``head_index(block)`` maps query heads onto them.
    """

    model_type: str
    dims: Dims
    blocks: dict
    params: tuple[str, ...]
    stacks: tuple = ()  # ((name, first layer, layer count), ...) for models with several attention stacks
    block_names: tuple[str, ...] = BLOCKS  # the score tensor's last axis
    unit: str = "head"  # what a unit is: "head", or "channels" (an MLP channel group)
    families: tuple = ()  # a union's parts: ((name, Layout), ...); empty for one family

    @property
    def family_name(self) -> str:
        """``"heads"`` or ``"mlp"`` (a union: the names of its parts joined by '+')."""
        if self.families:
            return "+".join(name for name, _ in self.families)
        if self.unit == "head":
            return "heads"
        return "mlp" if self.unit == "channels" else f"linear:{self.block_names[0]}"

    @property
    def unit_column(self) -> str:
        """The name of the unit index in tables: ``head`` for attention, ``unit`` otherwise."""
        return "head" if self.unit == "head" else "unit"

    def position(self, block: str) -> int:
        """Position of ``block`` on this layout's score axis (Q, K, V, O for attention)."""
        try:
            return self.block_names.index(block)
        except ValueError:
            raise LayoutError(f"block must be one of {self.block_names} for this layout, got {block!r}") from None

    def groups(self) -> list[tuple[int, str]]:
        """Every (layer, block) this layout holds, by layer and block kind."""
        return sorted(self.blocks, key=lambda key: (key[0], block_index(key[1])))

    @classmethod
    def union(cls, parts: list[tuple[str, "Layout"]]) -> "Layout":
        """One layout for collecting several unit families in the same passes: every part's (layer, block)
        groups and parameters. Scores are read per family (:meth:`family`), whose unit counts differ."""
        if len(parts) == 1:
            return parts[0][1]
        blocks, params = {}, []
        for name, part in parts:
            if part.families:
                raise LayoutError("a union's parts must be single families")
            clash = set(blocks) & set(part.blocks)
            if clash:
                raise LayoutError(f"unit families {name!r} and another both claim {sorted(clash)[:3]}")
            blocks.update(part.blocks)
            params += [p for p in part.params if p not in params]
        first = parts[0][1]
        names = tuple(b for _, part in parts for b in part.block_names)
        return cls(model_type=first.model_type, dims=first.dims, blocks=blocks, params=tuple(params),
                   stacks=first.stacks, block_names=names, unit=first.unit, families=tuple(parts))

    def family(self, name: str) -> "Layout":
        """The part ``name`` (``"heads"``, ``"mlp"``) of a union; a single-family layout is its own family."""
        if not self.families:
            if name != self.family_name:
                raise LayoutError(f"this layout holds the {self.family_name!r} units only, not {name!r}")
            return self
        for part_name, part in self.families:
            if part_name == name:
                return part
        raise LayoutError(f"no unit family {name!r}; this layout holds {[n for n, _ in self.families]}")

    def unit_settings(self) -> tuple:
        """``(units, mlp_group_size, linear_group_sizes)`` that rebuild this layout from a model with
        :func:`~sketchfisher.layout.units_layout` (how a store checks a model against its layout)."""
        parts = self.families or ((self.family_name, self),)
        group = next((part.head_dim for name, part in parts if name == "mlp"), None)
        names = tuple(dict.fromkeys("linear" if name.startswith("linear:") else name for name, _ in parts))
        linear = {name[len("linear:"):]: part.head_dim for name, part in parts if name.startswith("linear:")}
        return names, group, linear or None

    @property
    def beyond_heads(self) -> bool:
        """True when the layout has units other than attention heads (their collections keep both tasks'
        means, from which every unit's pair-mean score is exact: ``pair_means_from_statistics``)."""
        return self.unit_settings()[0] != ("heads",)

    def require_single(self, what: str) -> None:
        if self.families:
            raise LayoutError(f"{what} needs one unit family; take one with .family(name) from "
                              f"{[n for n, _ in self.families]}")

    @classmethod
    def concat(cls, model_type: str, parts: list[tuple[str, "Layout"]]) -> "Layout":
        """One layout whose layers are those of ``parts`` one after the other (an encoder-decoder's encoder
        self-attention, decoder self-attention and cross-attention); ``stacks`` names their ranges."""
        dims0 = parts[0][1].dims
        for name, part in parts:
            d = part.dims
            if (d.num_heads, d.num_kv_heads, d.head_dim, d.v_head_dim) != (dims0.num_heads, dims0.num_kv_heads,
                                                                          dims0.head_dim, dims0.v_head_dim):
                raise LayoutError(
                    f"stack {name!r} has {d.num_heads} heads ({d.num_kv_heads} key/value, width {d.head_dim}) but "
                    f"{parts[0][0]!r} has {dims0.num_heads} ({dims0.num_kv_heads}, width {dims0.head_dim}): the head "
                    "grid of the scores is shared by the stacks, so a model whose stacks differ is not supported")
        blocks, params, stacks, first = {}, [], [], 0
        for name, part in parts:
            for (layer, block), hbs in part.blocks.items():
                blocks[(first + layer, block)] = tuple(
                    HeadBlock(HeadKey(first + layer, block, hb.key.head), hb.param_name, hb.param_shape, hb.role,
                              hb.start, hb.stop, hb.transposed) for hb in hbs)
            params += [p for p in part.params if p not in params]
            stacks.append((name, first, part.num_layers))
            first += part.num_layers
        dims = Dims(num_layers=first, num_heads=dims0.num_heads, num_kv_heads=dims0.num_kv_heads,
                    head_dim=dims0.head_dim, hidden_size=dims0.hidden_size, v_head_dim=dims0.v_head_dim)
        return cls(model_type=model_type, dims=dims, blocks=blocks, params=tuple(params), stacks=tuple(stacks))

    def layer_name(self, layer: int) -> str:
        """``"7"``, or for a model with several stacks ``"decoder 3"``/``"cross 3"`` (the layer within its stack)."""
        for name, first, count in self.stacks:
            if first <= layer < first + count:
                return f"{name} {layer - first}"
        return str(layer)

    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    @property
    def num_heads(self) -> int:
        return self.dims.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.dims.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dims.head_dim

    def _check(self, layer: int, block: str, head: int | None = None) -> None:
        if (layer, block) not in self.blocks:
            self.position(block)
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer must be in [0, {self.num_layers}), got {layer}")
        if head is not None and not 0 <= head < self.num_heads:
            raise LayoutError(f"head must be in [0, {self.num_heads}), got {head}")

    def head_blocks(self, layer: int, block: str) -> tuple[HeadBlock, ...]:
        """The distinct storage blocks of (layer, block): H for Q/O, H_kv for K/V."""
        self._check(layer, block)
        return self.blocks[(layer, block)]

    def head_index(self, block: str) -> torch.Tensor:
        """``LongTensor[H]``: query head → index into :meth:`head_blocks` (κ(h) for K/V)."""
        heads = torch.arange(self.num_heads)
        return heads // self.dims.group_size if block in ("K", "V") else heads

    def head_block(self, layer: int, block: str, head: int) -> HeadBlock:
        """The entries of query head ``head``'s ``block`` in ``layer`` (K/V: its kv head's block)."""
        self._check(layer, block, head)
        shared = self.blocks[(layer, block)][int(self.head_index(block)[head])]
        return HeadBlock(HeadKey(layer, block, head), shared.param_name, shared.param_shape,
                         shared.role, shared.start, shared.stop, shared.transposed)

    def param_of(self, layer: int, block: str) -> str:
        """The parameter that holds (layer, block)'s head blocks."""
        return self.head_blocks(layer, block)[0].param_name

    def module_of(self, layer: int, block: str) -> str:
        """The module that owns (layer, block)'s weight."""
        return self.head_blocks(layer, block)[0].module_name

    def gather(self, layer: int, block: str, t: torch.Tensor) -> torch.Tensor:
        """Stack the distinct head blocks of ``t`` (``[n, *param_shape]``) into ``[n, H_b, |S|]``.

        Each head block is a rectangle ``rows × cols`` of the stored weight; its entries are
        flattened row-major (storage order)."""
        parts = [rearrange(hb.select(t), "n rows cols -> n (rows cols)") for hb in self.head_blocks(layer, block)]
        return torch.stack(parts, dim=-2)

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        """Inverse of :meth:`to_dict` (used by stores, which hold no model)."""
        if "families" in d:
            return cls.union([(name, cls.from_dict(part)) for name, part in d["families"]])
        L, H, Hkv, dk, hidden, dv = d["dims"]
        dims = Dims(num_layers=L, num_heads=H, num_kv_heads=Hkv, head_dim=dk, hidden_size=hidden, v_head_dim=dv)
        blocks, params = {}, []
        group = H // Hkv
        for key, rows in d["blocks"].items():
            layer, block = key.split(".", 1)
            hbs = []
            for idx, (name, shape, role, start, stop, transposed) in enumerate(rows):
                head = idx * group if block in ("K", "V") else idx
                hbs.append(HeadBlock(HeadKey(int(layer), block, head), name, tuple(shape), role, start, stop, transposed))
                if name not in params:
                    params.append(name)
            blocks[(int(layer), block)] = tuple(hbs)
        return cls(model_type=d["model_type"], dims=dims, blocks=blocks, params=tuple(params),
                   stacks=tuple(tuple(x) for x in d.get("stacks", ())),
                   block_names=tuple(d.get("block_names", BLOCKS)), unit=d.get("unit", "head"))

    def to_dict(self) -> dict:
        """JSON-serialisable description, stored beside every artifact for mismatch checks."""
        if self.families:
            return {"model_type": self.model_type, "families": [[name, part.to_dict()] for name, part in self.families]}
        d = self.dims
        extra = {} if self.unit == "head" else {"block_names": list(self.block_names), "unit": self.unit}
        return {
            "model_type": self.model_type,
            "dims": [d.num_layers, d.num_heads, d.num_kv_heads, d.head_dim, d.hidden_size, d.v_head_dim],
            "blocks": {
                f"{layer}.{block}": [[hb.param_name, list(hb.param_shape), hb.role, hb.start, hb.stop, hb.transposed]
                                     for hb in self.blocks[(layer, block)]]
                for layer, block in self.groups()
            },
            **({"stacks": [list(x) for x in self.stacks]} if self.stacks else {}),
            **extra,
        }
