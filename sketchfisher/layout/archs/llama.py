"""Llama family: separate q/k/v/o projections, GQA/MQA through ``num_key_value_heads``.

The same layout serves every decoder that copied Llama's attention module: Mistral, Mixtral (MoE), Qwen2/
Qwen3 and their MoE variants, Gemma 1/2/3, OLMo 1/2, Granite, Cohere and StarCoder2 (with biases); each
is covered by the layout tests. Qwen-style configs may set ``head_dim`` ≠ hidden/H.

OLMo-2 normalises the whole Q and K projections (all heads at once) before splitting heads, so a head's
Q/K blocks also carry gradient that reaches the other heads through that normalisation; its V/O blocks,
and every block of the others (Qwen3 and Gemma 3 normalise per head), belong to one head alone.
"""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout(("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2",
                 "gemma3_text", "olmo", "olmo2", "granite", "cohere", "starcoder2"),
                AttentionSpec(layer="layers.{layer}.self_attn", q="q_proj", k="k_proj", v="v_proj", o="o_proj"))
