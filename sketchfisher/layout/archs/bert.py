"""BERT family: ``attention.self.{query,key,value}`` and ``attention.output.dense``."""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout(("bert", "roberta", "xlm-roberta"),
                AttentionSpec(layer="encoder.layer.{layer}.attention", q="self.query", k="self.key",
                              v="self.value", o="output.dense"))
