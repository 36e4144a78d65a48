"""MLP channel units: the projections around each layer's hidden units, for the common MLP shapes.

GPT-2 and StarCoder2 (``c_fc``/``c_proj``; Conv1D for GPT-2), the Llama family's gated MLP
(``gate_proj``/``up_proj``/``down_proj``), Phi-3's stacked ``gate_up_proj``, the BERT family's
``intermediate.dense``/``output.dense`` and GPT-NeoX's ``dense_h_to_4h``/``dense_4h_to_h``. Mixture-of-experts
MLPs route tokens to experts and are not declared; nor are encoder-decoders (their stacks differ in depth).
"""

from ..registry import register_mlp
from ..spec import MLPSpec

register_mlp("gpt2", MLPSpec(layer="h.{layer}.mlp", up="c_fc", down="c_proj", weight_format="conv1d"))
register_mlp("starcoder2", MLPSpec(layer="layers.{layer}.mlp", up="c_fc", down="c_proj"))
register_mlp(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite",
              "cohere"), MLPSpec(layer="layers.{layer}.mlp", gate="gate_proj", up="up_proj", down="down_proj"))
register_mlp("phi3", MLPSpec(layer="layers.{layer}.mlp", up="gate_up_proj", down="down_proj", gate_up=True))
register_mlp(("bert", "roberta", "xlm-roberta", "electra"),
             MLPSpec(layer="encoder.layer.{layer}", up="intermediate.dense", down="output.dense"))
register_mlp("gpt_neox", MLPSpec(layer="layers.{layer}.mlp", up="dense_h_to_4h", down="dense_4h_to_h"))
register_mlp(("bloom", "falcon"), MLPSpec(layer="h.{layer}.mlp", up="dense_h_to_4h", down="dense_4h_to_h"))
register_mlp("opt", MLPSpec(layer="decoder.layers.{layer}", up="fc1", down="fc2"))
register_mlp("gptj", MLPSpec(layer="h.{layer}.mlp", up="fc_in", down="fc_out"))
register_mlp("phi", MLPSpec(layer="layers.{layer}.mlp", up="fc1", down="fc2"))
register_mlp("gpt_bigcode", MLPSpec(layer="h.{layer}.mlp", up="c_fc", down="c_proj"))
register_mlp("mpt", MLPSpec(layer="blocks.{layer}.ffn", up="up_proj", down="down_proj"))
register_mlp("distilbert", MLPSpec(layer="transformer.layer.{layer}.ffn", up="lin1", down="lin2"))
register_mlp("deberta-v2", MLPSpec(layer="encoder.layer.{layer}", up="intermediate.dense", down="output.dense"))
