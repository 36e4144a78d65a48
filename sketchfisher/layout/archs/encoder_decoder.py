"""Encoder-decoders: three attention stacks in one layout, in this order: the encoder's self-attention,
the decoder's self-attention and the decoder's cross-attention (queries from the decoder, keys and
values from the encoder's output). ``Layout.stacks`` gives their layer ranges and ``Layout.layer_name``
labels a layer (``"cross 2"``); each stack's head blocks are sliced as for a decoder.

T5 has no biases and no 1/√d scaling (neither changes the slicing); its head width is ``d_kv``. BART (and
mBART) has biases on every projection.
"""

from ..registry import register_layout
from ..spec import AttentionSpec, Stacks


def _t5(layer: str, module: str, layers: str) -> AttentionSpec:
    return AttentionSpec(layer=layer, q=f"{module}.q", k=f"{module}.k", v=f"{module}.v", o=f"{module}.o",
                         layers=layers, head_dim="d_kv")


register_layout("t5", Stacks((
    ("encoder", _t5("encoder.block.{layer}.layer.0", "SelfAttention", "num_layers")),
    ("decoder", _t5("decoder.block.{layer}.layer.0", "SelfAttention", "num_decoder_layers")),
    ("cross", _t5("decoder.block.{layer}.layer.1", "EncDecAttention", "num_decoder_layers")))))


def _bart(layer: str, layers: str) -> AttentionSpec:
    return AttentionSpec(layer=layer, q="q_proj", k="k_proj", v="v_proj", o="out_proj", layers=layers)


register_layout(("bart", "mbart"), Stacks((
    ("encoder", _bart("encoder.layers.{layer}.self_attn", "encoder_layers")),
    ("decoder", _bart("decoder.layers.{layer}.self_attn", "decoder_layers")),
    ("cross", _bart("decoder.layers.{layer}.encoder_attn", "decoder_layers")))))
