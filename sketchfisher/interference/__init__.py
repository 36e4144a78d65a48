"""Stage 6: head-resolved, Fisher-normalised interference scores between samples."""

from .engine import assemble, exact_scorer
from .metric import NORMALIZERS, VARIANTS, ScoreConfig, block_scores
from .result import InterferenceResult

__all__ = ["NORMALIZERS", "VARIANTS", "InterferenceResult", "ScoreConfig", "assemble", "block_scores", "exact_scorer"]
