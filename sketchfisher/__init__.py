"""sketchfisher: circuit-level interference analysis of transformers.

Per-sample Fisher contributions C_i = g_i ⊙ g_i (Stage 1) and head-resolved, Fisher-normalised
interference scores between samples of two tasks (Stage 6), sliced by each architecture's QK-OV
layout. ``docs/concepts.md`` states the formulas.

The names below are loaded on first use, so that ``import sketchfisher`` (and the command line's ``--help``)
does not import torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from ._version import __version__

_EXPORTS = {  # name -> the module that defines it
    **dict.fromkeys(("Codec", "Exact", "Factors", "SideCodec", "Sketch", "register_codec"), ".compress"),
    **dict.fromkeys(("GradientError", "InputError", "LayoutError", "SketchfisherError"), ".errors"),
    **dict.fromkeys(("VARIANTS", "InterferenceResult", "ScoreConfig", "Variant"), ".interference"),
    **dict.fromkeys(("Store", "open_store"), ".interference.stored"),
    **dict.fromkeys(("BLOCKS", "MLP_BLOCKS", "AttentionSpec", "Dims", "HeadBlock", "HeadKey", "Layout", "MLPSpec",
                     "Stacks", "layout_for", "mlp_layout_for", "register_layout", "register_mlp", "units_layout"),
                    ".layout"),
    **dict.fromkeys(("analyze", "analyze_tasks", "run_sanity_checks"), ".pipeline"),
    **dict.fromkeys(("TaskSet", "open_tasks"), ".interference.many"),
    **dict.fromkeys(("plan", "plan_phases"), ".planner"),
    **dict.fromkeys(("StoreError", "StoreMismatchError"), ".store"),
}

__all__ = sorted([*_EXPORTS, "__version__", "tasks"])


def __getattr__(name: str) -> Any:
    where = _EXPORTS.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where, __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule: sf.tasks, sf.compress, ...
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and editors see
    from . import tasks
    from .compress import Codec, Exact, Factors, SideCodec, Sketch, register_codec
    from .errors import GradientError, InputError, LayoutError, SketchfisherError
    from .interference import VARIANTS, InterferenceResult, ScoreConfig, Variant
    from .interference.stored import Store, open_store
    from .layout import (BLOCKS, MLP_BLOCKS, AttentionSpec, Dims, HeadBlock, HeadKey, Layout, MLPSpec, Stacks,
                         layout_for, mlp_layout_for, register_layout, register_mlp, units_layout)
    from .interference.many import TaskSet, open_tasks
    from .pipeline import analyze, analyze_tasks, run_sanity_checks
    from .planner import plan, plan_phases
    from .store import StoreError, StoreMismatchError
