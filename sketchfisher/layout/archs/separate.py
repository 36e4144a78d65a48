"""Decoders and encoders with separate Q/K/V projections under their own names.

OPT (``out_proj``), GPT-J (``out_proj``), Phi-1/2 (``dense``), DistilBERT (``q_lin``...), and the BERT-shaped
ELECTRA and ViT encoders, and ALBERT (weights shared across layers).
"""

from ..registry import register_layout
from ..spec import AttentionSpec

register_layout("opt", AttentionSpec(layer="decoder.layers.{layer}.self_attn", q="q_proj", k="k_proj", v="v_proj",
                                     o="out_proj"))
register_layout("gptj", AttentionSpec(layer="h.{layer}.attn", q="q_proj", k="k_proj", v="v_proj", o="out_proj"))
register_layout("phi", AttentionSpec(layer="layers.{layer}.self_attn", q="q_proj", k="k_proj", v="v_proj", o="dense"))
register_layout("distilbert", AttentionSpec(layer="transformer.layer.{layer}.attention", q="q_lin", k="k_lin",
                                            v="v_lin", o="out_lin"))
register_layout("electra", AttentionSpec(layer="encoder.layer.{layer}.attention", q="self.query", k="self.key",
                                         v="self.value", o="output.dense"))
register_layout("vit", (AttentionSpec(layer="layers.{layer}.attention", q="q_proj", k="k_proj", v="v_proj",
                                      o="o_proj"),  # transformers >= 5.2x
                        AttentionSpec(layer="encoder.layer.{layer}.attention", q="attention.query",
                                      k="attention.key", v="attention.value", o="output.dense")))

# ALBERT applies one set of attention weights at every layer (num_hidden_groups sets, usually 1): a weight's
# gradient sums all its applications, so its scores have one "layer" per weight set, not per application.
register_layout("albert", AttentionSpec(layer="encoder.albert_layer_groups.{layer}.albert_layers.0.attention",
                                        q="query", k="key", v="value", o="dense", layers="num_hidden_groups"))

