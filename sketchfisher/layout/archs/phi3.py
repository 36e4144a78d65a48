"""Phi-3: fused blocked ``qkv_proj`` [Q heads | K kv-heads | V kv-heads] with GQA, ``o_proj`` output."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("phi3", AttentionSpec(layer="layers.{layer}.self_attn", qkv="qkv_proj", qkv_style="blocked",
                                      o="o_proj"))
