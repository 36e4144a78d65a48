"""The command line's option tables without importing torch, so that ``--help``, ``--version`` and usage errors
answer at once.

Each table is the library's own when its module is already loaded (a program that registered a codec or a
variant before calling the CLI sees them), and otherwise a copy of the built-in entries, which
``tests/test_cli_inputs.py`` checks against the library's tables.
"""

from __future__ import annotations

import sys

# name -> formula (sketchfisher.metric.variants.VARIANTS)
VARIANTS = {"paper": "Σ_S g_i² / (Î + ε + λ) · |g_j|", "signed": "Σ_S g_i g_j / (Î + ε + λ)",
            "symmetric": "Σ_S |g_i| |g_j| / (Î + ε + λ)"}
# sketchfisher.metric.config.NORMALIZER_MEANINGS
NORMALIZERS = {"a": "task A's Fisher", "pooled": "the Fisher of A and B pooled",
               "loo": "task A's Fisher without sample i (leave-one-out)"}
UNIT_FAMILIES = ("heads", "mlp", "linear")  # sketchfisher.layout.UNIT_FAMILIES
SKETCH_KINDS = ("gaussian", "sjlt", "srht")  # sketchfisher.compress.sketchmaps.KINDS
SKETCH_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")  # sketchfisher.compress.sketch.DTYPES
# the storable codecs: name -> summary (sketchfisher.compress.storable())
CODECS = {"sketch": "per-head randomized sketches with standard errors (any model size)"}


def variants() -> dict[str, str]:
    live = sys.modules.get("sketchfisher.metric.variants")
    return {name: v.formula for name, v in live.VARIANTS.items()} if live else VARIANTS


def normalizers() -> dict[str, str]:
    live = sys.modules.get("sketchfisher.metric.config")
    return dict(live.NORMALIZER_MEANINGS) if live else NORMALIZERS


def codecs() -> dict[str, str]:
    live = sys.modules.get("sketchfisher.compress.codec")
    return {name: cls.summary for name, cls in live.storable().items()} if live else CODECS


def unit_families() -> tuple[str, ...]:
    live = sys.modules.get("sketchfisher.layout.units")
    return tuple(live.UNIT_FAMILIES) if live else UNIT_FAMILIES
