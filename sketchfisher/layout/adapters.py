"""Models with adapters (PEFT/LoRA): which weights they train and where those weights live.

A LoRA fine-tune leaves each adapted linear map ``W`` in place (``<module>.base_layer``) and adds a low-rank
update beside it, ``y = x Wᵀ + s·x Aᵀ Bᵀ``: the weight the model uses is ``W + s·B A``. The gradient of the
loss with respect to that effective weight is ``Σ_t dy_t ⊗ x_t``, the same factors as for a plain linear map
whose output is ``y``, and since ``y`` is the base map's output plus the adapter's, the base map's own output
gradient is ``dy``. So hooking ``<module>.base_layer`` captures exactly the effective weight's per-sample
gradient, and the analysis of a LoRA model is the analysis of the merged model's adapted weights.

What counts as trained: a base weight is frozen (``requires_grad=False``) while its adapter trains, so an
adapted weight counts as trainable when any parameter of its adapter does. Weights without an adapter keep
their own flag (frozen in a LoRA fine-tune: not collected, NaN in every table, as any frozen weight).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from torch import nn

from ..errors import LayoutError


def base_model(model: nn.Module) -> nn.Module:
    """The model whose modules carry the weights: a PEFT ``PeftModel``'s base model (its adapters are injected
    there, so calling it computes what the ``PeftModel`` computes); any other model itself."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and hasattr(model, "peft_config"):
        return get()
    return model


def weight_name(params: Mapping[str, object], stem: str) -> str:
    """``stem.weight``, or ``stem.base_layer.weight`` where an adapter wraps the linear map ``stem`` (the weight's
    name as ``params`` knows it; ``stem.weight`` when neither is there, for the caller's error)."""
    plain, wrapped = stem + ".weight", stem + ".base_layer.weight"
    return wrapped if plain not in params and wrapped in params else plain


def adapter_trains(model: nn.Module, weight: str) -> bool:
    """Whether ``weight`` is the base weight of an adapted linear map whose adapter has trainable parameters."""
    if not weight.endswith(".base_layer.weight"):
        return False
    wrapper = model.get_submodule(weight[: -len(".base_layer.weight")])
    return any(p.requires_grad for name, p in wrapper.named_parameters() if not name.startswith("base_layer."))


def trains(model: nn.Module, weight: str, param: nn.Parameter) -> bool:
    """Whether a weight counts as trained: its own flag, or its adapter's (:func:`adapter_trains`)."""
    return bool(param.requires_grad) or adapter_trains(model, weight)


ADAPTER_MODES = ("effective", "parameters")


def adapter_parameters_layout(model: nn.Module, layout) -> object:
    """``layout`` (of the effective weights) moved onto the LoRA matrices themselves, head by head where their
    shape allows: a Q/K/V head owns rows of the output side, so its block is those rows of ``lora_B`` (``[out,
    r]``); an O head owns columns of the input side, so its block is those columns of ``lora_A`` (``[r, in]``).
    ``lora_A`` of Q/K/V and ``lora_B`` of O mix all heads through the rank and are not head blocks. A block whose
    projection has no adapter keeps its base weight (frozen: not collected, NaN). One active LoRA adapter per
    layer; anything else is refused with the reason."""
    blocks = {}
    params: list[str] = []
    found = 0
    for key, hbs in layout.blocks.items():
        moved = []
        for hb in hbs:
            stem = hb.module_name
            wrapper = stem[: -len(".base_layer")] if stem.endswith(".base_layer") else None
            if wrapper is None:
                moved.append(hb)
                continue
            module = model.get_submodule(wrapper)
            side = "lora_B" if hb.role == "out" else "lora_A"
            adapters = getattr(module, side, None)
            active = [a for a in getattr(module, "active_adapters", []) if adapters is not None and a in adapters]
            if len(active) != 1 or not isinstance(adapters[active[0]], nn.Linear):
                raise LayoutError(f"{wrapper}: adapter-parameter scores need one active LoRA adapter whose {side} is a "
                                  f"linear map; found {type(module).__name__} with active adapters "
                                  f"{list(getattr(module, 'active_adapters', []))} (use adapters='effective')")
            weight = adapters[active[0]].weight
            name = f"{wrapper}.{side}.{active[0]}.weight"
            moved.append(dataclasses.replace(hb, param_name=name, param_shape=tuple(weight.shape), transposed=False))
            found += 1
        blocks[key] = tuple(moved)
        params += [name for name in dict.fromkeys(hb.param_name for hb in moved) if name not in params]
    if not found:
        raise LayoutError("adapters='parameters' needs a model with LoRA adapters on its attention projections; "
                          "this one has none")
    return dataclasses.replace(layout, blocks=blocks, params=tuple(params))


__all__ = ["ADAPTER_MODES", "adapter_parameters_layout", "adapter_trains", "base_model", "trains", "weight_name"]
