"""BERT family: ``attention.self.{query,key,value}`` and ``attention.output.dense``."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout(("bert", "roberta", "xlm-roberta"),
                AttentionSpec(layer="encoder.layer.{layer}.attention", q="self.query", k="self.key",
                              v="self.value", o="output.dense"))

# DeBERTa-v2/v3: the content projections are the Q/K/V. Its relative-position terms reuse query_proj/key_proj
# when share_att_key (the v2/v3 default), so those head blocks also carry the positional attention of their
# head; with separate pos_query_proj/pos_key_proj those modules are not head blocks and are not scored.
register_layout("deberta-v2", AttentionSpec(layer="encoder.layer.{layer}.attention", q="self.query_proj",
                                            k="self.key_proj", v="self.value_proj", o="output.dense"))

