"""Memory planner: bytes on disk and peak device memory of each codec, before anything runs.

``sf.plan(model_or_config_or_preset, samples=768, tokens=512, k=256, rank=16)`` returns one row per
codec. Conventions: ``samples`` is the total over both tasks; each sample stores one vector per
distinct head block (its i-side if in task A, j-side if in task B); Exact stores full fp16 per-sample
attention gradients; Factors store fp32 token factors (T·(in + out) per module) or r pseudo-tokens;
Sketch stores k values of ``dtype`` plus two fp64 scalars (16 bytes) per head block (+4 bytes of int8
scale). Peak device memory of collection = model weights + a batch of activations (estimate) + the
largest per-batch head-block gradient tensor + pass-1 statistics (4 fp64 model-sized tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from .compress.sketch import DTYPES
from .errors import InputError

PRESETS = {
    "gpt2": dict(num_layers=12, hidden=768, heads=12, kv_heads=12, head_dim=64, intermediate=3072, vocab=50257),
    "minilm": dict(num_layers=6, hidden=384, heads=12, kv_heads=12, head_dim=32, intermediate=1536, vocab=30522),
    "llama-7b": dict(num_layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=32000),
    "llama-13b": dict(num_layers=40, hidden=5120, heads=40, kv_heads=40, head_dim=128, intermediate=13824,
                      vocab=32000),
    "llama-70b": dict(num_layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672,
                      vocab=32000),
}
TB = 1e12


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, source: Any) -> "Shape":
        if isinstance(source, str):
            if source not in PRESETS:
                raise InputError(f"unknown preset {source!r}; presets: {', '.join(PRESETS)}")
            return cls(**PRESETS[source])
        config = getattr(source, "config", source)
        try:
            heads = int(config.num_attention_heads)
            hidden = int(config.hidden_size)
            return cls(num_layers=int(config.num_hidden_layers), hidden=hidden, heads=heads,
                       kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                       head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
                       intermediate=int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None)
                                        or 4 * hidden),
                       vocab=int(getattr(config, "vocab_size", 0)))
        except (AttributeError, TypeError) as exc:
            raise InputError(f"cannot read a model shape from {type(source).__name__}: {exc}") from None

    @property
    def attn_params_per_layer(self) -> int:
        q = self.heads * self.head_dim * self.hidden
        kv = 2 * self.kv_heads * self.head_dim * self.hidden
        return 2 * q + kv  # Q and O, K and V

    @property
    def attn_in_out_per_layer(self) -> int:
        """Σ (in + out) over the Q, K, V, O projections of one layer (the per-token factor width)."""
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (self.hidden + qd) * 2 + (self.hidden + kvd) * 2

    @property
    def head_blocks_per_layer(self) -> int:
        return 2 * self.heads + 2 * self.kv_heads

    @property
    def params(self) -> int:
        mlp = 3 * self.hidden * self.intermediate
        return self.num_layers * (self.attn_params_per_layer + mlp) + self.vocab * self.hidden


def plan(source: Any, samples: int = 768, tokens: int = 512, k: int = 256, rank: int = 16, sketch_dtype: str = "fp16",
         batch_size: int = 4, model_bytes_per_param: int = 2) -> pd.DataFrame:
    """Disk bytes and peak device bytes per codec; see the module docstring for the conventions."""
    if samples < 1 or tokens < 1 or k < 1 or rank < 1:
        raise InputError(f"samples, tokens, k and rank must be >= 1; got {samples}, {tokens}, {k}, {rank}")
    if sketch_dtype not in DTYPES:
        raise InputError(f"sketch_dtype must be one of {tuple(DTYPES)}, got {sketch_dtype!r}")
    s = Shape.of(source)
    attn = s.num_layers * s.attn_params_per_layer
    weights = s.params * model_bytes_per_param
    activations = batch_size * tokens * s.hidden * s.num_layers * 34 * model_bytes_per_param  # a rough transformer rule
    block_grads = batch_size * max(s.heads * s.head_dim, s.hidden) * s.hidden * 4
    pass1 = 4 * attn * 8
    item = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}[sketch_dtype]
    per_vec = k * item + 16 + (4 if sketch_dtype == "int8" else 0)
    rows = [
        ("design note: 50 matrices x 60 MB (fp16) x samples", 50 * 60e6 * samples, float("nan")),
        ("Exact: full fp16 per-sample attention gradients", attn * 2 * samples, weights + activations + attn * 4 * batch_size),
        ("Factors (lossless, fp32)", tokens * s.num_layers * s.attn_in_out_per_layer * 4 * samples,
         weights + activations + block_grads + pass1),
        (f"Factors(rank={rank}, fp32)", rank * s.num_layers * s.attn_in_out_per_layer * 4 * samples,
         weights + activations + block_grads + pass1),
        (f"Sketch(k={k}, {sketch_dtype})", s.num_layers * s.head_blocks_per_layer * per_vec * samples,
         weights + activations + block_grads + pass1),
    ]
    df = pd.DataFrame(rows, columns=["codec", "disk_bytes", "peak_device_bytes"])
    df["disk_TB"] = df["disk_bytes"] / TB
    df["x_smaller_than_exact"] = df["disk_bytes"].iloc[1] / df["disk_bytes"]
    return df
