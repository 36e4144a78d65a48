"""GPT-2: fused blocked ``c_attn`` [Q|K|V] and ``c_proj``, both HF Conv1D (stored as Wᵀ)."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("gpt2", AttentionSpec(layer="h.{layer}.attn", qkv="c_attn", qkv_style="blocked",
                                      o="c_proj", weight_format="conv1d"))
