"""Stage 6: head-resolved, Fisher-normalised interference scores between samples."""

from .engine import score_tensor
from .metric import NORMALIZERS, VARIANTS, ScoreConfig, block_scores
from .result import InterferenceResult

__all__ = ["NORMALIZERS", "VARIANTS", "InterferenceResult", "ScoreConfig", "block_scores", "score_tensor"]
