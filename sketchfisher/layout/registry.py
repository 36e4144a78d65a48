"""Registry of architecture layouts keyed by ``config.model_type`` (attention heads and MLP channel units) and the
resolvers ``layout_for`` and ``mlp_layout_for``."""

from __future__ import annotations

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
