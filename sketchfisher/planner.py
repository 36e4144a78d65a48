"""Memory planner: bytes on disk and peak device memory, before anything runs.

``sf.plan(model_or_config_or_preset, samples=768, tokens=512, k=1024, rank=16)`` returns one row per
codec: bytes on disk (or host memory) of the per-sample representation, and the peak device memory
of collecting it. Conventions: ``samples`` is the total over both tasks; each sample stores one vector
per distinct head block (its i-side if in task A, j-side if in task B); Exact stores full fp16
per-sample attention gradients; Factors store fp32 token factors (T·(in + out) per module) or r
pseudo-tokens; Sketch stores k values of ``dtype`` plus two fp64 scalars (16 bytes) per head block
(+4 bytes of int8 scale).

"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .collect.disk import default_store_bytes
from .collect.memory import GiB, PRESETS, STATS_DTYPES, TB, Shape, format_bytes, plan_phases
from .compress.sketch import DTYPES
from .errors import InputError

__all__ = ["GiB", "PRESETS", "TB", "Shape", "format_bytes", "plan", "plan_phases"]



def plan(source: Any, samples: int = 768, tokens: int = 512, k: int = 1024, rank: int = 16, sketch_dtype: str = "int4",
         batch_size: int = 4, model_bytes_per_param: int = 2, stats_bytes: int = 4, devices: int = 1,
         codecs: Any = ()) -> pd.DataFrame:
    """Disk bytes and peak device bytes (busiest device, over the phases of :func:`plan_phases`) per codec.

    Every figure comes from the codecs' own declarations (:class:`sketchfisher.Codec`'s
    ``bytes_per_sample``, ``statistics``, ``pass_orders``). The rows are the built-in codecs at ``k``,
    ``rank`` and ``sketch_dtype``, every other registered codec at its defaults, and the codec instances in
    ``codecs``. The design note's figure (50 matrices × 60 MB fp16 per sample) is listed for the Llama-7B
    shape it was computed for."""
    if samples < 1 or tokens < 1 or k < 1 or rank < 1:
        raise InputError(f"samples, tokens, k and rank must be >= 1; got {samples}, {tokens}, {k}, {rank}")
    if sketch_dtype not in DTYPES:
        raise InputError(f"sketch_dtype must be one of {tuple(DTYPES)}, got {sketch_dtype!r}")
    from .compress import CODECS, Exact, Factors, Sketch, check_codec

    if stats_bytes not in STATS_DTYPES:
        raise InputError(f"stats_bytes must be 4 (fp32, a GPU's statistics) or 8 (fp64, a CPU's); got {stats_bytes}")
    s = Shape.of(source)
    attn = s.num_layers * s.attn_params_per_layer
    sketch = Sketch(k=k, dtype=sketch_dtype)
    per_vec = sketch.bytes_per_block()
    disk = lambda codec: codec.bytes_per_sample(s.head_block_sizes, s.num_layers * s.attn_in_out_per_layer,  # noqa
                                                tokens) * samples
    peak = lambda codec, units="heads": float(plan_phases(  # noqa: E731
        s, samples=samples, tokens=tokens, batch_size=batch_size, codec=codec, stats_bytes=stats_bytes,
        model_bytes_per_param=model_bytes_per_param, devices=devices, units=units)["peak_device_bytes"].max())
    rows = []
    if s == Shape(**PRESETS["llama-7b"]):
        rows.append(("design note: 50 matrices x 60 MB (fp16) x samples", 50 * 60e6 * samples, float("nan")))
        rows.append(("design note, reduced to heads/channels: 50 x 8 KB (fp16) x samples", 50 * 8192 * samples,
                     float("nan")))
    mlp = s.num_layers * s.mlp_params_per_layer
    mlp_blocks = s.mlp_matrices * s.mlp_units_per_layer
    rows += [
        ("Exact: full fp16 per-sample attention gradients", attn * 2 * samples, peak(Exact())),
        ("Factors (lossless, fp32)", disk(Factors()), peak(Factors())),
        (f"Factors(rank={rank}, fp32)", disk(Factors(rank=rank)), peak(Factors(rank=rank))),
        (f"Sketch(k={k}, {sketch_dtype})", disk(sketch), peak(sketch)),
        (f"Sketch(k={k}, {sketch_dtype}) store: + headers, statistics, pass-1 checkpoint",
         default_store_bytes(s, sketch, samples, batch_size, STATS_DTYPES[stats_bytes])["total"], peak(sketch)),
        # MLP channel units: the statistics then cover the MLP weights too
        ("Exact: full fp16 per-sample attention + MLP gradients", (attn + mlp) * 2 * samples, peak(Exact(), "all")),
        (f"Sketch(k={k}, {sketch_dtype}): heads + MLP units ({s.intermediate // s.mlp_units_per_layer} channels each)",
         s.num_layers * (s.head_blocks_per_layer + mlp_blocks) * per_vec * samples, peak(sketch, "all")),
        (f"Sketch(k={k}, {sketch_dtype}) store, heads + MLP units: + headers, statistics, pass-1 checkpoint",
         default_store_bytes(s, sketch, samples, batch_size, STATS_DTYPES[stats_bytes], units="all")["total"], peak(sketch, "all")),
        (f"Sketch(k={k}, {sketch_dtype}): MLP single neurons", s.num_layers * s.mlp_matrices * s.intermediate * per_vec
         * samples, float("nan")),
        ("MLP per-neuron pair means from pass-1 statistics (fp32, any sample count)",
         s.num_layers * s.mlp_matrices * s.intermediate * 4, float("nan")),
    ]
    others = [cls() for name, cls in CODECS.items() if cls not in (Exact, Factors, Sketch)] + [check_codec(c) for c in codecs]
    rows += [(codec.describe(), disk(codec), peak(codec)) for codec in others]
    df = pd.DataFrame(rows, columns=["codec", "disk_bytes", "peak_device_bytes"])
    exact = df.loc[df["codec"].str.startswith("Exact"), "disk_bytes"].iloc[0]
    df["disk"] = df["disk_bytes"].map(format_bytes)
    df["peak_device"] = df["peak_device_bytes"].map(lambda b: "-" if b != b else format_bytes(b))
    df["x_smaller_than_exact"] = exact / df["disk_bytes"]
    return df
