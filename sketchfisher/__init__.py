"""sketchfisher: circuit-level interference analysis of transformers.

Per-sample Fisher contributions C_i = g_i ⊙ g_i (Stage 1) and head-resolved, Fisher-normalised
interference scores between samples of two tasks (Stage 6), sliced by each architecture's QK-OV
layout. ``docs/concepts.md`` states the formulas.
"""

from . import tasks
from ._version import __version__
from .compress import Codec, Exact, Factors, SideCodec, Sketch, register_codec
from .errors import GradientError, InputError, LayoutError, SketchfisherError
from .interference import VARIANTS, InterferenceResult, ScoreConfig, Variant
from .interference.stored import Store, open_store
from .layout import (BLOCKS, MLP_BLOCKS, AttentionSpec, Dims, HeadBlock, HeadKey, Layout, MLPSpec, Stacks, layout_for,
                     mlp_layout_for, register_layout, register_mlp, units_layout)
from .pipeline import analyze, run_sanity_checks
from .planner import plan, plan_phases
from .store import StoreError, StoreMismatchError

__all__ = [
    "BLOCKS", "MLP_BLOCKS", "MLPSpec", "VARIANTS", "AttentionSpec", "Codec", "Dims", "Exact", "Factors", "GradientError", "HeadBlock",
    "HeadKey", "InputError", "InterferenceResult", "Layout", "LayoutError", "ScoreConfig", "Sketch",
    "SideCodec", "SketchfisherError", "Stacks", "Store", "StoreError", "StoreMismatchError", "Variant", "__version__", "analyze", "tasks",
    "layout_for", "mlp_layout_for", "open_store", "plan", "plan_phases", "register_codec", "register_layout", "register_mlp",
    "run_sanity_checks", "units_layout",
]
