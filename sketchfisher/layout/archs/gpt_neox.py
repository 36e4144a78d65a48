"""GPT-NeoX / Pythia: fused ``query_key_value`` interleaved per head [q_h | k_h | v_h], ``dense`` output."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("gpt_neox", AttentionSpec(layer="layers.{layer}.attention", qkv="query_key_value",
                                          qkv_style="interleaved", o="dense"))
