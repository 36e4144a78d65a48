"""Layouts: declarative per-architecture specs of attention heads and MLP channel units, resolved and
validated against a model."""

from .core import ALL_BLOCKS, BLOCKS, MLP_BLOCKS, HeadBlock, HeadKey, Layout, block_index
from .registry import layout_for, mlp_layout_for, mlp_model_types, register_layout, register_mlp, supported_model_types
from .units import UNIT_FAMILIES, units_layout
from .spec import AttentionSpec, Dims, MLPSpec, Stacks

__all__ = ["ALL_BLOCKS", "BLOCKS", "MLP_BLOCKS", "UNIT_FAMILIES", "AttentionSpec", "Dims", "HeadBlock", "HeadKey",
           "Layout", "MLPSpec", "Stacks", "block_index", "layout_for", "mlp_layout_for", "mlp_model_types",
           "register_layout", "register_mlp", "supported_model_types", "units_layout"]
