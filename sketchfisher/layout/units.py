"""Unit families beyond one layout: the output-channel groups of every other linear layer, the matrices no family
covers, and the union of families a collection asks for (``units="heads"``, ``"mlp"``, ``"linear"``, ``"all"``)."""

from __future__ import annotations

import logging
from typing import Optional

from torch import nn

from ..errors import LayoutError
from .adapters import base_model
from .core import HeadBlock, HeadKey, Layout
from .registry import _default_group, layout_for, mlp_layout_for
from .spec import Dims

UNIT_FAMILIES = ("heads", "mlp", "linear")


def linear_layouts(model: nn.Module, exclude: set[str] = frozenset(),
                   group_sizes: Optional[dict[str, int]] = None) -> list[tuple[str, Layout]]:
    """Output-channel units of every other linear layer: ``nn.Linear`` and HF ``Conv1D`` weights not in
    ``exclude`` (the parameters the head and MLP layouts hold) and not tied to another parameter. Modules
    that differ only by a layer index form one family (``"linear:layers.*.mlp.gate"``: an MoE router in
    every layer, where it is an ``nn.Linear``), with one block named by that pattern whose units are groups of
    consecutive output rows (``group_sizes[pattern]``; default: at most as many groups as the model has
    attention heads). Matrices that are no such layer (current Mixtral's router and its stacked experts are
    their own modules) cannot be captured as a linear map and are named in a warning, never skipped silently."""
    import re

    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None) or 1
    owned = dict(model.named_parameters())
    patterns: dict[str, list[tuple[int, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        conv = type(module).__name__ == "Conv1D"
        if not (isinstance(module, nn.Linear) or conv) or owned.get(name + ".weight") is not module.weight:
            continue
        if name + ".weight" in exclude or module.weight.ndim != 2 or not module.weight.requires_grad:
            continue
        match = re.search(r"\.(\d+)\.", f".{name}.")
        index = int(match.group(1)) if match else 0
        pattern = f".{name}.".replace(match.group(0), ".*.", 1).strip(".") if match else name
        patterns.setdefault(pattern, []).append((index, name, module))
    left = uncaptured_matrices(model, {n + ".weight" for mods in patterns.values() for _, n, _m in mods} | set(exclude))
    if left and patterns:
        logging.getLogger(__name__).warning("units 'linear' covers nn.Linear and Conv1D layers; %s", left)
    out = []
    for pattern, mods in patterns.items():
        mods.sort(key=lambda m: m[0])
        shapes = {tuple(m.weight.shape) for _, _, m in mods}
        conv = type(mods[0][2]).__name__ == "Conv1D"
        if len(shapes) != 1:
            raise LayoutError(f"linear layers {pattern!r} differ in shape across layers: {sorted(shapes)}")
        shape = shapes.pop()
        width = shape[1] if conv else shape[0]  # output channels
        group = (group_sizes or {}).get(pattern) or _default_group(width, heads)
        if width % group:
            raise LayoutError(f"group size {group} does not divide the {width} output channels of {pattern!r}")
        blocks = {}
        for layer, (_, name, module) in enumerate(mods):
            pname = name + ".weight"
            blocks[(layer, pattern)] = tuple(HeadBlock(HeadKey(layer, pattern, u), pname, shape, "out", u * group,
                                                       (u + 1) * group, conv) for u in range(width // group))
        dims = Dims(num_layers=len(mods), num_heads=width // group, num_kv_heads=width // group, head_dim=group,
                    hidden_size=shape[0] if conv else shape[1])
        out.append((f"linear:{pattern}", Layout(
            model_type=getattr(config, "model_type", None) or type(model).__name__, dims=dims, blocks=blocks,
            params=tuple(n + ".weight" for _, n, _m in mods), block_names=(pattern,), unit="rows")))
    return out


def uncaptured_matrices(model: nn.Module, covered: set[str]) -> str:
    """A sentence naming the trainable matrices (by layer pattern) that no unit family covers and that are not
    linear layers or embeddings ('' when there are none)."""
    import re

    embeddings = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    left = sorted({re.sub(r"\.\d+\.", ".*.", f".{n}.").strip(".") for n, p in model.named_parameters()
                   if p.ndim >= 2 and p.requires_grad and n not in covered and n not in embeddings})
    if not left:
        return ""
    shown = ", ".join(left[:12]) + (f" and {len(left) - 12} more" if len(left) > 12 else "")
    return f"these matrices are not such layers and are not collected: {shown}"


def units_layout(model: nn.Module, units: str | tuple[str, ...] = "heads", group_size: Optional[int] = None,
                 linear_group_sizes: Optional[dict[str, int]] = None, layout: Optional[Layout] = None) -> Layout:
    """The layout a collection of ``units`` needs: ``"heads"`` (attention heads), ``"mlp"`` (MLP channel
    groups of ``group_size``), ``"linear"`` (output-channel groups of every other linear layer, one family
    per module pattern: :func:`linear_layouts`), or several (a tuple; ``"all"`` = heads and MLP) as one
    :meth:`Layout.union`. ``layout`` replaces the resolved head layout (a declared one)."""
    model = base_model(model)
    wanted = ("heads", "mlp") if units == "all" else (units,) if isinstance(units, str) else tuple(units)
    unknown = [u for u in wanted if u not in UNIT_FAMILIES]
    if unknown or not wanted or len(set(wanted)) != len(wanted):
        raise LayoutError(f"units must be 'heads', 'mlp', 'linear', 'all' or a tuple of them, got {units!r}")
    parts = []
    for family in wanted:
        if family == "heads":
            parts.append(("heads", layout if layout is not None else layout_for(model)))
        elif family == "mlp":
            parts.append(("mlp", mlp_layout_for(model, group_size)))
    if "linear" in wanted:
        taken = {p for _, part in parts for p in part.params}
        if "heads" not in wanted:
            taken |= set(layout.params if layout is not None else _try(lambda: layout_for(model).params))
        if "mlp" not in wanted:
            taken |= set(_try(lambda: mlp_layout_for(model, group_size).params))
        found = linear_layouts(model, taken, linear_group_sizes)
        if not found:
            left = uncaptured_matrices(model, taken)
            raise LayoutError("units='linear': the model has no other linear layers (nn.Linear or Conv1D)"
                              + (f"; {left}" if left else ""))
        parts += found
    return Layout.union(parts)


def _try(fn) -> tuple:
    """``fn()``, or () when the model has no such layout."""
    try:
        return fn()
    except LayoutError:
        return ()
