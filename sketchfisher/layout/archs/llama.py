"""Llama family: separate q/k/v/o projections, GQA/MQA through ``num_key_value_heads``.

Mistral, Qwen2/Qwen3 and Gemma share the layout (each covered by the layout tests); Qwen-style configs may set ``head_dim`` ≠ hidden/H.
"""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout(("llama", "mistral", "qwen2", "qwen3", "gemma"),
                AttentionSpec(layer="layers.{layer}.self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj"))
