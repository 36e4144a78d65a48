"""Stage 6: head-resolved, Fisher-normalised interference scores between samples."""

from .engine import ExactBlock, assemble, iter_chunks
from ..metric import NORMALIZERS, VARIANTS, ScoreConfig, block_scores, x_side, y_side
from .result import InterferenceResult

__all__ = ["NORMALIZERS", "VARIANTS", "ExactBlock", "InterferenceResult", "ScoreConfig", "assemble", "block_scores",
           "iter_chunks", "x_side", "y_side"]
