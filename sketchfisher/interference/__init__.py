"""Stage 6: head-resolved, Fisher-normalised interference scores between samples."""

from ..metric import NORMALIZERS, VARIANTS, ExactBlock, ScoreConfig, Variant, block_scores, x_side, y_side
from .context import ExactSource, ResultContext, SketchSource
from .engine import assemble, iter_chunks
from .result import InterferenceResult

__all__ = ["NORMALIZERS", "VARIANTS", "ExactBlock", "ExactSource", "InterferenceResult", "ResultContext",
           "ScoreConfig", "SketchSource", "Variant", "assemble", "block_scores", "iter_chunks", "x_side", "y_side"]
