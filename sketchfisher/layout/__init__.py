"""QK-OV layouts: declarative per-architecture specs resolved and validated against a model."""

from .core import BLOCKS, HeadBlock, HeadKey, Layout, block_index
from .registry import layout_for, register_layout, supported_model_types
from .spec import AttentionSpec, Dims, Stacks

__all__ = ["BLOCKS", "AttentionSpec", "Dims", "HeadBlock", "HeadKey", "Layout", "Stacks", "block_index", "layout_for",
           "register_layout", "supported_model_types"]
