"""Registry of architecture layouts keyed by ``config.model_type`` and the resolver ``layout_for``."""

from __future__ import annotations

import logging

from typing import Any, Callable, Optional

from torch import nn

from ..errors import LayoutError
from .adapters import ADAPTER_MODES, adapter_parameters_layout, base_model, weight_name
from .core import BLOCKS, HeadBlock, HeadKey, Layout
from .spec import AttentionSpec, Dims, MLPSpec, Stacks

SpecFor = Callable[[Any], AttentionSpec]  # a layout that depends on the config (one model_type, several layouts)
Registered = AttentionSpec | SpecFor | tuple[AttentionSpec, ...] | Stacks  # a tuple: the module names of several versions
_REGISTRY: dict[str, Registered] = {}
_MLP_REGISTRY: dict[str, MLPSpec] = {}
UNIT_FAMILIES = ("heads", "mlp", "linear")

HOW_TO_DECLARE = (
    "declare it with sf.layout_for(model, spec=sf.AttentionSpec(layer='blocks.{layer}.attn', q='q', k='k', "
    "v='v', o='out'), dims=sf.Dims(...)) or register it once with sf.register_layout('<model_type>', spec)"
)


def register_layout(model_types: str | tuple[str, ...], spec: Registered, *, overwrite: bool = False) -> None:
    """Declare the attention layout of one or more ``config.model_type`` values: an :class:`AttentionSpec`;
    a function of the config returning one (a type whose layout depends on its configuration); or a tuple
    of specs, the first whose modules the model has wins (a library version that renamed the modules)."""
    if isinstance(spec, Stacks) or (isinstance(spec, tuple) and spec and all(isinstance(s, AttentionSpec) for s in spec)):
        pass
    elif not isinstance(spec, AttentionSpec) and not callable(spec):
        raise LayoutError(f"register_layout needs an AttentionSpec (or a function of the config returning one), "
                          f"got {type(spec).__name__}")
    _register(_REGISTRY, "a layout", model_types, spec, overwrite)


def _register(registry: dict, what: str, model_types: str | tuple[str, ...], spec: Any, overwrite: bool) -> None:
    """Enter ``spec`` for each model type; a different spec already there needs ``overwrite``."""
    for model_type in (model_types,) if isinstance(model_types, str) else model_types:
        if model_type in registry and not overwrite and registry[model_type] != spec:
            raise LayoutError(f"{what} for model_type {model_type!r} is already registered; pass overwrite=True")
        registry[model_type] = spec


def supported_model_types() -> tuple[str, ...]:
    from . import archs  # noqa: F401  (registers the built-in architectures)

    return tuple(sorted(_REGISTRY))


def _base_prefix(model: nn.Module) -> str:
    """Name prefix of the HF base model inside its task wrapper ('' for a bare base model)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, module in model.named_modules():
        if module is base:
            return name + "."
    raise LayoutError(f"{type(model).__name__}.base_model is not a submodule of the model")


def _qkv_ranges(spec: AttentionSpec, dims: Dims, block: str, kv: int, head: int) -> tuple[str, int, int]:
    """(module name, start, stop) of a Q/K/V head block in logical output rows."""
    dk, dv, H, Hkv = dims.head_dim, dims.v_head_dim, dims.num_heads, dims.num_kv_heads
    if not spec.fused:
        name = {"Q": spec.q, "K": spec.k, "V": spec.v}[block]
        start = head * dk if block == "Q" else kv * (dk if block == "K" else dv)
        return name, start, start + (dv if block == "V" else dk)
    if spec.qkv_style == "blocked":
        start = {"Q": head * dk, "K": H * dk + kv * dk, "V": H * dk + Hkv * dk + kv * dv}[block]
    elif spec.qkv_style == "grouped":  # per kv head g: [q heads of group g | k_g | v_g]
        gs = H // Hkv
        group = gs * dk + dk + dv
        g = head // gs if block == "Q" else kv
        start = {"Q": g * group + (head % gs) * dk, "K": g * group + gs * dk, "V": g * group + gs * dk + dk}[block]
    else:  # interleaved [q_h | k_h | v_h] per kv head; only meaningful without GQA
        if H != Hkv:
            raise LayoutError(f"interleaved fused QKV needs num_kv_heads == num_heads, got {Hkv} and {H}")
        group = 2 * dk + dv
        start = {"Q": head * group, "K": kv * group + dk, "V": kv * group + 2 * dk}[block]
    return spec.qkv, start, start + (dv if block == "V" else dk)


def _expected_shapes(spec: AttentionSpec, dims: Dims) -> dict[str, tuple[int, int]]:
    """Logical (out, in) shape of each projection module the spec names."""
    D, H, Hkv, dk, dv = dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.v_head_dim
    shapes = {spec.o: (D, H * dv)}
    if spec.fused:
        shapes[spec.qkv] = (H * dk + Hkv * (dk + dv), D)
    else:
        shapes.update({spec.q: (H * dk, D), spec.k: (Hkv * dk, D), spec.v: (Hkv * dv, D)})
    return shapes


def build_layout(model: nn.Module, spec: AttentionSpec, dims: Dims, model_type: str) -> Layout:
    """Resolve ``spec`` against ``model``'s parameters and validate every shape once."""
    params = dict(model.named_parameters())
    prefix = _base_prefix(model)
    expected = _expected_shapes(spec, dims)
    blocks: dict[tuple[int, str], tuple[HeadBlock, ...]] = {}
    names: list[str] = []
    for layer in range(dims.num_layers):
        base = prefix + spec.layer.format(layer=layer) + "."
        resolved = {}
        for module, (out_f, in_f) in expected.items():
            pname = weight_name(params, base + module)
            if pname not in params:
                near = [n for n in params if n.endswith(module + ".weight")][:3]
                raise LayoutError(
                    f"{model_type} layout: parameter {pname!r} not found in {type(model).__name__} "
                    f"(parameters ending like it: {near or 'none'}); {HOW_TO_DECLARE}"
                )
            want = (in_f, out_f) if spec.weight_format == "conv1d" else (out_f, in_f)
            got = tuple(params[pname].shape)
            if got != want:
                raise LayoutError(
                    f"{model_type} layout: {pname!r} has shape {got}, expected {want} from "
                    f"hidden={dims.hidden_size}, heads={dims.num_heads}, kv_heads={dims.num_kv_heads}, "
                    f"head_dim={dims.head_dim} ({spec.weight_format} storage)"
                )
            resolved[module] = (pname, got)
            if pname not in names:
                names.append(pname)
        transposed = spec.weight_format == "conv1d"
        for block in BLOCKS:
            count = dims.num_kv_heads if block in ("K", "V") else dims.num_heads
            hbs = []
            for idx in range(count):
                head = idx * dims.group_size if block in ("K", "V") else idx
                if block == "O":
                    module, start, stop, role = spec.o, idx * dims.v_head_dim, (idx + 1) * dims.v_head_dim, "in"
                else:
                    (module, start, stop), role = _qkv_ranges(spec, dims, block, idx, head), "out"
                pname, shape = resolved[module]
                hbs.append(HeadBlock(HeadKey(layer, block, head), pname, shape, role, start, stop, transposed))
            blocks[(layer, block)] = tuple(hbs)
    return Layout(model_type=model_type, dims=dims, blocks=blocks, params=tuple(names))


def layout_for(model: nn.Module, spec: Optional[AttentionSpec] = None, dims: Optional[Dims] = None,
               adapters: str = "effective") -> Layout:
    """The validated QK-OV layout of ``model``.

    Dispatches on ``model.config.model_type`` unless ``spec`` is given; head counts come from
    ``model.config`` unless ``dims`` is given. Raises :class:`LayoutError` for an unknown type or
    weights that do not match the declared geometry. For a LoRA (PEFT) model, ``adapters="effective"``
    (the default) lays out the effective weights ``W + s·B·A``; ``"parameters"`` the LoRA matrices
    themselves, per head where their shape allows (:func:`~sketchfisher.layout.adapters.adapter_parameters_layout`;
    pass it to ``sf.analyze(..., layout=...)``).
    """
    if adapters not in ADAPTER_MODES:
        raise LayoutError(f"adapters must be one of {ADAPTER_MODES}, got {adapters!r}")
    layout = _layout_for(model, spec, dims)
    return layout if adapters == "effective" else adapter_parameters_layout(base_model(model), layout)


def _layout_for(model: nn.Module, spec: Optional[AttentionSpec], dims: Optional[Dims]) -> Layout:
    from . import archs  # noqa: F401  (registers the built-in architectures)

    model = base_model(model)  # (a PEFT model: the base model, adapters injected)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if spec is None:
        if model_type not in _REGISTRY:
            raise LayoutError(
                f"no QK-OV layout for model_type {model_type!r} ({type(model).__name__}); supported: "
                f"{', '.join(supported_model_types())}; {HOW_TO_DECLARE}"
            )
        spec = _REGISTRY[model_type]
        if isinstance(spec, tuple):
            names = {n for n, _ in model.named_parameters()}
            prefix = _base_prefix(model)
            spec = next((s for s in spec if weight_name(names, f"{prefix}{s.layer.format(layer=0)}.{s.o}") in names),
                        spec[0])
        elif not isinstance(spec, (AttentionSpec, Stacks)):
            spec = spec(config)
    if isinstance(spec, Stacks):
        if config is None:
            raise LayoutError(f"{type(model).__name__} has no .config; a model with several stacks needs one")
        return Layout.concat(model_type, [(name, build_layout(model, part, Dims.from_config(config, part), model_type))
                                          for name, part in spec.parts])
    if dims is None:
        if config is None:
            raise LayoutError(f"{type(model).__name__} has no .config; pass dims=sf.Dims(...) to layout_for")
        dims = Dims.from_config(config, spec)
    if not isinstance(model, nn.Module):
        raise LayoutError(f"layout_for needs a torch.nn.Module, got {type(model).__name__}")
    return build_layout(model, spec, dims, model_type)


def register_mlp(model_types: str | tuple[str, ...], spec: MLPSpec, *, overwrite: bool = False) -> None:
    """Declare where one or more ``config.model_type`` values keep their MLP projections (channel units)."""
    if not isinstance(spec, MLPSpec):
        raise LayoutError(f"register_mlp needs an MLPSpec, got {type(spec).__name__}")
    _register(_MLP_REGISTRY, "an MLP layout", model_types, spec, overwrite)


def mlp_model_types() -> tuple[str, ...]:
    from . import archs  # noqa: F401  (registers the built-in architectures)

    return tuple(sorted(_MLP_REGISTRY))


def mlp_spec_for(model_type: Optional[str]) -> Optional[MLPSpec]:
    """The MLP units declared for ``model_type`` (built-in ones included), or None."""
    from . import archs  # noqa: F401  (registers the built-in architectures)

    return _MLP_REGISTRY.get(model_type)


def mlp_layout_for(model: nn.Module, group_size: Optional[int] = None, spec: Optional[MLPSpec] = None) -> Layout:
    """The validated MLP channel-unit layout of ``model``: per layer, units of ``group_size`` consecutive
    hidden channels (1 = single neurons; default: as many units as the model has attention heads, the
    width that makes the MLP map as fine as the head map, or the fewest more channels per unit that
    divide the width when the heads do not). Unit ``u`` owns rows ``[u·s, (u+1)·s)`` of
    GATE and UP and the same columns of DOWN."""
    from . import archs  # noqa: F401  (registers the built-in architectures)

    model = base_model(model)  # (a PEFT model: the base model, adapters injected)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    if spec is None:
        if model_type not in _MLP_REGISTRY:
            raise LayoutError(f"no MLP layout for model_type {model_type!r}; MLP units are declared for "
                              f"{', '.join(mlp_model_types())}; declare one with sf.register_mlp('<model_type>', "
                              "sf.MLPSpec(layer='layers.{layer}.mlp', up='up_proj', down='down_proj'))")
        spec = _MLP_REGISTRY[model_type]
    try:
        layers = int(getattr(config, spec.layers))
        hidden = int(config.hidden_size)
    except (AttributeError, TypeError):
        raise LayoutError(f"{type(model).__name__}'s config lacks {spec.layers!r} or hidden_size") from None
    params = dict(model.named_parameters())
    prefix = _base_prefix(model)
    conv = spec.weight_format == "conv1d"

    def weight(layer: int, module: str) -> tuple[str, tuple[int, int]]:
        pname = weight_name(params, f"{prefix}{spec.layer.format(layer=layer)}.{module}")
        if pname not in params:
            near = [n for n in params if n.endswith(module + ".weight")][:3]
            raise LayoutError(f"{model_type} MLP layout: parameter {pname!r} not found (parameters ending like it: "
                              f"{near or 'none'})")
        shape = tuple(params[pname].shape)
        if len(shape) != 2:
            raise LayoutError(f"{model_type} MLP layout: {pname!r} has shape {shape}, not a matrix")
        return pname, shape

    def logical(shape: tuple[int, int]) -> tuple[int, int]:  # (out, in)
        return (shape[1], shape[0]) if conv else shape

    down_name, down_shape = weight(0, spec.down)
    width = logical(down_shape)[1]  # the hidden channels: DOWN's input features
    if group_size is None:
        group_size = _default_group(width, getattr(config, "num_attention_heads", None) or 1)
    if not isinstance(group_size, int) or group_size < 1 or width % group_size:
        sizes = [d for d in range(1, width + 1) if width % d == 0]
        raise LayoutError(f"MLP group_size must divide the {width} hidden channels; got {group_size!r} "
                          f"(sizes that do: {sizes[:12]}{'...' if len(sizes) > 12 else ''})")
    units = width // group_size
    names = (("GATE",) if spec.gated else ()) + ("UP", "DOWN")
    blocks, pnames = {}, []
    for layer in range(layers):
        up_name, up_shape = weight(layer, spec.up)
        down_name, down_shape = weight(layer, spec.down)
        up_rows = logical(up_shape)[0]
        want_up = 2 * width if spec.gate_up else width
        if up_rows != want_up or logical(down_shape) != (hidden, width):
            raise LayoutError(f"{model_type} MLP layout, layer {layer}: {up_name} has {up_rows} output channels "
                              f"(expected {want_up}) and {down_name} logical shape {logical(down_shape)} (expected "
                              f"({hidden}, {width}))")
        rows = {"UP": (up_name, up_shape, width if spec.gate_up else 0)}
        if spec.gate_up:
            rows["GATE"] = (up_name, up_shape, 0)
        elif spec.gate is not None:
            gate_name, gate_shape = weight(layer, spec.gate)
            if logical(gate_shape) != logical(up_shape):
                raise LayoutError(f"{model_type} MLP layout, layer {layer}: {gate_name} and {up_name} differ in shape")
            rows["GATE"] = (gate_name, gate_shape, 0)
        for block in names:
            if block == "DOWN":
                hbs = [HeadBlock(HeadKey(layer, block, u), down_name, down_shape, "in", u * group_size,
                                 (u + 1) * group_size, conv) for u in range(units)]
            else:
                pname, shape, offset = rows[block]
                hbs = [HeadBlock(HeadKey(layer, block, u), pname, shape, "out", offset + u * group_size,
                                 offset + (u + 1) * group_size, conv) for u in range(units)]
            blocks[(layer, block)] = tuple(hbs)
            pnames += [hbs[0].param_name] if hbs[0].param_name not in pnames else []
    dims = Dims(num_layers=layers, num_heads=units, num_kv_heads=units, head_dim=group_size, hidden_size=hidden)
    return Layout(model_type=model_type, dims=dims, blocks=blocks, params=tuple(pnames), block_names=names,
                  unit="channels")


def _default_group(width: int, units: int) -> int:
    """The smallest divisor of ``width`` that makes at most ``units`` groups."""
    return next(g for g in range(-(-width // units), width + 1) if width % g == 0)


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
