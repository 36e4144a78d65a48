"""Capturing per-sample gradients from a model (the only package that touches autograd and hooks)."""

from .hooks import BatchFactors, FactorCapture, is_transposed, linear_modules, token_mask_of
from .oracle import eval_mode, per_sample_gradients

__all__ = ["BatchFactors", "FactorCapture", "eval_mode", "is_transposed", "linear_modules", "per_sample_gradients", "token_mask_of"]
