"""BLOOM: fused ``self_attention.query_key_value`` interleaved per head, ``self_attention.dense`` output."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("bloom", AttentionSpec(layer="h.{layer}.self_attention", qkv="query_key_value",
                                       qkv_style="interleaved", o="dense"))
