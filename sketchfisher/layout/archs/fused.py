"""Fused QKV projections beyond GPT-2/NeoX/BLOOM/Phi-3.

- GPT-BigCode (StarCoder): ``c_attn`` = [Q heads | K | V] with a single kv head under ``multi_query``.
- MPT: ``Wqkv`` = [Q | K | V], ``out_proj``. ModernBERT: ``Wqkv`` = [Q | K | V], ``Wo``.
- Falcon: one ``model_type`` and three layouts, chosen from the config: the new decoder architecture
  groups rows per kv head ([q heads of the group | k_g | v_g], ``num_kv_heads``); the original 7B/40B
  multi-query layout is [Q heads | K | V] with one kv head; without either it is interleaved per head.
"""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("gpt_bigcode", AttentionSpec(layer="h.{layer}.attn", qkv="c_attn", qkv_style="blocked", o="c_proj",
                                             multi_query="multi_query"))
register_layout("mpt", AttentionSpec(layer="blocks.{layer}.attn", qkv="Wqkv", qkv_style="blocked", o="out_proj"))
register_layout("modernbert", AttentionSpec(layer="layers.{layer}.attn", qkv="Wqkv", qkv_style="blocked", o="Wo"))

FALCON = {
    "new": AttentionSpec(layer="h.{layer}.self_attention", qkv="query_key_value", qkv_style="grouped", o="dense",
                         kv_heads="num_kv_heads"),
    "multi_query": AttentionSpec(layer="h.{layer}.self_attention", qkv="query_key_value", qkv_style="blocked",
                                 o="dense", multi_query="multi_query"),
    "per_head": AttentionSpec(layer="h.{layer}.self_attention", qkv="query_key_value", qkv_style="interleaved",
                              o="dense", kv_heads="num_attention_heads"),
}


def falcon_spec(config) -> AttentionSpec:
    if getattr(config, "new_decoder_architecture", False):
        return FALCON["new"]
    return FALCON["multi_query" if getattr(config, "multi_query", False) else "per_head"]


register_layout("falcon", falcon_spec)
