"""sketchfisher: circuit-level interference analysis of transformers.

Per-sample Fisher contributions C_i = g_i ⊙ g_i (Stage 1) and head-resolved, Fisher-normalised
interference scores between samples of two tasks (Stage 6), sliced by each architecture's QK-OV
layout. See SEMANTICS.md for the normative formulas.
"""

from ._version import __version__
from .compress import Exact, Factors, Sketch
from .errors import GradientError, InputError, LayoutError, SketchfisherError
from .interference import InterferenceResult, ScoreConfig
from .layout import BLOCKS, AttentionSpec, Dims, HeadBlock, HeadKey, Layout, layout_for, register_layout
from .interference.checks import run_sanity_checks
from .pipeline import analyze
from .planner import plan
from .store import Store, StoreError, StoreMismatchError, open_store

__all__ = [
    "BLOCKS", "AttentionSpec", "Dims", "Exact", "Factors", "GradientError", "HeadBlock", "HeadKey", "InputError",
    "InterferenceResult", "Layout", "LayoutError", "ScoreConfig", "Sketch", "SketchfisherError", "__version__", "analyze",
    "Store", "StoreError", "StoreMismatchError", "layout_for", "open_store", "plan", "register_layout",
    "run_sanity_checks",
]
