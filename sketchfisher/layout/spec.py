"""Declarative description of where an architecture keeps its attention projections.

An :class:`AttentionSpec` names the Q/K/V/O modules of one layer, relative to the base model
(``GPT2Model``, ``LlamaModel``, ``BertModel``, ...), and says how heads are arranged inside them.
:class:`Dims` holds the head counts. Neither looks at weights; :func:`sketchfisher.layout_for`
combines them with a model and validates the result against the real parameter shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from ..errors import LayoutError

QKVStyle = Literal["blocked", "interleaved", "grouped"]
WeightFormat = Literal["linear", "conv1d"]


@dataclass(frozen=True)
class AttentionSpec:
    """Where one layer's attention projections live.

    Attributes
    ----------
    layer:
        Format string for a layer's attention module path relative to the base model,
        with ``{layer}`` for the layer index, e.g. ``"layers.{layer}.self_attn"``.
    q, k, v:
        Names of separate Q/K/V projections under ``layer`` (Llama, BERT). Leave ``None`` when
        ``qkv`` names a fused projection.
    qkv:
        Name of a fused projection. ``qkv_style="blocked"`` stores rows
        ``[Q heads | K kv-heads | V kv-heads]`` (GPT-2, Phi-3, GPT-BigCode's multi-query ``c_attn``,
        MPT, ModernBERT); ``"interleaved"`` groups rows per head ``[q_h | k_h | v_h]`` (GPT-NeoX/Pythia,
        BLOOM); ``"grouped"`` per kv head ``[q heads of the group | k_g | v_g]`` (Falcon's new
        decoder architecture).
    o:
        Name of the output projection; a head owns *input* columns ``[h·d_v, (h+1)·d_v)``.
    weight_format:
        ``"linear"`` for ``W ∈ R^{out×in}`` (``nn.Linear``), ``"conv1d"`` for HF ``Conv1D`` which
        stores ``Wᵀ`` (``[in, out]``).
    kv_heads:
        The config attribute holding the number of key/value heads (default ``num_key_value_heads``;
        Falcon: ``num_kv_heads``); absent or None means one per query head.
    multi_query:
        A boolean config attribute that, when true, means a single key/value head (GPT-BigCode's and
        the original Falcon's ``multi_query``).
    layers:
        The config attribute holding the number of distinct attention weight sets, the "layers" of the
        scores (default ``num_hidden_layers``; ALBERT, whose layers share one set: ``num_hidden_groups``;
        an encoder-decoder's stacks: ``encoder_layers``, ``decoder_layers``...).
    head_dim:
        The config attribute holding the head width when it is not hidden/H (default ``head_dim``; T5:
        ``d_kv``).
    heads:
        The config attribute holding the number of query heads (default ``num_attention_heads``; an
        encoder-decoder whose stacks may differ: ``encoder_attention_heads``, ``decoder_attention_heads``).
    """

    layer: str
    o: str
    q: Optional[str] = None
    k: Optional[str] = None
    v: Optional[str] = None
    qkv: Optional[str] = None
    qkv_style: QKVStyle = "blocked"
    weight_format: WeightFormat = "linear"
    kv_heads: str = "num_key_value_heads"
    multi_query: Optional[str] = None
    layers: str = "num_hidden_layers"
    head_dim: str = "head_dim"
    heads: str = "num_attention_heads"

    def __post_init__(self) -> None:
        split = (self.q, self.k, self.v)
        if self.qkv is None and any(s is None for s in split):
            raise LayoutError(
                f"AttentionSpec needs either qkv=<fused module> or all of q, k, v; got q={self.q!r}, "
                f"k={self.k!r}, v={self.v!r}, qkv=None"
            )
        if self.qkv is not None and any(s is not None for s in split):
            raise LayoutError(
                f"AttentionSpec takes qkv={self.qkv!r} or q/k/v, not both; got q={self.q!r}, k={self.k!r}, v={self.v!r}"
            )
        if "{layer}" not in self.layer:
            raise LayoutError(f"AttentionSpec.layer must contain '{{layer}}', got {self.layer!r}")
        if self.qkv_style not in ("blocked", "interleaved", "grouped"):
            raise LayoutError(f"AttentionSpec.qkv_style must be 'blocked', 'interleaved' or 'grouped', got "
                              f"{self.qkv_style!r}")
        if self.weight_format not in ("linear", "conv1d"):
            raise LayoutError(f"AttentionSpec.weight_format must be 'linear' or 'conv1d', got {self.weight_format!r}")

    @property
    def fused(self) -> bool:
        return self.qkv is not None


@dataclass(frozen=True)
class Dims:
    """Head geometry of an attention stack. ``num_kv_heads`` < ``num_heads`` means GQA/MQA."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    v_head_dim: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"Dims.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise LayoutError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.v_head_dim is None:
            object.__setattr__(self, "v_head_dim", self.head_dim)

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: κ(h) = h // group_size."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, spec: Optional[AttentionSpec] = None) -> "Dims":
        """Read head counts from an HF-style config: ``config.head_dim`` when set, else hidden/H; the kv
        heads from the attribute ``spec`` names (one when its ``multi_query`` flag is set)."""
        try:
            layers = int(getattr(config, spec.layers) if spec is not None else config.num_hidden_layers)
            heads = int(getattr(config, spec.heads if spec is not None else "num_attention_heads"))
            hidden = int(config.hidden_size)
        except AttributeError as exc:
            raise LayoutError(
                f"config of type {type(config).__name__} lacks {exc.name!r}; pass dims=sf.Dims(...) explicitly"
            ) from None
        kv = getattr(config, spec.kv_heads if spec is not None else "num_key_value_heads", None) or heads
        if spec is not None and spec.multi_query is not None and getattr(config, spec.multi_query, False):
            kv = 1
        head_dim = getattr(config, spec.head_dim if spec is not None else "head_dim", None)
        if head_dim is None:
            if hidden % heads:
                raise LayoutError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
            head_dim = hidden // heads
        return cls(num_layers=layers, num_heads=heads, num_kv_heads=int(kv), head_dim=int(head_dim), hidden_size=hidden)


@dataclass(frozen=True)
class Stacks:
    """Several attention stacks of one model, in layout order: an encoder-decoder's encoder self-attention,
    decoder self-attention and decoder cross-attention, each an :class:`AttentionSpec` whose ``layers``
    names its config count. Their layers follow each other in the layout and in ``scores``;
    ``Layout.stacks`` and ``Layout.layer_name`` tell them apart."""

    parts: tuple[tuple[str, AttentionSpec], ...]

    def __post_init__(self) -> None:
        if not self.parts or not all(isinstance(s, AttentionSpec) for _, s in self.parts):
            raise LayoutError("Stacks takes ((name, AttentionSpec), ...)")



@dataclass(frozen=True)
class MLPSpec:
    """Where one layer's MLP keeps the projections around its hidden units (channels).

    Channel ``c`` of a layer owns row ``c`` of ``up`` (and of ``gate``, for gated MLPs) and column ``c``
    of ``down``: everything that writes or reads that hidden unit. Channels are grouped into units of
    ``group_size`` consecutive channels (:func:`sketchfisher.mlp_layout_for`).

    Attributes
    ----------
    layer:
        Format string for a layer's MLP module path relative to the base model, with ``{layer}``
        (``"layers.{layer}.mlp"``; BERT: ``"encoder.layer.{layer}"``).
    up, down:
        The projection producing the hidden units and the one consuming them (GPT-2: ``c_fc``,
        ``c_proj``; Llama: ``up_proj``, ``down_proj``; BERT: ``intermediate.dense``, ``output.dense``).
    gate:
        The gate projection of a gated MLP (Llama's ``gate_proj``), or None.
    gate_up:
        ``True`` when ``up`` holds the gate and the up projection stacked, rows ``[gate | up]`` (Phi-3's
        ``gate_up_proj``).
    weight_format:
        ``"linear"`` or ``"conv1d"``, as for :class:`AttentionSpec`.
    layers:
        The config attribute holding the number of layers.
    """

    layer: str
    up: str
    down: str
    gate: Optional[str] = None
    gate_up: bool = False
    weight_format: WeightFormat = "linear"
    layers: str = "num_hidden_layers"

    def __post_init__(self) -> None:
        if "{layer}" not in self.layer:
            raise LayoutError(f"MLPSpec.layer must contain '{{layer}}', got {self.layer!r}")
        if self.gate is not None and self.gate_up:
            raise LayoutError("MLPSpec takes gate=<module> or gate_up=True (gate and up stacked in one), not both")
        if self.weight_format not in ("linear", "conv1d"):
            raise LayoutError(f"MLPSpec.weight_format must be 'linear' or 'conv1d', got {self.weight_format!r}")

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up
