"""Encoder-decoders: three attention stacks in one layout, in this order: the encoder's self-attention,
the decoder's self-attention and the decoder's cross-attention (queries from the decoder, keys and
values from the encoder's output). ``Layout.stacks`` gives their layer ranges and ``Layout.layer_name``
labels a layer (``"cross 2"``); each stack's head blocks are sliced as for a decoder.

T5 has no biases and no 1/√d scaling (neither changes the slicing); its head width is ``d_kv``. BART (and
mBART) has biases on every projection, and its encoder and decoder may have different head counts: each stack
reads its own (``encoder_attention_heads``, ``decoder_attention_heads``). Scores are one ``[L, H, 4]`` grid, so
stacks of different head geometry are refused by name rather than sliced with another stack's count.
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


def _bart(layer: str, stack: str) -> AttentionSpec:
    """One BART stack: its layer count and its head count are the config's for that stack (the cross-attention's
    queries are the decoder's)."""
    return AttentionSpec(layer=layer, q="q_proj", k="k_proj", v="v_proj", o="out_proj", layers=f"{stack}_layers",
                         heads=f"{stack}_attention_heads")


register_layout(("bart", "mbart"), Stacks((
    ("encoder", _bart("encoder.layers.{layer}.self_attn", "encoder")),
    ("decoder", _bart("decoder.layers.{layer}.self_attn", "decoder")),
    ("cross", _bart("decoder.layers.{layer}.encoder_attn", "decoder")))))
