"""The Stage 6 metric on plain tensors: variants, options, side vectors, block scores. No hooks, no models."""

from .blocks import BlockScores, ExactBlock, Provider
from .config import NORMALIZER_MEANINGS, NORMALIZERS, ScoreConfig
from .sides import block_scores, contract, i_side, loo_denominator, ridge, shift, x_side, y_side
from .variants import MEAN_OF, TRANSFORM_FNS, VARIANTS, Variant, variant_of

__all__ = ["BlockScores", "ExactBlock", "MEAN_OF", "NORMALIZER_MEANINGS", "NORMALIZERS", "Provider", "ScoreConfig", "TRANSFORM_FNS",
           "VARIANTS", "Variant", "block_scores", "contract", "i_side", "loo_denominator", "ridge", "shift",
           "variant_of", "x_side", "y_side"]
